"""bert2BERT's two-stage pre-training (Chen et al., ACL 2022, §4.3).

Stage 1: at every step, sample one bottom-prefix sub-model of depth ``l_b, 2·l_b, …, L`` (embeddings and head
shared) and update only its top ``l_b`` blocks. Stage 2: train the whole model. The sub-model runs by
temporarily replacing the block ``nn.ModuleList`` with its first ``k`` blocks (see :mod:`.blocks`), so any
HF model whose forward iterates over that list works, and the FLOP counter sees only what ran.

By default the shared head and embeddings are frozen in stage 1 (only the ``l_b`` blocks learn);
``train_head=True`` also trains the head's own parameters (final norm, head transform, an untied output
matrix); a tied output matrix is the input embedding and stays frozen, so backward never goes below the
sampled sub-model's top ``l_b`` blocks.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
...                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=256))
>>> cb = TwoStage(block_size=2, stage1_steps=10, seed=0)
>>> cb.depths(m)
[2, 4]
>>> _ = cb.on_step_begin(m, 0); trained = cb.trained_blocks; cb.on_step_end(m, 0)
>>> len(trained), all(p.requires_grad for p in m.parameters())
(2, True)
"""

from __future__ import annotations

import contextlib
import random

from torch import nn

from .blocks import find_blocks, sliced_blocks
from .loop import Callback
from .flops import head_params


class TwoStage(Callback):
    """Stage 1 for ``stage1_steps`` steps of the plain loop (or of an HF ``Trainer`` via :func:`hf_callback`)."""

    def __init__(self, block_size: int, stage1_steps: int, seed: int = 0, train_head: bool = False):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size, self.stage1_steps, self.train_head = block_size, stage1_steps, train_head
        self.rng = random.Random(seed)
        self.trained_blocks: list[int] = []
        self.depth: int | None = None
        self._slice = contextlib.ExitStack()
        self._flags: dict[int, bool] = {}

    def depths(self, model: nn.Module) -> list[int]:
        """Depths of the sub-models: multiples of ``block_size`` up to the full depth (always included)."""
        total = len(find_blocks(model).blocks)
        return sorted(set(list(range(self.block_size, total, self.block_size)) + [total]))

    def on_step_begin(self, model: nn.Module, step: int) -> bool:
        """In stage one: slice the model to a random sub-model depth and train only its last blocks (and the
        head where asked); replaces no parameters."""
        self.trained_blocks, self.depth = [], None
        if step >= self.stage1_steps:
            return False
        depth = self.rng.choice(self.depths(model))
        blocks = find_blocks(model).blocks
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.trained_blocks = list(range(max(0, depth - self.block_size), depth))
        for i in self.trained_blocks:
            blocks[i].requires_grad_(True)
        if self.train_head:
            embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            for p in head_params(model):
                p.requires_grad_(id(p) not in embeddings)
        self.depth = depth
        self._slice.enter_context(sliced_blocks(model, depth))
        return False

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Back to full depth, every parameter's trainable flag as before the step."""
        self._slice.close()  # full depth back
        for p in model.parameters():
            p.requires_grad_(self._flags.get(id(p), p.requires_grad))
        self._flags = {}


def hf_callback(two_stage: TwoStage):
    """The same schedule as a ``transformers.TrainerCallback`` (steps are ``state.global_step``).

    >>> cb = hf_callback(TwoStage(block_size=1, stage1_steps=5))
    >>> type(cb).__name__
    'TwoStageTrainerCallback'
    """
    from transformers import TrainerCallback

    class TwoStageTrainerCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            two_stage.on_step_begin(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            two_stage.on_step_end(model, state.global_step - 1)  # the Trainer counted the step already

    return TwoStageTrainerCallback()
