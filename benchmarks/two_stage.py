"""bert2BERT's two-stage stage 1 on a *pretrained* model grown x2 in width and depth: which sub-models keep it.

A byte-level Llama (hidden 64, 4 blocks) is trained on the stdlib corpus (growir.train.data), then grown to
hidden 128, 8 blocks twice: growir's default (exact: an identity block after each source block) and the
paper's stacking (blocks 1..4 then 1..4 again; not exact). On each, stage 1 of ``TwoStage`` runs with the
paper's bottom-prefix sub-models (``submodels="prefix"``) and with the default (``"whole"``: identity blocks
last, no sub-model drops a block the function needs), against plain full-model training for the same steps.
Printed: each sub-model's validation loss right after growth, and the whole model's validation loss during
stage 1. About five minutes on 2 CPU cores; the figures are in docs/savings.md ("Two-stage training after
growth").

    python benchmarks/two_stage.py [--source-steps 600] [--steps 100] [--block 2]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.train.blocks import sliced_blocks
from growir.train.data import Batcher, load_corpus
from growir.train.loop import TrainConfig, evaluate, train
from growir.train.schedule import TwoStage

VARIANTS = ("prefix", "whole", "full")  # "full": no stage 1, every step trains the whole model


def source_model(corpus, steps: int, seed: int) -> LlamaForCausalLM:
    """The pretrained source: a byte-level Llama 64x4 trained ``steps`` steps (lr 3e-3, warmup and cosine)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                         max_position_embeddings=64))
    train(model, Batcher(corpus, seq=64, batch=16, seed=seed, val_windows=32),
          TrainConfig(steps=steps, lr=3e-3, eval_every=steps), progress=False)
    return model.eval()


def stage1(grown, corpus, variant: str, steps: int, block: int, seed: int) -> dict:
    """Sub-model losses at growth, then ``steps`` steps of stage 1 (or of full training), logged every 10."""
    model = copy.deepcopy(grown)
    batcher = Batcher(corpus, seq=64, batch=16, seed=seed + 1, val_windows=32)
    val = batcher.val_batches()
    cb = TwoStage(block_size=block, stage1_steps=0 if variant == "full" else steps, seed=seed,
                  submodels="whole" if variant == "whole" else "prefix")
    at_growth = {}
    for depth in cb.depths(model) if variant != "full" else []:
        with sliced_blocks(model, cb.order[:depth]):
            at_growth[depth] = evaluate(model, val)
    log = train(model, batcher, TrainConfig(steps=steps, lr=1e-3, warmup=0.0, eval_every=10), callbacks=[cb],
                progress=False)
    return {"at_growth": at_growth, "val": [row["val_loss"] for row in log],
            "train": [row["train_loss"] for row in log[1:]]}


def main(argv=None) -> dict:
    """Train the source, grow it both ways, run every variant; prints the figures and returns them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=100, help="stage-1 steps")
    parser.add_argument("--block", type=int, default=2, help="l_b: blocks trained per stage-1 step")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # tracing chatter from torch.export
    corpus = load_corpus(max_bytes=1_000_000)
    source = source_model(corpus, args.source_steps, args.seed)
    val = Batcher(corpus, seq=64, batch=16, seed=args.seed + 1, val_windows=32).val_batches()
    print(f"source: validation loss {evaluate(source, val):.3f} after {args.source_steps} steps")
    results = {}
    for growth, kwargs in (("growir (exact)", {}), ("stacked", {"depth_method": "stack"})):
        grown = growir.grow(source, width=2.0, depth=2, **kwargs)
        print(f"\n{growth}: validation loss {evaluate(grown, val):.3f} at growth")
        for variant in VARIANTS:
            out = results[growth, variant] = stage1(grown, corpus, variant, args.steps, args.block, args.seed)
            subs = ", ".join(f"{d}: {v:.3f}" for d, v in out["at_growth"].items()) or "-"
            trace = " ".join(f"{v:.3f}" for v in out["val"])
            print(f"  {variant:6s} sub-models at growth (depth: loss) {subs}\n"
                  f"         whole model every 10 steps: {trace}")
    return results


if __name__ == "__main__":
    main()
