#!/usr/bin/env python
"""Train-after-growth benchmark: FLOPs each growth method saves to reach a from-scratch model's loss.

    python benchmarks/savings.py [--quick] [--scale K] [--seeds 0 1 2] [--workers 2] [--out benchmarks/results]
                                 [--settings ...] [--reuse]

For a pre-norm decoder (LlamaForCausalLM) and a post-norm encoder (BertForMaskedLM): pre-train a small source
per seed (cached under ``benchmarks/cache/``), build the target (2× wider; second setting 2× wider and 2×
deeper) with every method, train each with the same optimizer, schedule and token budget, and report the
FLOPs to reach the scratch run's final validation loss (bert2BERT's saving: source not counted) and
``saving_with_source``. See docs/savings.md for the method, the formulas and the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from growir.errors import GrowthError  # noqa: E402
from growir.train import baselines  # noqa: E402
from growir.train.data import MLM_VOCAB, VOCAB, Batcher, load_corpus  # noqa: E402
from growir.train.flops import non_embedding_params  # noqa: E402
from growir.train.loop import TrainConfig, make_optimizer, train  # noqa: E402
from growir.train.metrics import flops_to_reach, mean_std, saving  # noqa: E402
from growir.train.schedule import TwoStage  # noqa: E402
from savings_report import plot, write_markdown  # noqa: E402

METHODS = ["scratch", "stackbert", "mslt", "directcopy", "fpi", "aki", "bert2bert", "fpi+noise", "growir",
           "growir+optimizer"]
# The learning-rate sweep after growth, on growir's default growth: TrainConfig fields changed from the shared
# schedule (``lr`` as a factor of the peak; ``warmup`` a fraction of the steps: 0 = start at the peak, 0.15 =
# 90 of 600 steps; the shared schedule warms up over 0.05 = 30 steps). Reported as a sweep, not as rows.
LR_SWEEP = {"growir-w0": {"warmup": 0.0}, "growir-w90": {"warmup": 0.15}, "growir-lr.5": {"lr": 0.5},
            "growir-w0-lr.5": {"warmup": 0.0, "lr": 0.5}, "growir-w90-lr.5": {"warmup": 0.15, "lr": 0.5}}
GROWIR_POLICY: dict = {}  # the policy the growir rows train with (the sweep's winner, if one wins clearly)
LR_POLICIES = {**LR_SWEEP, **({"growir": GROWIR_POLICY, "growir+optimizer": GROWIR_POLICY} if GROWIR_POLICY else {})}
GROWIR = {"growir", "growir+optimizer", *LR_SWEEP}  # grown with growir's default recipe
USES_SOURCE = {"directcopy", "fpi", "aki", "bert2bert", "fpi+noise", *GROWIR}
ALL_METHODS = METHODS + list(LR_SWEEP)
HEADLINE = "decoder-wide"


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the cost of a run; ``--scale K`` multiplies the step budgets."""
    hidden: int = 32            # source width; targets are 2× wider
    layers: int = 4             # source depth
    head_dim: int = 16          # fixed: width growth adds heads
    seq: int = 64
    batch: int = 16
    source_steps: int = 600     # the source sees the same token budget as each target
    target_steps: int = 600     # the token budget of every method: target_steps·batch·seq
    eval_every: int = 40
    lr_decoder: float = 3e-3    # peak LR, identical for all methods (and the source)
    lr_encoder: float = 1e-3
    warmup: float = 0.05        # linear warmup fraction, then cosine to 10%: every method restarts it
    rewarmup: int = 20          # after StackBERT/MSLT stackings (fresh optimizer state)
    stage1_fraction: float = 0.25   # bert2BERT stage 1 share of the steps
    mslt_final_fraction: float = 0.2  # MSLT's last all-layer stage
    noise: float = 1e-3         # the fpi+noise method's symmetry-breaking noise
    corpus_bytes: int = 4_000_000
    val_windows: int = 128

    def scaled(self, k: float) -> "Sizes":
        return dataclasses.replace(self, source_steps=round(self.source_steps * k),
                                   target_steps=round(self.target_steps * k), eval_every=round(self.eval_every * k))


