#!/usr/bin/env python
"""Train-after-growth benchmark: FLOPs each growth method saves to reach a from-scratch model's loss.

    python benchmarks/savings.py [--quick] [--scale K] [--seeds 0 1 2] [--workers 2] [--out benchmarks/results]
                                 [--settings ...] [--reuse]

For a pre-norm decoder (LlamaForCausalLM) and a post-norm encoder (BertForMaskedLM): pre-train a small source
per seed (cached under ``benchmarks/cache/``), build the target (2× wider; second setting 2× wider and 2×
deeper) with every method, train each with the same optimizer, schedule and token budget, and report the
FLOPs to reach the scratch run's final validation loss (bert2BERT's saving: source not counted) and
``saving_with_source``. The upcycling setting (``decoder-moe``) grows the decoder source into a mixture of
experts instead, with its own methods and FLOPs per active parameter (``savings_upcycle.py``). See
docs/savings.md for the method, the formulas and the results.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import dataclasses
import json
import multiprocessing
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from growir.errors import GrowthError  # noqa: E402
from growir.train import baselines  # noqa: E402
from growir.train.flops import non_embedding_params  # noqa: E402
from growir.train.data import load_corpus  # noqa: E402
from growir.train.loop import train  # noqa: E402
from growir.train.schedule import TwoStage  # noqa: E402
from savings_plot import plot  # noqa: E402
from savings_report import write_markdown  # noqa: E402
from savings_results import keep_partial, partial_file, previous_runs, summarize_method, summarize_setting  # noqa: E402,F401
from savings_setup import (ALL_METHODS, DEFAULT_SETTINGS, GPU_PRESET, GROWIR_POLICY, HEADLINE,  # noqa: E402,F401
                           LR_POLICIES, LR_SWEEP, METHODS, MOE_METHODS, QUICK, SETTINGS, USES_SOURCE, Setting, Sizes, batcher,
                           load_source, methods_of, model_class, new_model, pretrain_source, target_config,
                           to_device, train_config)
from savings_upcycle import DROP, active_params, dense_steps, drop_upcycle, honest_flops  # noqa: E402


class Unavailable(Exception):
    """A method the installed growir cannot build yet; recorded, not fatal."""


def grow_fn():
    """``growir.grow``, or Unavailable while the core does not provide it (tests replace this)."""
    try:
        from growir.api import grow
    except ImportError as e:
        raise Unavailable(f"growir.grow is not importable: {e}") from e
    return grow


# --- methods ----------------------------------------------------------------------------------------------

def grow_candidates(method: str, setting: Setting, sizes: Sizes, seed: int) -> list[dict]:
    """Keyword sets tried in order for ``growir.grow``; the first the core accepts is used (and recorded)."""
    if setting.experts:  # into the MoE config (built by grow_source: the record keeps what it is)
        return [{"into": {"experts": setting.experts, "top_k": setting.top_k}, "seed": seed}]
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
        call = {**kwargs, "into": target_config(setting, sizes)} if "into" in kwargs else kwargs
        try:
            if optimizer is not None:
                from growir.optim import grow_with_optimizer
                return grow_with_optimizer(source, optimizer, materialize="hf", **call), kwargs
            return grow(copy.deepcopy(source), materialize="hf", **call), kwargs  # training needs the HF class
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
    if method == "dense":  # the source trained on, as many steps as cost the MoE's budget
        return copy.deepcopy(source), [], {"steps": dense_steps(source, cfg, sizes)}
    model, kwargs = grow_source(source, method, setting, sizes, seed, optimizer)
    callbacks, info = [], {"grow_kwargs": kwargs}
    if optimizer is not None:
        model, info["optimizer"] = model
    info["grown"] = growth_used(model)
    if method.startswith("drop-upcycling"):  # exact copies, then re-initialised neurons: not the source's function
        router = method == "drop-upcycling"  # the paper's router (the class's init); +router keeps growir's
        info["drop"] = {"rate": DROP, "neurons": drop_upcycle(model, DROP, seed, router), "router": router}
        info["grown"] = {**(info["grown"] or {}), "exact": False, "deviation": None,
                         "width_method": f"upcycle + drop {DROP}" + ("" if router else ", growir's router")}
    if method == "bert2bert":
        block = max(1, depth // 4)
        callbacks.append(TwoStage(block_size=block, stage1_steps=round(sizes.stage1_fraction * steps), seed=seed,
                                  submodels="prefix"))  # the paper's sub-models, as its stacking expects
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
    cfg = train_config(setting.arch, sizes, info.get("steps", sizes.target_steps), method)
    if method in LR_POLICIES:
        info["train_config"] = LR_POLICIES[method]
    grown_opt = info.pop("optimizer", None)
    model = to_device(model, device, grown_opt)
    log = train(model, batcher(setting.arch, sizes, seed, device), cfg, callbacks=callbacks, progress=False,
                optimizer=grown_opt)
    if setting.experts:  # FLOPs per active parameter (top-k of the experts), the dense method's unchanged
        log, info["active_params"] = honest_flops(model, log, sizes.batch, sizes.seq), active_params(model)
    return {"setting": setting_name, "method": method, "seed": seed, "available": True, "log": log,
            "params": non_embedding_params(model), "hidden": model.config.hidden_size,
            "layers": model.config.num_hidden_layers, "seconds": time.time() - start, **info}


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



def same_recipe(run: dict, sizes: Sizes) -> bool:
    """Whether an earlier run was built and trained as the method is now (a changed default recipe retrains)."""
    setting, method = SETTINGS[run["setting"]], run["method"]
    if method in USES_SOURCE and method not in ("directcopy", "dense"):
        if run.get("grow_kwargs") != grow_candidates(method, setting, sizes, run["seed"])[0]:
            return False
    if method.startswith("drop-upcycling") and (run.get("drop") or {}).get("rate") != DROP:
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
        todo = [(st.name, m, s) for st in chosen if st.name in settings for m in methods_of(st, methods) for s in seeds
                if (st.name, m, s) not in done]  # method by method: the first finish on every seed first
        fresh = _map(pool, run_job, [(n, m, s, sizes, source_file[SETTINGS[n].arch, s] if m in USES_SOURCE else None,
                                      device) for n, m, s in todo], keep_partial(out, sizes))
        fresh = {**done, **dict(zip(todo, fresh))}
        jobs = [fresh[k] for st in chosen for s in seeds_shown for m in ALL_METHODS if (k := (st.name, m, s)) in fresh]
    finally:
        if pool is not None:
            pool.shutdown()
    sources = {a: dict(v) for a, v in old_sources.items()}  # settings kept from the earlier result
    for (a, s), path in source_file.items():  # the earlier log of the same source wins: the settings kept are
        sources.setdefault(a, {}).setdefault(s, load_source(a, path)[1])  # summarized as before (a retrained
    # source can match its log only to float rounding: 1.3e-5 in the final loss for decoder-moe's retraining)
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
    plot(result, jobs, os.path.join(out, "savings.png"), METHODS + [m for m in MOE_METHODS if m not in METHODS])
    return result


def main(argv: list[str] | None = None) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny models and budgets: checks the pipeline in ~1 min")
    p.add_argument("--preset", choices=["gpu"], help="gpu: decoder-wide at 4x the width, the target's budget 4x the "
                   "source's (scratch ends below the source), on cuda with 15 workers: ~10 min on one H100 (its "
                   "sizes, settings, device and workers; flags given after it change them)")
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
    if args.preset == "gpu":
        given = set(argv if argv is not None else sys.argv[1:])
        args.settings = args.settings if "--settings" in given else GPU_PRESET["settings"]
        args.device = args.device if "--device" in given else GPU_PRESET["device"]
        args.workers = args.workers if "--workers" in given else GPU_PRESET["workers"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device")
    sizes = (QUICK if args.quick else Sizes(**GPU_PRESET["sizes"]) if args.preset else Sizes()).scaled(args.scale)
    if args.hidden:
        sizes = dataclasses.replace(sizes, hidden=args.hidden)
    return run(sizes, args.seeds, args.settings, args.out, args.cache, args.workers, args.reuse, args.methods,
               args.device)


if __name__ == "__main__":
    main()
