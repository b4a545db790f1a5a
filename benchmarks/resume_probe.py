"""Resume in mid-run: which optimizer state should a grown checkpoint carry? (issue 20; growir_recipe.json)

A decoder 32x4 (the savings benchmark's source shape) trains ``--source-steps`` of a ``--steps``-step schedule
(AdamW, warmup 5%, cosine to 10% of a 3e-3 peak, as ``benchmarks/savings.py``), is grown x2 wide by growir's
default and trains on to the end of the *same* schedule, on the same batches, three ways:

* ``grown``: AdamW's moments grown with the model (``growir.grow_with_optimizer``, what ``growir grow`` writes
  into a Trainer checkpoint's optimizer.pt by default);
* ``reset``: a fresh AdamW (no state), the schedule continued (``growir grow --optimizer reset``);
* ``reset+rewarm20``: a fresh AdamW and a 20-step linear re-warm-up on top of the schedule.

It prints and writes (``--out``) each seed's validation loss at the growth and at the end.

    python benchmarks/resume_probe.py --out benchmarks/results/resume_probe.json   # ~25 min on a loaded 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.optim import grow_with_optimizer
from growir.train.data import Batcher, load_corpus
from growir.train.loop import TrainConfig, evaluate, make_optimizer

VARIANTS = ("grown", "reset", "reset+rewarm20")


def run(model, opt, batcher, cfg, start, stop, rewarm_from=None):
    """Steps ``start`` to ``stop`` of ``cfg``'s schedule (times a 20-step re-warm-up from ``rewarm_from``)."""
    model.train()
    for step in range(start, stop):
        lr = cfg.lr_at(step)
        if rewarm_from is not None:
            lr *= min(1.0, (step - rewarm_from + 1) / 20)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(**batcher.next_batch()).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
        opt.step()


def one_seed(seed: int, source_steps: int, cfg: TrainConfig, corpus) -> dict:
    """The source trained to ``source_steps``, then each variant trained on to ``cfg.steps``."""
    start = time.time()
    torch.manual_seed(seed)
    small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=256,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    batcher = Batcher(corpus, seq=64, batch=16, seed=seed, val_windows=128)
    val = batcher.val_batches()
    opt = make_optimizer(small, cfg)
    run(small, opt, batcher, cfg, 0, source_steps)
    state = batcher.generator.get_state()
    row = {"source_at_S": evaluate(small, val)}
    for variant in VARIANTS:
        batcher.generator.set_state(state)  # the same batches for every variant
        torch.manual_seed(1000 + seed)
        if variant == "grown":
            big, big_opt = grow_with_optimizer(small, opt, width=2.0, seed=seed, materialize="hf")
        else:
            big = growir.grow(small, width=2.0, seed=seed, materialize="hf")
            big_opt = make_optimizer(big, cfg)
        row[f"{variant}_at_S"] = evaluate(big, val)
        run(big, big_opt, batcher, cfg, source_steps, cfg.steps, source_steps if variant.endswith("rewarm20") else None)
        row[variant] = evaluate(big, val)
    row["seconds"] = time.time() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", help="write the results here (JSON)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    cfg = TrainConfig(steps=args.steps, lr=3e-3, warmup=0.05, min_lr_ratio=0.1, weight_decay=0.01, betas=(0.9, 0.98))
    corpus = load_corpus(4_000_000)
    results = {}
    for seed in args.seeds:
        results[str(seed)] = one_seed(seed, args.source_steps, cfg, corpus)
        print(seed, json.dumps({k: round(v, 4) for k, v in results[str(seed)].items()}), flush=True)
    if args.out:
        meta = {"source_steps": args.source_steps, "steps": args.steps, "device": "cpu", "torch": torch.__version__,
                "python": platform.python_version()}
        with open(args.out, "w") as f:
            json.dump({"settings": meta, "seeds": results}, f, indent=2)


if __name__ == "__main__":
    main()