QUICK = Sizes(hidden=16, layers=2, seq=32, batch=8, source_steps=40, target_steps=40, eval_every=10,
              corpus_bytes=300_000, val_windows=16, rewarmup=3)


@dataclass(frozen=True)
class Setting:
    name: str
    arch: str       # "decoder" (pre-norm Llama, causal LM) or "encoder" (post-norm BERT, masked LM)
    width: float
    depth: float


SETTINGS = {s.name: s for s in [Setting("decoder-wide", "decoder", 2.0, 1.0),
                                Setting("decoder-wide-deep", "decoder", 2.0, 2.0),
                                Setting("decoder-x1.5", "decoder", 1.5, 1.0),  # bert2BERT's 512 -> 768
                                Setting("encoder-wide", "encoder", 2.0, 1.0),
                                Setting("encoder-x1.5", "encoder", 1.5, 1.0),
                                Setting("encoder-wide-deep", "encoder", 2.0, 2.0)]}
DEFAULT_SETTINGS = ["decoder-wide", "decoder-wide-deep", "decoder-x1.5", "encoder-wide", "encoder-x1.5"]


class Unavailable(Exception):
    """A method the installed growir cannot build yet; recorded, not fatal."""


def grow_fn():
    """``growir.grow``, or Unavailable while the core does not provide it (tests replace this)."""
    try:
        from growir.api import grow
    except ImportError as e:
        raise Unavailable(f"growir.grow is not importable: {e}") from e
    return grow


# --- models ---------------------------------------------------------------------------------------------

def model_config(arch: str, hidden: int, layers: int, sizes: Sizes):
    heads = max(1, hidden // sizes.head_dim)
    if arch == "decoder":
        from transformers import LlamaConfig
        return LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=heads, vocab_size=VOCAB,
                           max_position_embeddings=sizes.seq, tie_word_embeddings=False)
    from transformers import BertConfig
    return BertConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, vocab_size=MLM_VOCAB, max_position_embeddings=sizes.seq)


def model_class(arch: str):
    from transformers import BertForMaskedLM, LlamaForCausalLM
    return LlamaForCausalLM if arch == "decoder" else BertForMaskedLM


def new_model(arch: str, config, seed: int):
    torch.manual_seed(seed)
    return model_class(arch)(config)


def target_config(setting: Setting, sizes: Sizes):
    return model_config(setting.arch, round(sizes.hidden * setting.width), round(sizes.layers * setting.depth),
                        sizes)


def train_config(arch: str, sizes: Sizes, steps: int, method: str = "") -> TrainConfig:
    """The shared schedule; the LR_POLICIES methods change one field of it (the peak ``lr`` by a factor)."""
    lr = sizes.lr_decoder if arch == "decoder" else sizes.lr_encoder
    cfg = TrainConfig(steps=steps, lr=lr, warmup=sizes.warmup, eval_every=sizes.eval_every, rewarmup=sizes.rewarmup)
    change = dict(LR_POLICIES.get(method, {}))
    if "lr" in change:
        change["lr"] *= lr
    return dataclasses.replace(cfg, **change)


def batcher(arch: str, sizes: Sizes, seed: int, device: str = "cpu") -> Batcher:
    return Batcher(load_corpus(sizes.corpus_bytes), seq=sizes.seq, batch=sizes.batch, mlm=arch == "encoder",
                   seed=seed, val_windows=sizes.val_windows, device=device)


def to_device(model, device: str, optimizer=None):
    """Move ``model`` (and ``optimizer``'s state, which load_state_dict puts on each parameter's device)."""
    if device != "cpu":
        model.to(device)  # in place: the optimizer's parameters stay the same objects
        if optimizer is not None:
            optimizer.load_state_dict(optimizer.state_dict())
    return model


# --- source -----------------------------------------------------------------------------------------------

