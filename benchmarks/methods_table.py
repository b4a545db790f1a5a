"""Measured output deviation of each width method on the test zoo, at x1.5 and x2 (docs/methods.md).

    python benchmarks/methods_table.py          # writes benchmarks/results/methods.md and methods.json
    python benchmarks/methods_table.py fresh    # re-measure these methods only, keep the other columns

Deviation: max|grown(x) - source(x)| / max(1, max|source(x)|) over all outputs (source outputs mapped by
the growth's index maps), float32, eval mode, two input shapes. "exact" is what the theory says.
"""

from __future__ import annotations

import json
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import growir  # noqa: E402
from zoo import example_inputs, make  # noqa: E402

MODELS = ["bert", "gpt2", "llama", "qwen3", "neox", "phi3", "opt", "t5", "vit", "nanogpt", "torchenc"]
METHODS = ["fpi_random", "fpi_balanced", "fpi", "aki", "fresh"]
RATIOS = [1.5, 2.0]
# head_dim 8 -> 16 (and 24) with heads kept; configs that derive head_dim from hidden also grow hidden
HEAD_DIM = {"bert": True, "llama": False, "qwen3": False, "neox": True, "phi3": True, "t5": False,
            "nanogpt": False, "torchenc": False}


def measure(name: str, method: str, ratio) -> dict:
    kw = {"example_inputs": example_inputs(name)} if name in ("nanogpt", "torchenc") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rec = growir.grow(make(name), width=ratio, width_method=method, **kw).growir_record
        except growir.GrowthError as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    return {"deviation": rec.deviation, "exact": rec.exact, "filled": bool(rec.filled)}


def main(only: list[str] | None = None) -> None:
    results = ROOT / "benchmarks" / "results"
    old = json.loads((results / "methods.json").read_text()) if only else {"width": {}}
    out = {f"{n}@{r}": {m: measure(n, m, r) if not only or m in only else old["width"][f"{n}@{r}"][m]
                        for m in METHODS} for n in MODELS for r in RATIOS}
    results.mkdir(parents=True, exist_ok=True)
    lines = ["| model | width | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for key, row in out.items():
        name, ratio = key.split("@")
        cells = []
        for m in METHODS:
            r = row[m]
            cells.append("refused" if "error" in r else f"{r['deviation']:.1e}" + (" (exact)" if r["exact"] else ""))
        lines.append(f"| {name} | x{ratio} | " + " | ".join(cells) + " |")
    hd = old["head_dim"] if only else {
        f"{n}@{k}": measure(n, "fpi", {"head_dim": 8 * k, **({"hidden": 32 * k} if with_hidden else {})})
        for n, with_hidden in HEAD_DIM.items() for k in (2, 3)}
    (results / "methods.json").write_text(json.dumps({"width": out, "head_dim": hd}, indent=1))
    lines += ["", "| model | head_dim | deviation |", "|---|---|---|"]
    for key, r in hd.items():
        name, k = key.split("@")
        cell = "refused" if "error" in r else f"{r['deviation']:.1e}" + (" (exact)" if r["exact"] else "")
        lines.append(f"| {name} | 8 -> {8 * int(k)} | {cell} |")
    (results / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or None)
