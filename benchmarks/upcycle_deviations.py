"""The deviations docs/upcycling.md quotes: each upcycling and more-experts case of the tests, grown again and
measured (growir's own measure, the record's, and the logits on fresh token ids), written to
``benchmarks/results/upcycle_deviations.md``.

    python benchmarks/upcycle_deviations.py
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "pipeline"), str(ROOT / "tests" / "passes")]

import torch  # noqa: E402
import transformers as T  # noqa: E402

import growir  # noqa: E402
import growir.pipeline.upcycle as upcycle  # noqa: E402
import test_experts  # noqa: E402
import test_upcycle as U  # noqa: E402
from test_archs import make_moe  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "upcycle_deviations.md"


def construction(record) -> str:
    """The construction the first MoE layer got, from its note ("...: copies (factor 1); router: ...")."""
    found = re.search(r"\): ([^;]*);", record.notes[0]) if record.notes else None
    return found.group(1) if found else "-"


def upcycled() -> list[str]:
    """One row per dense -> MoE case: the construction chosen, growir's measure, the logits' deviation."""
    rows = []
    for name, (_, config, _, _) in U.PAIRS.items():
        small = U.dense(name)
        big = growir.grow(small, into=config)
        rows.append((f"{name}", construction(big.growir_record), big.growir_record, U.deviation(small, big)))
    torch.manual_seed(0)
    small = T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=64, head_dim=8, num_hidden_layers=1, **U.SAME))
    small = U.randomize_norms(small.eval()).to(torch.bfloat16)
    config = T.Qwen3MoeConfig(moe_intermediate_size=64, head_dim=8, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=False, num_hidden_layers=1, **U.SAME)
    big = growir.grow(small, into=config)
    rows.append(("qwen3-moe, norm_topk_prob=False, bf16", construction(big.growir_record), big.growir_record,
                 U.deviation(small, big)))
    kept = upcycle.CONSTRUCTIONS
    upcycle.CONSTRUCTIONS = kept[:1]  # copies only: what a copying tool does under Qwen2-MoE's router
    try:
        small = U.dense("qwen2-moe")
        config = T.Qwen2MoeConfig(**{**U.PAIRS["qwen2-moe"][1].to_dict(), "moe_intermediate_size": 64})
        big = growir.grow(small, into=config)
        rows.append(("qwen2-moe, copies forced (warned)", "copies", big.growir_record, U.deviation(small, big)))
    finally:
        upcycle.CONSTRUCTIONS = kept
    return [f"| {n} | {c} | {'yes' if r.exact else 'no'} | {r.deviation:.2e} | {d:.2e} |" for n, c, r, d in rows]


def more_experts() -> list[str]:
    """One row per E -> mE case: top-k before and after, exactness, growir's measure."""
    cases = [("mixtral", make_moe, "mixtral", 8, {}), ("qwen3-moe", make_moe, "qwen3_moe", 2.0, {}),
             ("qwen2-moe (shared expert)", make_moe, "qwen2_moe", 2.0, {}),
             ("mixtral, noise=0.05", make_moe, "mixtral", 2.0, {"noise": 0.05}),
             ("deepseek-v3, sigmoid, groups, not renormalised", test_experts.deepseek, False, 2.0, {}),
             ("deepseek-v3, sigmoid, groups, renormalised", test_experts.deepseek, True, 2.0, {}),
             ("mixtral, keep_top_k=True (warned)", make_moe, "mixtral", 2.0, {"keep_top_k": True}),
             ("qwen3-moe, drop=0.5 (warned)", make_moe, "qwen3_moe", 2.0, {"drop": 0.5})]
    rows = []
    for label, build, arg, experts, kw in cases:
        grown = growir.grow(build(arg), experts=experts, **kw)
        r = grown.growir_record
        (old, new, k, new_k), *_ = r.experts.values()
        exact = "yes" if r.exact else "no"
        rows.append(f"| {label} | {old} → {new} | {k} → {new_k} | {exact} | {r.deviation:.2e} |")
    return rows


def main() -> None:
    warnings.simplefilter("ignore")  # the inexact cases warn by design: their deviation is the row
    text = ["# Upcycling and more experts: measured deviations", "",
            "Written by `python benchmarks/upcycle_deviations.py` from the models of `tests/pipeline/test_upcycle.py`",
            "and `tests/passes/test_experts.py` (float32 unless said;",
            "deviation = max|Δ| / max(1, max|expected|)).", "",
            "## Dense → MoE", "", "| case | construction | exact | growir's measure | logits, 2 fresh shapes |",
            "|---|---|---|---|---|", *upcycled(), "", "## More experts", "",
            "| case | experts | top-k | exact | growir's measure |", "|---|---|---|---|---|", *more_experts(), ""]
    RESULTS.write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