def source_path(arch: str, sizes: Sizes, seed: int, cache: str, device: str = "cpu") -> str:
    key = [arch, dataclasses.asdict(sizes), load_corpus(sizes.corpus_bytes).digest()] + ([device] if device != "cpu" else [])
    key = json.dumps(key, sort_keys=True)
    return os.path.join(cache, f"source-{arch}-{hashlib.sha256(key.encode()).hexdigest()[:10]}-seed{seed}.pt")


def pretrain_source(arch: str, sizes: Sizes, seed: int, cache: str, device: str = "cpu") -> str:
    """Train (or find cached) the seed's source; returns the cache file (state_dict, config, log, optimizer;
    saved on the CPU). A cache file from before the optimizer state was kept is trained again (deterministic)."""
    path = source_path(arch, sizes, seed, cache, device)
    if not os.path.exists(path) or "optimizer" not in torch.load(path, weights_only=False, map_location="cpu"):
        torch.set_num_threads(1)
        config = model_config(arch, sizes.hidden, sizes.layers, sizes)
        model = to_device(new_model(arch, config, seed), device)
        opt = make_optimizer(model, train_config(arch, sizes, sizes.source_steps))
        log = train(model, batcher(arch, sizes, seed + 1000, device), train_config(arch, sizes, sizes.source_steps),
                    progress=False, optimizer=opt)
        model.cpu()
        opt.load_state_dict(opt.state_dict())  # the state follows its parameters to the CPU
        os.makedirs(cache, exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "config": config.to_dict(), "log": log,
                    "optimizer": opt.state_dict()}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def load_source(arch: str, path: str, sizes: Sizes | None = None):
    """(model, log), and with ``sizes`` also the source's AdamW with its final state."""
    blob = torch.load(path, weights_only=False, map_location="cpu")
    config = type(model_config(arch, 16, 1, QUICK)).from_dict(blob["config"])
    model = model_class(arch)(config)
    model.load_state_dict(blob["state_dict"])
    if sizes is None:
        return model, blob["log"]
    opt = make_optimizer(model, train_config(arch, sizes, sizes.source_steps))
    opt.load_state_dict(blob["optimizer"])
    return model, blob["log"], opt


# --- methods ----------------------------------------------------------------------------------------------

def grow_candidates(method: str, setting: Setting, sizes: Sizes, seed: int) -> list[dict]:
    """Keyword sets tried in order for ``growir.grow``; the first the core accepts is used (and recorded)."""
    base = {"width": setting.width, "depth": setting.depth, "seed": seed}
    stack = {"depth_method": "stack"} if setting.depth > 1 else {}
    if method in ("fpi", "aki", "bert2bert"):
        return [{**base, **stack, "width_method": "aki" if method != "fpi" else "fpi"}]
    if method == "fpi+noise":  # copies (repeat-and-fill where a ratio is not whole) with cancelling noise
        return [{**base, "depth_method": "auto", "width_method": "fpi", "noise": sizes.noise}]
    return [{**base, "depth_method": "auto", "width_method": "auto"}]  # growir's default growth, asked for by name


def grow_source(source, method: str, setting: Setting, sizes: Sizes, seed: int, optimizer=None):
    """(grown model, the grow kwargs used); with ``optimizer``, (grown model, grown optimizer) and kwargs."""
    grow, reasons = grow_fn(), []
    for kwargs in grow_candidates(method, setting, sizes, seed):
        try:
            if optimizer is not None:
                from growir.optim import grow_with_optimizer
                return grow_with_optimizer(source, optimizer, materialize="hf", **kwargs), kwargs
            return grow(copy.deepcopy(source), materialize="hf", **kwargs), kwargs  # training needs the HF class
        except (GrowthError, TypeError, NotImplementedError) as e:
            reasons.append(f"grow({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): "
                           f"{type(e).__name__}: {e}")
    raise Unavailable("; ".join(reasons))


