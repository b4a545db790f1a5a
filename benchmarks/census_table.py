"""The census's table (``benchmarks/census.py`` writes it; ``python benchmarks/census.py --table`` rebuilds it).

The exact share counts, over the growths of the classes that built and exported, those whose theory allows
exactness: every growth except one that growir refused or warned about with a theorem-backed reason
(``theorem_backed``: the reasons growir gives where docs/methods.md proves no exact construction exists -- a
post-norm LayerNorm/RMSNorm over the grown width, and depth stacked because the blocks are not pre-norm, so no
identity block exists) *and* whose measured deviation is above TOLERANCE. A theorem-backed warning whose growth
measured exact anyway stays in the count as not exact (growir was too careful), so the rule cannot hide a growth
growir could have made exact. An exact growth whose class computes something else after ``save_pretrained`` /
``from_pretrained`` (growir's reload check moved: a table the class recomputes from its config) counts as warned:
the model a user saves is not the grown one (``reloaded``).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

TOLERANCE = 1e-5  # growir.verify.compare.TOLERANCE (kept here so --table needs no torch import)
# a reason that states a theorem: no function-preserving construction exists for this growth
# (docs/methods.md): a post-norm norm over a grown width, and a depth stacked because the blocks are not pre-norm
# (``auto`` inserts identity blocks wherever they exist: a post-norm block has none)
THEOREM = ("no exact construction exists", "by `stack` is not function-preserving")
COUNTED = ("exact", "warned", "refused", "crashed", "silent")


def theorem_backed(result: dict) -> bool:
    """Whether a growth's verdict is inexact by a theorem growir states, measured beyond TOLERANCE."""
    text = " ".join(result.get("reasons", [])) + " " + result.get("why", "")
    if result["verdict"] == "warned":
        return any(t in text for t in THEOREM) and (result.get("deviation") or 0.0) > TOLERANCE
    return result["verdict"] == "refused" and result["why"].startswith("NotExactError")


def cause(result: dict) -> str:
    """A refusal, crash or warning reduced to its cause: numbers, names in backticks and quotes masked, so
    classes that fail the same way count together."""
    text = result.get("why") or "; ".join(result.get("reasons", [])) or "(no reason given)"
    text = re.sub(r"`[^`]*`", "`_`", text)
    text = re.sub(r"(?<![A-Za-z])'[^']*'", "'_'", text)
    text = re.sub(r"\b(g\d+:)?\w*\d[\w.]*", "N", text)
    return text[:160]


def reloaded(done: dict) -> dict:
    """``done`` with every exact growth whose reload moved counted as warned, the reload's note its reason."""
    out = {}
    for t, e in done.items():
        growths = {g: {**r, "verdict": "warned", "reasons": [*r.get("reasons", []), r["reload"]["note"]]}
                   if r["verdict"] == "exact" and (r.get("reload") or {}).get("moved") else r
                   for g, r in e.get("growths", {}).items()}
        out[t] = {**e, "growths": growths} if "growths" in e else e
    return out


def counts(done: dict) -> dict:
    """Classes by outcome and growths by verdict, with the exact share among those theory allows."""
    done = reloaded(done)
    built = [e for e in done.values() if not not_counted(e)]
    growths = [r for e in built for r in e["growths"].values()]
    allowed = [r for r in growths if r["verdict"] in COUNTED and not theorem_backed(r)]
    exact = sum(r["verdict"] == "exact" for r in allowed)
    all3 = [e for e in built if len(e["growths"]) == 3]
    return {"classes": len(done), "built": len(built), "growths": len(growths), "allowed": len(allowed),
            "exact": exact, "share": exact / len(allowed) if allowed else 0.0,
            "verdicts": Counter(r["verdict"] for r in growths),
            "classes_all_exact": sum(all(r["verdict"] == "exact" for r in e["growths"].values()) for e in all3),
            "classes_all3": len(all3),
            "reload_ran": sum(bool(r.get("reload")) for r in growths if r["verdict"] in ("exact", "warned")),
            "reload_of": sum(r["verdict"] in ("exact", "warned") for r in growths),
            "graph": sum("GraphModule" in (r.get("returned") or "") for r in growths),
            "reload_moved": sum(bool(r.get("reload") and r["reload"]["moved"]) for r in growths)}


def not_counted(e: dict) -> str:
    """Why a class is not in the share ('' where it is): it did not build, export, or finish a growth."""
    if e.get("build") != "ok":
        return e.get("build") or e.get("process") or "no result"
    if not e["growths"]:
        return e.get("process") or "no growth finished"
    return next((r["why"] for r in e["growths"].values() if r["verdict"] == "no export"), "")


