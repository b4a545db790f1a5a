#!/usr/bin/env python
"""Tables of the savings benchmark (and its sweep plot), generated from its committed JSON (never typed by hand).

    python benchmarks/savings_report.py            # rewrite the generated parts of docs/savings.md and README.md

``write_markdown`` writes ``benchmarks/results/savings.md``; ``docs_tables`` is the block between the
``<!-- savings-report:begin -->`` / ``end`` markers of docs/savings.md and ``readme_line`` the one in
README.md; tests/test_savings_report.py checks that both match ``benchmarks/results/savings.json``.

Statistics: ``saving`` is the mean over the seeds that reached the scratch run's final loss (shown with
"k/n reached"); methods are ranked by ``saving_ranked``, the mean over every seed with an unreached seed
counted as 0% saved, so a method cannot rank high by dropping its bad seeds.
"""

from __future__ import annotations

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "savings.json")
SCALED = os.path.join(ROOT, "benchmarks", "results", "scale2", "savings.json")  # the --scale 2 headline run
BEGIN, END = "<!-- savings-report:begin -->", "<!-- savings-report:end -->"
SCALED_BEGIN, SCALED_END = "<!-- savings-report-scale2:begin -->", "<!-- savings-report-scale2:end -->"
GPU = os.path.join(ROOT, "benchmarks", "results", "gpu", "savings.json")  # --device cuda at a larger width
GPU_BEGIN, GPU_END = "<!-- savings-report-gpu:begin -->", "<!-- savings-report-gpu:end -->"
SURVEY = os.path.join(ROOT, "benchmarks", "results", "width_deviation.json")  # benchmarks/width_deviation.py
SURVEY_BEGIN, SURVEY_END = "<!-- savings-report-deviation:begin -->", "<!-- savings-report-deviation:end -->"


def pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _num(v, digits=3) -> str:
    return "—" if v is None else f"{v:.{digits}g}" if abs(v) >= 1e4 else f"{v:.{digits}f}"


def ranked(setting: dict) -> list[dict]:
    """The setting's methods that ran, best first by the figure that counts unreached seeds as 0%."""
    ran = [m for m in setting["methods"] if m["available"]]
    return sorted(ran, key=lambda m: -(m.get("saving_ranked") or 0.0))


def grown_as(m: dict) -> str:
    """The width method grow() used (what "auto" resolved to) and its measured float32 deviation."""
    g = m.get("grown")
    if not g:
        return ""
    dev = "" if g.get("max_deviation") is None else f", dev {g['max_deviation']:.1e}"
    return f"{g['width_method']} ({'exact' if g['exact'] else 'not exact'}{dev})"