def growth_used(model) -> dict:
    """What ``grow`` actually did, from the grown model's record: the width method ``"auto"`` resolved to (and
    per group, where the record says), whether it is exact and the measured float32 deviation."""
    record = getattr(model, "growir_record", None)
    if record is None:  # a stand-in grow (tests)
        return None
    used = {"width_method": record.width_method, "exact": record.exact, "deviation": record.deviation}
    for name in ("group_methods", "width_methods"):  # per-group choice, where the core records one
        if isinstance(getattr(record, name, None), dict):
            used[name] = {str(k): str(v) for k, v in getattr(record, name).items()}
    return used


def build(method: str, setting: Setting, sizes: Sizes, seed: int, source, optimizer=None):
    """(model, callbacks, info) for one method; raises Unavailable when the core lacks the method. With the
    source's ``optimizer`` (growir+optimizer) info["optimizer"] is the grown one."""
    cfg, steps = target_config(setting, sizes), sizes.target_steps
    depth = cfg.num_hidden_layers
    if method == "scratch":
        return new_model(setting.arch, cfg, seed), [], {}
    if method in ("stackbert", "mslt"):
        mslt = method == "mslt"
        growing = steps - round(sizes.mslt_final_fraction * steps) if mslt else steps
        stages = baselines.doubling_stages(max(1, depth // 4), depth, growing)
        model, cb = baselines.progressive(model_class(setting.arch), cfg, stages, new_only=mslt,
                                          unfreeze_at=growing if mslt else None, seed=seed)
        return model, [cb], {"stages": stages}
    if method == "directcopy":
        return baselines.directcopy(source, cfg, seed), [], {}
    model, kwargs = grow_source(source, method, setting, sizes, seed, optimizer)
    callbacks, info = [], {"grow_kwargs": kwargs}
    if optimizer is not None:
        model, info["optimizer"] = model
    info["grown"] = growth_used(model)
    if method == "bert2bert":
        block = max(1, depth // 4)
        callbacks.append(TwoStage(block_size=block, stage1_steps=round(sizes.stage1_fraction * steps), seed=seed))
        info.update(block_size=block, stage1_steps=callbacks[0].stage1_steps)
    return model, callbacks, info


def run_job(setting_name: str, method: str, seed: int, sizes: Sizes, source_file: str | None,
            device: str = "cpu") -> dict:
    """Build and train one (setting, method, seed) on ``device`` (built on the CPU, then moved); a plain dict
    so it crosses process boundaries."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # tracing chatter from torch.fx/export
    warnings.filterwarnings("ignore", category=FutureWarning)
    setting = SETTINGS[setting_name]
    source, opt = None, None
    if source_file and method == "growir+optimizer":
        source, _, opt = load_source(setting.arch, source_file, sizes)
    elif source_file:
        source = load_source(setting.arch, source_file)[0]
    start = time.time()
    try:
        model, callbacks, info = build(method, setting, sizes, seed, source, opt)
    except Unavailable as e:
        return {"setting": setting_name, "method": method, "seed": seed, "available": False, "reason": str(e)}
    cfg = train_config(setting.arch, sizes, sizes.target_steps, method)
    if method in LR_POLICIES:
        info["train_config"] = LR_POLICIES[method]
    grown_opt = info.pop("optimizer", None)
    model = to_device(model, device, grown_opt)
    log = train(model, batcher(setting.arch, sizes, seed, device), cfg, callbacks=callbacks, progress=False,
                optimizer=grown_opt)
    return {"setting": setting_name, "method": method, "seed": seed, "available": True, "log": log,
            "params": non_embedding_params(model), "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "seconds": time.time() - start, **info}


# --- summary ----------------------------------------------------------------------------------------------

def summarize_method(method: str, runs: list[dict], scratch: dict[int, dict], source_flops: dict[int, float]) -> dict:
    """One method of one setting, seeds paired with the scratch run of the same seed."""
    if not runs or not all(r["available"] for r in runs):
        reason = next((r["reason"] for r in runs if not r["available"]), "not run")
        return {"name": method, "available": False, "reason": reason, "saving": None, "saving_std": None,
                "saving_with_source": None, "flops_to_target": None, "final_val_loss": None, "reached": False}
    pairs = [(r, scratch[r["seed"]]["log"]) for r in runs]
    reach = [f for f in (flops_to_reach(r["log"], base[-1]["val_loss"]) for r, base in pairs) if f is not None]
    extra = source_flops if method in USES_SOURCE else {}
    per_seed = {str(r["seed"]): saving(r["log"], base) for r, base in pairs}
    plain = mean_std([v for v in per_seed.values() if v is not None])
    ranked = mean_std([v or 0.0 for v in per_seed.values()])  # an unreached seed counts as 0% saved
    with_source = mean_std([v for v in (saving(r["log"], base, extra.get(r["seed"], 0.0)) for r, base in pairs)
                            if v is not None])
    finals = mean_std([r["log"][-1]["val_loss"] for r in runs])
    return {"name": method, "available": True, "saving": plain[0], "saving_std": plain[1],
            "saving_ranked": ranked[0], "saving_ranked_std": ranked[1], "per_seed_saving": per_seed,
            "per_seed_final_val_loss": {str(r["seed"]): r["log"][-1]["val_loss"] for r in runs},
            "saving_with_source": with_source[0], "saving_with_source_std": with_source[1],
            "flops_to_target": mean_std(reach)[0], "final_val_loss": finals[0], "final_val_loss_std": finals[1],
            "initial_val_loss": mean_std([r["log"][0]["val_loss"] for r in runs])[0],
            "reached": len(reach) == len(runs), "reached_seeds": len(reach), "seeds": len(runs),
            "params": runs[0]["params"], "grow_kwargs": runs[0].get("grow_kwargs"), "grown": grown_summary(runs),
            "train_config": runs[0].get("train_config"), "seconds": mean_std([r["seconds"] for r in runs])[0]}


def grown_summary(runs: list[dict]) -> dict | None:
    """The width method(s) ``grow`` used over the seeds, exact on every seed or not, the largest deviation."""
    used = [r["grown"] for r in runs if r.get("grown")]
    if not used:
        return None
    devs = [u["deviation"] for u in used if u.get("deviation") is not None]
    out = {"width_method": "/".join(sorted({u["width_method"] for u in used})), "seeds": len(used),
           "exact": all(u["exact"] for u in used), "max_deviation": max(devs) if devs else None}
    for name in ("group_methods", "width_methods"):
        if used[0].get(name):
            out[name] = used[0][name]
    return out


def summarize_setting(setting: Setting, sizes: Sizes, jobs: list[dict], sources: dict[int, list[dict]]) -> dict:
    mine = [j for j in jobs if j["setting"] == setting.name]
    scratch = {j["seed"]: j for j in mine if j["method"] == "scratch"}
    sources = {s: log for s, log in sources.items() if s in scratch}  # the seeds this setting ran
    source_flops = {s: log[-1]["flops"] for s, log in sources.items()}
    methods = [summarize_method(m, [j for j in mine if j["method"] == m], scratch, source_flops) for m in METHODS]
    sweep = [{**summarize_method(m, runs, scratch, source_flops), "policy": LR_SWEEP[m]}
             for m in LR_SWEEP if (runs := [j for j in mine if j["method"] == m])]
    src_loss = mean_std([log[-1]["val_loss"] for log in sources.values()])
    scratch_loss = mean_std([j["log"][-1]["val_loss"] for j in scratch.values()])
    tgt = target_config(setting, sizes)
    return {"name": setting.name, "arch": setting.arch, "width": setting.width, "depth": setting.depth,
            "source": {"hidden": sizes.hidden, "layers": sizes.layers, "steps": sizes.source_steps,
                       "final_val_loss": src_loss[0], "final_val_loss_std": src_loss[1],
                       "flops": mean_std(list(source_flops.values()))[0]},
            "target": {"hidden": tgt.hidden_size, "layers": tgt.num_hidden_layers, "steps": sizes.target_steps,
                       "tokens": sizes.target_steps * sizes.batch * sizes.seq,
                       "scratch_final_val_loss": scratch_loss[0], "scratch_final_val_loss_std": scratch_loss[1],
                       "scratch_flops": mean_std([j["log"][-1]["flops"] for j in scratch.values()])[0],
                       "scratch_below_source": src_loss[0] - scratch_loss[0]},
            "methods": methods, "lr_sweep": sweep}


# --- driver -----------------------------------------------------------------------------------------------

def _map(pool, fn, args_list, on_done=None):
    """``fn`` over ``args_list`` (in ``pool`` if any); ``on_done(result)`` as each finishes."""
    if pool is None:
        results = []
        for args in args_list:
            results.append(fn(*args))
            if on_done:
                on_done(results[-1])
        return results
    futures = [pool.submit(fn, *a) for a in args_list]
    for f in futures if on_done else []:
        f.add_done_callback(lambda f: f.exception() is None and on_done(f.result()))
    return [f.result() for f in futures]


def partial_file(out: str) -> str:
    """Runs finished by an invocation that has not written its result yet (one JSON line each), so that an
    interrupted invocation loses only its unfinished runs: ``--reuse`` reads them."""
    return os.path.join(out, "savings_partial.jsonl")


def keep_partial(out: str, sizes: Sizes):
    os.makedirs(out, exist_ok=True)

    def write(job: dict) -> None:
        with open(partial_file(out), "a") as f:
            f.write(json.dumps({"sizes": dataclasses.asdict(sizes), "run": job}) + "\n")
    return write


def previous_runs(out: str, sizes: Sizes) -> tuple[dict[tuple, dict], dict]:
    """Available runs of an earlier result in ``out`` with the same sizes, keyed (setting, method, seed), and
    its sources' training logs ({arch: {seed: log}})."""
    try:
        with open(os.path.join(out, "savings.json")) as f:
            same = json.load(f)["sizes"] == dataclasses.asdict(sizes)
        with open(os.path.join(out, "savings_logs.json")) as f:
            logs = json.load(f)
    except (OSError, KeyError, ValueError):
        return {}, {}
    if not same:
        return {}, {}
    sources = {a: {int(s): log for s, log in v.items()} for a, v in logs.get("sources", {}).items()}
    runs = logs["runs"]
    if os.path.exists(partial_file(out)):  # an interrupted invocation's finished runs, later ones win
        with open(partial_file(out)) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        runs = runs + [e["run"] for e in lines if e["sizes"] == dataclasses.asdict(sizes)]
    return {(r["setting"], r["method"], r["seed"]): r for r in runs if r["available"]}, sources


def same_recipe(run: dict, sizes: Sizes) -> bool:
    """Whether an earlier run was built and trained as the method is now (a changed default recipe retrains)."""
    setting, method = SETTINGS[run["setting"]], run["method"]
    if method in USES_SOURCE and method != "directcopy":
        if run.get("grow_kwargs") != grow_candidates(method, setting, sizes, run["seed"])[0]:
            return False
    return run.get("train_config") == LR_POLICIES.get(method)


def run(sizes: Sizes, seeds: list[int], settings: list[str], out: str, cache: str, workers: int = 1,
        reuse: bool = False, methods: list[str] | None = None, device: str = "cpu") -> dict:
    """The whole benchmark; writes savings.json, savings_logs.json, savings.md and savings.png into ``out``.
    With ``reuse``, runs already in ``out`` with the same sizes and recipe are kept and only the others (e.g.
    methods that were unavailable) are trained; settings and seeds of the earlier result that were not asked
    for are kept in the output as they were (even if their method's recipe changed since: each records the
    recipe it used). ``methods``: train only these (others are reused or left out); the LR_SWEEP variants run
    only when named here. ``device``: "cpu" or e.g. "cuda" (models and batches move there; sizes unchanged)."""
    start = time.time()
    torch.set_num_threads(1)
    done, old_sources = previous_runs(out, sizes) if reuse else ({}, {})
    done = {k: r for k, r in done.items() if k[0] not in settings or same_recipe(r, sizes)}
    chosen = [SETTINGS[n] for n in SETTINGS if n in settings or any(k[0] == n for k in done)]
    seeds_shown = sorted(set(seeds) | {k[2] for k in done})
    archs = sorted({SETTINGS[n].arch for n in settings})  # sources to train (or find in the cache)
    context = multiprocessing.get_context("spawn" if device != "cpu" else None)  # CUDA cannot be forked
    pool = cf.ProcessPoolExecutor(workers, mp_context=context) if workers > 1 else None
    try:
        files = _map(pool, pretrain_source, [(a, sizes, s, cache, device) for a in archs for s in seeds])
        source_file = dict(zip([(a, s) for a in archs for s in seeds], files))
        todo = [(st.name, m, s) for st in chosen if st.name in settings for m in (methods or METHODS) for s in seeds
                if (st.name, m, s) not in done]  # method by method: the first finish on every seed first
        fresh = _map(pool, run_job, [(n, m, s, sizes, source_file[SETTINGS[n].arch, s] if m in USES_SOURCE else None,
                                      device) for n, m, s in todo], keep_partial(out, sizes))
        fresh = {**done, **dict(zip(todo, fresh))}
        jobs = [fresh[k] for st in chosen for s in seeds_shown for m in ALL_METHODS if (k := (st.name, m, s)) in fresh]
    finally:
        if pool is not None:
            pool.shutdown()
    sources = {a: dict(v) for a, v in old_sources.items()}  # settings kept from the earlier result
    for (a, s), path in source_file.items():
        sources.setdefault(a, {})[s] = load_source(a, path)[1]
    summaries = [summarize_setting(st, sizes, jobs, sources[st.arch]) for st in chosen]
    headline = next((s for s in summaries if s["name"] == HEADLINE), summaries[0])
    result = {"seeds": seeds_shown, "headline": headline["name"], "methods": headline["methods"], "settings": summaries,
              "sizes": dataclasses.asdict(sizes), "workers": workers, "seconds": time.time() - start,
              "python": sys.version.split()[0], "corpus_digest": load_corpus(sizes.corpus_bytes).digest(),
              "device": device, "growir_policy": GROWIR_POLICY, "lr_sweep": LR_SWEEP}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "savings.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "savings_logs.json"), "w") as f:
        json.dump({"sources": {a: {str(s): log for s, log in v.items()} for a, v in sources.items()},
                   "runs": jobs}, f)
    if os.path.exists(partial_file(out)):  # every finished run is in savings_logs.json now
        os.remove(partial_file(out))
    write_markdown(result, os.path.join(out, "savings.md"))
    plot(result, jobs, os.path.join(out, "savings.png"), METHODS)
    return result


def main(argv: list[str] | None = None) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: checks the pipeline in ~1 min")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (longer, better runs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS))
    p.add_argument("--hidden", type=int, help="source width (targets are 2× wider)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes, one thread each")
    p.add_argument("--out", default=os.path.join(here, "results"))
    p.add_argument("--cache", default=os.path.join(here, "cache"))
    p.add_argument("--reuse", action="store_true", help="keep runs already in --out with the same sizes; "
                   "train only the missing or previously unavailable ones")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS, help="train only these methods (with --reuse, the "
                   "others' earlier runs are kept; without, they are left out)")
    p.add_argument("--device", default="cpu", help="where to train: cpu (default) or cuda (cuda:N)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device")
    sizes = (QUICK if args.quick else Sizes()).scaled(args.scale)
    if args.hidden:
        sizes = dataclasses.replace(sizes, hidden=args.hidden)
    return run(sizes, args.seeds, args.settings, args.out, args.cache, args.workers, args.reuse, args.methods,
               args.device)


if __name__ == "__main__":
    main()