def _row(model_type: str, e: dict, names: list, runs: bool = False) -> str:
    cells = []
    for g in names:
        r = e["growths"].get(g)
        if r is None:
            cells.append("-")
            continue
        v = r["verdict"]
        v += f" {r['deviation']:.1e}" if v in ("warned", "silent") and r.get("deviation") is not None else ""
        v += " (theorem)" if theorem_backed(r) else ""
        v += " reload" if r.get("reload") else ""
        cells.append(v)
    other = e.get("build", "") if e.get("build") != "ok" else e.get("process", "")
    if not other:
        first_bad = next((r for r in e["growths"].values() if r["verdict"] not in ("exact",)), None)
        other = cause(first_bad) if first_bad else ""
    run = f" {e['run']} |" if runs else ""
    return f"| {model_type} | {e['class']} | " + " | ".join(cells) + f" | {other[:140].replace('|', '/')} |" + run


def grouped(done: dict, verdicts: tuple) -> list:
    """(cause, count, example types) of the growths with these verdicts, most common first."""
    by = {}
    for t, e in done.items():
        for r in e["growths"].values():
            if r["verdict"] in verdicts:
                by.setdefault(cause(r), []).append(t)
    return sorted(((c, len(ts), sorted(set(ts))) for c, ts in by.items()), key=lambda x: -x[1])


def merged(runs: list) -> dict:
    """One census from several runs, each a (results file, label) pair, later runs replacing earlier ones class by
    class; every entry keeps the label of the run that measured it (``run``): an entry of an earlier merge keeps its
    own."""
    done = {}
    for path, label in runs:
        for t, e in json.loads(Path(path).read_text()).items():
            done[t] = {**e, "run": e.get("run") or label}
    return done


def _runs(done: dict) -> list:
    """A line per run where the census merges several (``merged``): how many classes each measured."""
    by_run = Counter(e["run"] for e in done.values() if e.get("run"))
    if len(by_run) < 2:
        return []
    return ["- Merged from several runs, a class's verdicts from the last run that measured it: "
            + "; ".join(f"{label}: {n} classes" for label, n in by_run.items()) + "."]


def write_table(done: dict, path: Path, total: int, source: str = "") -> None:
    """census.md from the census results."""
    names = ["x2", "x2+depth2", "x1.5"]
    done = reloaded(done)
    c = counts(done)
    lines = ["# Census: transformers model classes from a tiny config", "",
             "Generated by `python benchmarks/census.py` (see its docstring for how classes were chosen, shrunk "
             "and run)." + (f" Ran on {source}." if source else ""), "",
             f"- {c['classes']} of {total} chosen classes ran; {c['built']} built and exported "
             f"({c['classes'] - c['built']} did not: not counted in the share).",
             f"- Growths: {c['growths']} ({', '.join(f'{k} {n}' for k, n in c['verdicts'].most_common())}).",
             f"- Exact share among growths whose theory allows exactness (rule: `census_table.py` docstring): "
             f"**{c['exact']} / {c['allowed']} = {100 * c['share']:.0f}%**; classes exact all three ways: "
             f"{c['classes_all_exact']} of {c['classes_all3']}.",
             f"- growir's reload check (save_pretrained / from_pretrained) ran on {c['reload_ran']} of the "
             f"{c['reload_of']} grown models (every one rebuilt as its Hugging Face class; {c['graph']} came back as "
             f"a GraphModule: the config search found no config, see each class's notes); the reloaded model "
             f"moved beyond TOLERANCE on {c['reload_moved']}.",
             *_runs(done),
             "", "## Refusals and crashes by cause, most common first", "", "| growths | cause | types |",
             "|---|---|---|"]
    lines += [f"| {n} | {why.replace('|', '/')} | {', '.join(ts[:8])}{' ...' if len(ts) > 8 else ''} |"
              for why, n, ts in grouped(done, ("refused", "crashed", "silent"))]
    lines += ["", "## Warnings by cause", "", "| growths | cause | types |", "|---|---|---|"]
    lines += [f"| {n} | {why.replace('|', '/')} | {', '.join(ts[:8])}{' ...' if len(ts) > 8 else ''} |"
              for why, n, ts in grouped(done, ("warned",))]
    lines += ["", "## Classes that did not build or export", "", "| cause | types |", "|---|---|"]
    failed = {}
    for t, e in done.items():
        why = not_counted(e)
        if why:
            failed.setdefault(cause({"why": why}), []).append(t)
    lines += [f"| {why.replace('|', '/')} | {', '.join(sorted(ts))} |"
              for why, ts in sorted(failed.items(), key=lambda x: -len(x[1]))]
    runs = bool(_runs(done))  # merged: each row names the run that measured it
    lines += ["", "## Every class", "", "| type | class | " + " | ".join(names) + " | first cause |"
              + (" run |" if runs else ""), "|---|---|" + "---|" * len(names) + "---|" + ("---|" if runs else "")]
    lines += [_row(t, e, names, runs) for t, e in done.items()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent / "results"
    write_table(json.loads((here / "census.json").read_text()), here / "census.md", 0, "")
