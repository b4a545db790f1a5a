"""Measured output deviation of each width method on the test zoo, at x1.5 and x2 (docs/methods.md).

    python benchmarks/methods_table.py   # writes benchmarks/results/methods.md and methods.json

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

MODELS = ["bert", "gpt2", "llama", "t5", "vit", "nanogpt", "torchenc"]
METHODS = ["fpi_random", "fpi_balanced", "fpi", "aki"]
RATIOS = [1.5, 2.0]


def measure(name: str, method: str, ratio: float) -> dict:
    kw = {"example_inputs": example_inputs(name)} if name in ("nanogpt", "torchenc") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rec = growir.grow(make(name), width=ratio, width_method=method, **kw).growir_record
        except growir.GrowthError as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
    return {"deviation": rec.deviation, "exact": rec.exact, "filled": bool(rec.filled)}


def main() -> None:
    out = {f"{n}@{r}": {m: measure(n, m, r) for m in METHODS} for n in MODELS for r in RATIOS}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "methods.json").write_text(json.dumps(out, indent=1))
    lines = ["| model | width | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
    for key, row in out.items():
        name, ratio = key.split("@")
        cells = []
        for m in METHODS:
            r = row[m]
            cells.append("refused" if "error" in r else f"{r['deviation']:.1e}" + (" (exact)" if r["exact"] else ""))
        lines.append(f"| {name} | x{ratio} | " + " | ".join(cells) + " |")
    (results / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
