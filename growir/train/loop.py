"""A plain PyTorch training loop for HF causal-LM and masked-LM models, with FLOP accounting.

The model computes its own loss from ``labels`` (``*ForCausalLM`` shifts them; ``*ForMaskedLM`` ignores
``-100``). AdamW, linear warmup then cosine decay to ``min_lr_ratio·lr``. Callbacks may change the model
before a step (slice it, freeze parts, stack new blocks); when they report new parameters the optimizer is
rebuilt (its state starts empty) and the learning rate is re-warmed over ``rewarmup`` steps on top of the
global schedule. Every ``eval_every`` steps (and at steps 0 and ``steps``) one row is logged:
``{step, tokens, flops, train_loss, val_loss, lr}``; evaluation itself is not counted in ``flops``.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from growir.train.data import Batcher, load_corpus
>>> _ = torch.manual_seed(0)
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=256))
>>> b = Batcher(load_corpus(max_bytes=100_000), seq=16, batch=4, val_windows=8)
>>> log = train(m, b, TrainConfig(steps=20, lr=3e-3, eval_every=10), progress=False)
>>> [row["step"] for row in log], log[-1]["val_loss"] < log[0]["val_loss"]
([0, 10, 20], True)
"""

from __future__ import annotations

import inspect

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Batcher
from .flops import step_flops


@dataclass
class TrainConfig:
    """Optimizer and schedule, identical for every method a benchmark compares."""
    steps: int
    lr: float = 1e-3
    warmup: float = 0.05          # fraction of ``steps`` for the initial linear warmup
    min_lr_ratio: float = 0.1     # cosine decays to this fraction of ``lr``
    weight_decay: float = 0.01    # on matrices only, not on norms and biases
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eval_every: int = 50
    rewarmup: int = 10            # steps of linear re-warmup after the optimizer is rebuilt

    def lr_at(self, step: int, rebuilt_at: int = 0) -> float:
        """Learning rate of ``step`` (0-based) when the optimizer was last rebuilt at ``rebuilt_at``.

        >>> c = TrainConfig(steps=100, lr=1.0, warmup=0.1)
        >>> round(c.lr_at(4), 2), round(c.lr_at(10), 2), round(c.lr_at(99), 2)
        (0.5, 1.0, 0.1)
        """
        warm = max(1, round(self.warmup * self.steps))
        if step < warm:
            factor = (step + 1) / warm
        else:
            progress = min(1.0, (step - warm) / max(1, self.steps - 1 - warm))
            factor = self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if rebuilt_at > 0:
            factor *= min(1.0, (step - rebuilt_at + 1) / max(1, self.rewarmup))
        return self.lr * factor


class Callback:
    """Hooks of the plain loop. ``on_step_begin`` returns True when it replaced parameters."""

    def on_step_begin(self, model: nn.Module, step: int) -> bool:
        """Before the step's forward pass; True where it replaced parameters (the loop rebuilds its optimizer)."""
        return False

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """After the step's optimizer update."""


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over every parameter (frozen ones get no gradient and are skipped), decay on matrices only."""
    params = list(dict.fromkeys(model.parameters()))  # tied weights once
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean loss per predicted token over ``batches`` (masked-LM batches predict ~15% of positions)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        labels = batch["labels"]
        n = int((labels[:, 1:] != -100).sum()) if _is_causal(model) else int((labels != -100).sum())
        total += float(model(**batch).loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _is_causal(model: nn.Module) -> bool:
    """A decoder-only generator: its loss predicts token t+1 from tokens up to t (labels shifted by one).
    Decided from what the model can do, not from its class name."""
    can_generate = getattr(model, "can_generate", None)
    forward = getattr(model, "forward", None)
    has_encoder = forward is not None and "decoder_input_ids" in inspect.signature(forward).parameters  # seq2seq
    return bool(callable(can_generate) and can_generate() and not has_encoder)


def train(model: nn.Module, batcher: Batcher, cfg: TrainConfig, *, callbacks=(), flops_offset: float = 0.0,
          progress: bool = True, desc: str = "train", optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps; return the log rows. ``flops_offset`` starts the FLOP counter
    (e.g. at what a growth schedule already spent). ``optimizer``: one to continue (its state is kept, e.g.
    from ``growir.grow_with_optimizer``), else a fresh ``make_optimizer``; the schedule sets its lr."""
    val = batcher.val_batches()
    log = [_row(0, 0, flops_offset, float("nan"), evaluate(model, val), 0.0)]
    opt = optimizer if optimizer is not None else make_optimizer(model, cfg)
    rebuilt_at, flops, losses = 0, flops_offset, []
    model.train()
    for step in tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False):
        if any([cb.on_step_begin(model, step) for cb in callbacks]):
            opt, rebuilt_at = make_optimizer(model, cfg), step
        lr = cfg.lr_at(step, rebuilt_at)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batcher.next_batch()
        flops += step_flops(model, *batch["input_ids"].shape)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        for cb in callbacks:
            cb.on_step_end(model, step)
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.steps:
            tokens = done * batcher.batch * batcher.seq
            log.append(_row(done, tokens, flops, sum(losses) / len(losses), evaluate(model, val), lr))
            losses = []
    return log


def _row(step, tokens, flops, train_loss, val_loss, lr) -> dict:
    return {"step": step, "tokens": tokens, "flops": flops, "train_loss": train_loss, "val_loss": val_loss,
            "lr": lr}
