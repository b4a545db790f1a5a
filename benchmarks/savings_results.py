"""The savings benchmark's results: runs summarized per method and setting, and earlier results read back.

``summarize_*`` pair every run with the scratch run of its seed (see docs/savings.md, "Savings");
``keep_partial``/``previous_runs`` let an interrupted or partial invocation be continued with ``--reuse``.
"""

from __future__ import annotations

import dataclasses
import json
import os

from growir.train.metrics import flops_to_reach, mean_std, saving
from savings_setup import LR_SWEEP, SETTINGS, USES_SOURCE, Setting, Sizes, methods_of, target_config

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
            **({"active_params": runs[0]["active_params"]} if "active_params" in runs[0] else {}),
            **({"steps": runs[0]["steps"]} if "steps" in runs[0] else {}),
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
    methods = [summarize_method(m, [j for j in mine if j["method"] == m], scratch, source_flops)
               for m in methods_of(setting)]
    sweep = [{**summarize_method(m, runs, scratch, source_flops), "policy": LR_SWEEP[m]}
             for m in LR_SWEEP if (runs := [j for j in mine if j["method"] == m])]
    moe = {"experts": setting.experts, "top_k": setting.top_k} if setting.experts else {}
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
                       "scratch_below_source": src_loss[0] - scratch_loss[0], **moe},
            "methods": methods, "lr_sweep": sweep}


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


# Sizes fields that only one architecture's runs read, and those only the source's training reads: a change to
# one keeps the runs that do not read it (the other architecture's; scratch and the stacking baselines).
ARCH_ONLY = {"decoder": ("lr_decoder",), "encoder": ("lr_encoder", "lr_encoder_source")}
SOURCE_ONLY = ("source_steps", "lr_encoder_source")


def same_sizes(a: dict, b: dict, arch: str, method: str | None = None) -> bool:
    """Whether two sizes (``dataclasses.asdict(Sizes)``) agree on every field that ``arch``'s runs of ``method``
    read (None: every field of the architecture, its source's included).

    >>> same_sizes({"seq": 64, "lr_encoder": 1e-3}, {"seq": 64, "lr_encoder": 3e-3}, "decoder")
    True
    >>> a, b = {"lr_encoder_source": 1e-3}, {"lr_encoder_source": 3e-3}
    >>> same_sizes(a, b, "encoder", "scratch"), same_sizes(a, b, "encoder", "directcopy")
    (True, False)
    """
    other = {f for k, fields in ARCH_ONLY.items() if k != arch for f in fields}
    if method is not None and method not in USES_SOURCE:
        other |= set(SOURCE_ONLY)
    return all(a.get(k) == b.get(k) for k in set(a) | set(b) if k not in other)


def previous_runs(out: str, sizes: Sizes) -> tuple[dict[tuple, dict], dict]:
    """Available runs of an earlier result in ``out`` with the same sizes (the fields each run reads:
    ``same_sizes``), keyed (setting, method, seed), and its sources' training logs ({arch: {seed: log}})."""
    now = dataclasses.asdict(sizes)
    try:
        with open(os.path.join(out, "savings.json")) as f:
            before = json.load(f)["sizes"]
        with open(os.path.join(out, "savings_logs.json")) as f:
            logs = json.load(f)
    except (OSError, KeyError, ValueError):
        return {}, {}
    sources = {a: {int(s): log for s, log in v.items()} for a, v in logs.get("sources", {}).items()
               if same_sizes(before, now, a)}
    runs = [r for r in logs["runs"] if same_sizes(before, now, SETTINGS[r["setting"]].arch, r["method"])]
    if os.path.exists(partial_file(out)):  # an interrupted invocation's finished runs, later ones win
        with open(partial_file(out)) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        runs = runs + [e["run"] for e in lines
                       if same_sizes(e["sizes"], now, SETTINGS[e["run"]["setting"]].arch, e["run"]["method"])]
    return {(r["setting"], r["method"], r["seed"]): r for r in runs if r["available"]}, sources