def method_table(setting: dict) -> list[str]:
    lines = ["| method | saving (reached seeds) | reached | rank figure (unreached = 0%) | saving with source | "
             "FLOPs to target | initial val loss | final val loss | grow() used |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in ranked(setting):
        sav = f"{pct(m['saving'])} ± {pct(m['saving_std'])}" if m["saving"] is not None else "—"
        lines.append(f"| {m['name']} | {sav} | {m['reached_seeds']}/{m.get('seeds', m['reached_seeds'])} | "
                     f"{pct(m.get('saving_ranked'))} | {pct(m['saving_with_source'])} | "
                     f"{_num(m['flops_to_target'])} | {_num(m['initial_val_loss'])} | "
                     f"{_num(m['final_val_loss'])} ± {_num(m['final_val_loss_std'])} | {grown_as(m)} |")
    missing = [m for m in setting["methods"] if not m["available"] and m.get("reason") != "not run"]
    lines += [f"| {m['name']} | unavailable | | | | | | {m['reason'][:100]} | |" for m in missing]
    return lines


def seed_table(setting: dict) -> list[str]:
    """Saving per seed (final validation loss in brackets); — where the seed never reached the target."""
    seeds = sorted({int(s) for m in ranked(setting) for s in m.get("per_seed_saving", {})})
    lines = ["| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in ranked(setting):
        cells = []
        for s in seeds:
            loss = m.get("per_seed_final_val_loss", {}).get(str(s))
            cells.append("" if loss is None else f"{pct(m['per_seed_saving'].get(str(s)))} ({loss:.3f})")
        lines.append(f"| {m['name']} | " + " | ".join(cells) + " |")
    return lines


def policy_label(policy: dict, sizes: dict) -> tuple[str, str]:
    """(warmup steps after growth, peak LR factor) of a learning-rate policy (TrainConfig changes)."""
    steps = sizes["target_steps"]
    return str(round(policy.get("warmup", sizes["warmup"]) * steps)), f"×{policy.get('lr', 1.0):g}"


def on_seeds(m: dict, seeds: list[str]) -> dict:
    """A method's figures restricted to ``seeds`` (to compare rows run on different seed sets)."""
    sav = [m["per_seed_saving"].get(s) for s in seeds]
    finals = [m["per_seed_final_val_loss"][s] for s in seeds]
    return {"rank": sum(v or 0.0 for v in sav) / len(sav), "reached": sum(v is not None for v in sav),
            "final": sum(finals) / len(finals), "cells": [f"{pct(v)} ({f:.3f})" for v, f in zip(sav, finals)]}


def sweep_rows(setting: dict, result: dict) -> tuple[list[str], list[tuple[dict, dict, dict]]]:
    """The seeds every sweep run has, and (row, policy, figures on those seeds) for growir's own row and each
    sweep variant, best first."""
    sweep = [m for m in setting.get("lr_sweep", []) if m["available"]]
    mine = next((m for m in setting["methods"] if m["name"] == "growir" and m["available"]), None)
    if not sweep or mine is None:
        return [], []
    seeds = sorted(set.intersection(*[set(m["per_seed_saving"]) for m in sweep + [mine]]), key=int)
    rows = [(mine, result.get("growir_policy") or {})] + [(m, m["policy"]) for m in sweep]
    return seeds, sorted([(m, pol, on_seeds(m, seeds)) for m, pol in rows], key=lambda r: -r[2]["rank"])


def sweep_table(setting: dict, result: dict) -> list[str]:
    """The learning-rate policy after growth, on growir's default growth (the growir row is one point)."""
    seeds, rows = sweep_rows(setting, result)
    if not rows:
        return []
    lines = [f"Learning-rate policy after growth (`growir`'s growth, seeds {', '.join(seeds)}; warmup in steps, "
             "then the shared cosine; the peak as a factor of scratch's):", "",
             "| run | warmup | peak | rank figure | reached | final val loss | " +
             " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|---|---|---|---|" + "---|" * len(seeds)]
    for m, policy, f in rows:
        warm, peak = policy_label(policy, result["sizes"])
        lines.append(f"| {m['name']} | {warm} | {peak} | {pct(f['rank'])} | {f['reached']}/{len(seeds)} | "
                     f"{f['final']:.3f} | " + " | ".join(f["cells"]) + " |")
    return lines + [""]


def setting_header(s: dict) -> list[str]:
    src, tgt = s["source"], s["target"]
    moe = f", {tgt['experts']} experts (top-{tgt['top_k']})" if tgt.get("experts") else ""
    note = [f"FLOPs per active parameter (top-{tgt['top_k']} of {tgt['experts']} experts; the router counted "
            "whole). `dense` is the source trained on for the MoE's FLOPs: another architecture, its saving is "
            "the FLOPs it needs to reach the MoE scratch run's final loss.", ""] if moe else []
    return [f"### {s['name']}: {s['arch']} {src['hidden']}×{src['layers']} → {tgt['hidden']}×{tgt['layers']}{moe}",
            "", f"Scratch target ends {tgt['scratch_below_source']:.3f} below the source's validation loss "
            f"({tgt['scratch_final_val_loss']:.3f} ± {tgt['scratch_final_val_loss_std']:.3f} vs "
            f"{src['final_val_loss']:.3f}); budget {tgt['tokens']:,} tokens, {tgt['scratch_flops']:.3g} FLOPs.",
            ""] + note


GOAL = 0.60  # issue #9: growir's default saves at least this on the headline, and beats every baseline
BASELINES = ["directcopy", "stackbert", "mslt", "fpi", "aki", "bert2bert"]


def goal_check(setting: dict, mine: dict, others: list[dict], headline: bool) -> str:
    """Issue #9's goal for one setting: every seed reached, growir's rank figure > each baseline's on the
    seeds both ran (paired), and >= GOAL on the headline."""
    behind, tied = [], []
    for b in others:
        common = sorted(set(mine["per_seed_saving"]) & set(b["per_seed_saving"]), key=int)
        ours, theirs = on_seeds(mine, common)["rank"], on_seeds(b, common)["rank"]
        if ours <= theirs:  # a tie is not "more" (at 100% both reached the target before training)
            (behind if ours < theirs else tied).append(f"{b['name']} {pct(theirs)} vs {pct(ours)} on seeds "
                                                       f"{', '.join(common)}")
    misses = ([f"{mine['seeds'] - mine['reached_seeds']} seed(s) unreached"] if not mine["reached"] else []) + \
        ([f"below {pct(GOAL)}"] if headline and (mine["saving_ranked"] or 0.0) < GOAL else []) + \
        ([f"behind {'; '.join(behind)}"] if behind else []) + ([f"tied with {'; '.join(tied)}"] if tied else [])
    absent = [b for b in BASELINES if b not in {m["name"] for m in others}]
    unsure = f" against the baselines run ({', '.join(absent)} not run)" if absent else ""
    return f"goal met{unsure}" if not misses else f"goal not met{unsure}: " + ", ".join(misses)


def upcycle_finding(s: dict) -> str:
    """An upcycling setting's line: every method's rank figure and final loss, best first (no issue #9 goal)."""
    tgt = s["target"]
    rows = [f"{m['name']} {pct(m['saving_ranked'])} ({m['reached_seeds']}/{m['seeds']} seeds reached, final loss "
            f"{_num(m['final_val_loss'])})" for m in ranked(s) if m["name"] != "scratch"]
    return (f"- `{s['name']}` (dense → {tgt['experts']} experts, top-{tgt['top_k']}; FLOPs per active parameter): "
            f"{', '.join(rows)}; the MoE from scratch ends at {_num(tgt['scratch_final_val_loss'])}.")


def findings(result: dict) -> list[str]:
    """One line per setting: growir's default against the best other method, by the rank figure, and the goal."""
    lines = []
    for s in result["settings"]:
        if s["target"].get("experts"):
            lines.append(upcycle_finding(s))
            continue
        order = [m for m in ranked(s) if m["name"] != "scratch"]
        mine = next((m for m in order if m["name"] == "growir"), None)
        others = [m for m in order if not m["name"].startswith("growir") and m["name"] != "fpi+noise"]
        if mine is None or not others:
            continue
        best = others[0]
        g = mine.get("grown") or {}
        inexact = "" if g.get("exact", True) else \
            f", grown not exactly (`{g['width_method']}`, deviation up to {g['max_deviation']:.2f})"
        lines.append(f"- `{s['name']}`: growir {pct(mine['saving_ranked'])} ({mine['reached_seeds']}/{mine['seeds']} "
                     f"seeds reached{inexact}), the best baseline {best['name']} {pct(best['saving_ranked'])} "
                     f"({best['reached_seeds']}/{best['seeds']}); growir's final loss {_num(mine['final_val_loss'])} "
                     f"vs {_num(best['final_val_loss'])}; "
                     f"{goal_check(s, mine, others, s['name'] == result['headline'])}.")
    return lines + [""] if lines else []


PRESERVING = ["growir", "fpi", "fpi+noise", "aki"]  # grown from the source by growir.grow, no stage schedule


def resisting(result: dict) -> list[str]:
    """For each setting where growir's goal is not met: the figures that say why (how far the source is ahead
    of the scratch target, where growth starts, and where the function-preserving rows end against the best)."""
    lines = []
    for s in result["settings"]:
        order = [m for m in ranked(s) if m["name"] != "scratch"]
        mine = next((m for m in order if m["name"] == "growir"), None)
        others = [m for m in order if not m["name"].startswith("growir") and m["name"] != "fpi+noise"]
        if mine is None or not others or s["target"].get("experts") or goal_check(
                s, mine, others, s["name"] == result["headline"]).startswith("goal met"):
            continue
        src, tgt, best = s["source"], s["target"], others[0]
        kept = [m for m in order if m["name"] in PRESERVING]
        ends = ", ".join(f"{m['name']} {_num(m['final_val_loss'])} ({pct(m['saving_ranked'])})" for m in kept)
        gap = tgt["scratch_below_source"]
        where = f"only {gap:.3f} above" if gap >= 0 else f"already {-gap:.3f} below"
        lines.append(f"- `{s['name']}`: the source ends at {src['final_val_loss']:.3f}, {where} the scratch target's "
                     f"{tgt['scratch_final_val_loss']:.3f}; "
                     f"growir's growth, {grown_as(mine)}, starts at {_num(mine['initial_val_loss'])}, "
                     f"{best['name']} at {_num(best['initial_val_loss'])}. "
                     f"Final loss (rank figure) of the rows grown from the source by `grow`: {ends}" +
                     ("." if best in kept else
                      f"; {best['name']}: {_num(best['final_val_loss'])} ({pct(best['saving_ranked'])})."))
    return ["Settings where the goal is not met, and the figures behind it:", ""] + lines + [""] if lines else []


def tables(result: dict) -> list[str]:
    lines = findings(result) + resisting(result)
    for s in result["settings"]:
        lines += setting_header(s) + method_table(s) + ["", "Per seed: saving (final validation loss).", ""]
        lines += seed_table(s) + [""] + sweep_table(s, result)
    return lines


def write_markdown(result: dict, path: str) -> None:
    """benchmarks/results/savings.md: the run's parameters and every table."""
    head = ["# Savings after growth", "", f"Seeds {result['seeds']}; sizes {json.dumps(result['sizes'])}.",
            f"Corpus: Python {result['python']} stdlib, digest {result['corpus_digest']}; "
            f"run took {result['seconds'] / 60:.1f} min with {result['workers']} worker(s).", ""]
    with open(path, "w") as f:
        f.write("\n".join(head + [t.replace("### ", "## ", 1) if t.startswith("### ") else t
                                  for t in tables(result)]))


def docs_tables(result: dict) -> str:
    return "\n".join([BEGIN, "", f"Generated by `benchmarks/savings_report.py` from `benchmarks/results/savings.json` "
                      f"(sizes {json.dumps(result['sizes'])}).", ""] + tables(result) + [END])


def readme_line(result: dict) -> str:
    head = next(s for s in result["settings"] if s["name"] == result["headline"])
    most = max(m["seeds"] for m in ranked(head))
    parts = [f"{m['name']} {pct(m['saving_ranked'])}" + (f" ({m['seeds']} seeds)" if m["seeds"] < most else "")
             for m in ranked(head) if m["name"] != "scratch"]
    upcycling = [f" Upcycling ({s['name']}: dense → {s['target']['experts']} experts, top-{s['target']['top_k']}, "
                 f"{max(m['seeds'] for m in ranked(s))} seeds, FLOPs per active parameter): " +
                 ", ".join(f"{m['name']} {pct(m['saving_ranked'])}" for m in ranked(s) if m["name"] != "scratch") + "."
                 for s in result["settings"] if s["target"].get("experts")]
    return (f"{BEGIN}Committed run ({result['headline']}, {most} seeds, FLOPs saved to reach "
            f"scratch's final loss, an unreached seed counted as 0%): " + ", ".join(parts) + "." +
            "".join(upcycling) + END)


def scaled_table(scaled: dict, result: dict) -> str:
    """The ``--scale 2`` run of the headline beside the default run on the same seeds: does the order hold?"""
    s = next(x for x in scaled["settings"] if x["name"] == scaled["headline"])
    base = next(x for x in result["settings"] if x["name"] == s["name"])
    base_rows = {m["name"]: m for m in base["methods"] if m["available"]}
    seeds = sorted({k for m in ranked(s) for k in m["per_seed_saving"]}, key=int)
    sz, tgt = scaled["sizes"], s["target"]
    lines = [SCALED_BEGIN, "", f"Generated by `benchmarks/savings_report.py` from `scale2/savings.json` in the results folder "
             f"(`--scale 2`: {sz['source_steps']} source steps, {sz['target_steps']} target steps; seeds "
             f"{', '.join(seeds)}), beside the default run's `savings.json` on the same seeds (its figures are "
             f"checked against both by tests/test_savings_report.py).", "",
             f"{s['name']} at `--scale 2`: scratch target ends {tgt['scratch_below_source']:.3f} below the source "
             f"({tgt['scratch_final_val_loss']:.3f} vs {s['source']['final_val_loss']:.3f}).", "",
             "| method | rank figure, scale 2 | final val loss, scale 2 | rank figure, scale 1 | final val loss, scale 1 |",
             "|---|---|---|---|---|"]
    for m in ranked(s):
        here, there = on_seeds(m, seeds), base_rows.get(m["name"])
        old = on_seeds(there, seeds) if there and set(seeds) <= set(there["per_seed_saving"]) else None
        then = [pct(old["rank"]), f"{old['final']:.3f}"] if old else ["—", "—"]
        lines.append(f"| {m['name']} | {pct(here['rank'])} | {here['final']:.3f} | {then[0]} | {then[1]} |")
    return "\n".join(lines + ["", SCALED_END])


def gpu_table(gpu: dict) -> str:
    """The ``--device cuda`` run at a larger width: per setting, each method's rank figure and its initial and
    final validation loss (where the source already beats scratch's final loss, every exact growth saves 100%
    and the final loss is what separates them)."""
    sz = gpu["sizes"]
    lines = [GPU_BEGIN, "", f"Generated by `benchmarks/savings_report.py` from `gpu/savings.json` in the results folder "
             f"(source width {sz['hidden']}, {sz['source_steps']} source and {sz['target_steps']} target steps; "
             f"{gpu['device']}; seeds {', '.join(map(str, gpu['seeds']))}).", ""]
    for s in gpu["settings"]:
        rows = ranked(s)
        best = min(rows, key=lambda m: m["final_val_loss"])
        tgt = s["target"]
        lines += [f"{s['name']}: the source ends at {s['source']['final_val_loss']:.3f}, scratch at "
                  f"{tgt['scratch_final_val_loss']:.3f}; lowest final loss: {best['name']} "
                  f"({best['final_val_loss']:.3f}).", "",
                  "| method | rank figure | reached | initial val loss | final val loss |", "|---|---|---|---|---|"]
        lines += [f"| {m['name']} | {pct(m['saving_ranked'])} | {m['reached_seeds']}/{m['seeds']} | "
                  f"{m['initial_val_loss']:.3f} | {m['final_val_loss']:.3f} |" for m in rows]
        lines.append("")
    return "\n".join(lines + [GPU_END])


def survey_table(survey: dict) -> str:
    """Each width method's float32 deviation and starting validation loss per seed (width_deviation.json)."""
    seeds = sorted(survey["seeds"], key=int)
    first = survey["seeds"][seeds[0]]["methods"]
    lines = [SURVEY_BEGIN, "", f"Generated by `benchmarks/savings_report.py` from `benchmarks/results/width_deviation.json` "
             f"(`{survey['setting']}`, each seed's source grown with `grow(width_method=...)`, the seed as `grow`'s).",
             "", "| width method | exact | " + " | ".join(f"deviation, seed {s}" for s in seeds) + " | " +
             " | ".join(f"start val loss, seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * 2 * len(seeds),
             "| (source) | | " + " | " * len(seeds) +
             " | ".join(f"{survey['seeds'][s]['source_val_loss']:.3f}" for s in seeds) + " |"]
    for name in first:
        rows = [survey["seeds"][s]["methods"][name] for s in seeds]
        exact = "yes" if all(r["exact"] for r in rows) else "no"
        lines.append(f"| {name} | {exact} | " + " | ".join(f"{r['deviation']:.3f}" for r in rows) + " | " +
                     " | ".join(f"{r['val_loss']:.3f}" for r in rows) + " |")
    return "\n".join(lines + ["", SURVEY_END])


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {begin} … {end} block to replace")
    return pattern.sub(lambda _: block, text, count=1)


def plot_sweep(result: dict, path: str) -> bool:
    """The learning-rate sweep: rank figure per policy (bar) and each seed's saving (dots); False if none ran."""
    found = [(s, sweep_rows(s, result)) for s in result["settings"]]
    found = [(s, seeds, rows) for s, (seeds, rows) in found if rows]
    if not found:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4), squeeze=False)
    for ax, (s, seeds, rows) in zip(axes[0], found):
        for i, (m, policy, f) in enumerate(rows):
            ax.bar(i, 100 * f["rank"], color="C2" if m["name"] == "growir" else "C0", alpha=0.7)
            ax.plot([i] * len(seeds), [100 * (m["per_seed_saving"][k] or 0.0) for k in seeds], "k.")
        ax.set_xticks(range(len(rows)), [f"warmup {w}\npeak {p}" for w, p in
                                         (policy_label(pol, result["sizes"]) for _, pol, _ in rows)], fontsize=7)
        ax.set(title=f"{s['name']}: LR policy after growth (seeds {', '.join(seeds)})",
               ylabel="FLOPs saved (%; unreached seed = 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    with open(RESULTS) as f:
        result = json.load(f)
    plot_sweep(result, os.path.join(os.path.dirname(RESULTS), "savings_sweep.png"))
    blocks = [("docs/savings.md", docs_tables(result), BEGIN, END), ("README.md", readme_line(result), BEGIN, END)]
    if os.path.exists(SCALED):
        with open(SCALED) as f:
            blocks.append(("docs/savings.md", scaled_table(json.load(f), result), SCALED_BEGIN, SCALED_END))
    if os.path.exists(GPU):
        with open(GPU) as f:
            blocks.append(("docs/savings.md", gpu_table(json.load(f)), GPU_BEGIN, GPU_END))
    if os.path.exists(SURVEY):
        with open(SURVEY) as f:
            blocks.append(("docs/savings.md", survey_table(json.load(f)), SURVEY_BEGIN, SURVEY_END))
    for name, block, begin, end in blocks:
        path = os.path.join(ROOT, name)
        with open(path) as f:
            text = replace_block(f.read(), block, begin, end)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
