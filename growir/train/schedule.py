"""bert2BERT's two-stage pre-training (Chen et al., ACL 2022, §4.3), and a variant safe for exact growth.

Stage 1: at every step, sample one sub-model of depth ``k`` (embeddings and head shared) and update only the
``l_b`` blocks it added last. Stage 2: train the whole model. The sub-model runs by temporarily replacing
the block ``nn.ModuleList`` with its kept blocks (see :mod:`.blocks`), so any HF model whose forward iterates
over that list works, and the FLOP counter sees only what ran.

Which blocks a sub-model keeps (``submodels``):

* ``"prefix"``, the paper's: the bottom ``k`` blocks, ``k ∈ {l_b, 2·l_b, …, L}``. It suits the paper's
  stacking (the prefix of the source's depth is the source), not an exact depth growth: growir puts each
  identity block next to the block it copies, so every prefix shorter than ``L`` drops source blocks that finish the
  function (a small pretrained decoder grown x2 in depth, loss 1.66: prefix sub-models 2.03 to 2.27, and
  1.83 to 1.88 for the whole model after 10 to 20 such steps; docs/savings.md, "Two-stage training after
  growth").
* ``"whole"``, the default: the blocks the function needs come first. Blocks whose removal leaves the model's
  output unchanged (:func:`.blocks.identity_blocks`, measured once at the first stage-1 step) are kept last,
  and no sub-model drops a block the function needs: ``k`` runs from that count to ``L``. On a model without
  identity blocks this leaves one sub-model, the whole model, whose top ``l_b`` blocks train.

By default the shared head and embeddings are frozen in stage 1 (only the ``l_b`` blocks learn);
``train_head=True`` also trains the head's own parameters (final norm, head transform, an untied output
matrix); a tied output matrix is the input embedding and stays frozen.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
...                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=256))
>>> for i in (1, 3):  # blocks 1 and 3 made identities, as an exact depth growth adds them
...     block = m.model.layers[i]
...     _ = block.self_attn.o_proj.weight.data.zero_(), block.mlp.down_proj.weight.data.zero_()
>>> TwoStage(block_size=1, stage1_steps=10, submodels="prefix").depths(m)
[1, 2, 3, 4]
>>> cb = TwoStage(block_size=1, stage1_steps=10, seed=0)
>>> cb.depths(m), cb.order
([2, 3, 4], [0, 2, 1, 3])
>>> cb.rng.choice = min  # draw the shallowest sub-model: the two blocks the function needs
>>> _ = cb.on_step_begin(m, 0); kept, trained = cb.kept, cb.trained_blocks; cb.on_step_end(m, 0)
>>> kept, trained, all(p.requires_grad for p in m.parameters())
([0, 2], [2], True)
"""

from __future__ import annotations

import contextlib
import random

from torch import nn

from .blocks import find_blocks, identity_blocks, sliced_blocks
from .loop import Callback
from .flops import head_params

SUBMODELS = ("whole", "prefix")


class TwoStage(Callback):
    """Stage 1 for ``stage1_steps`` steps of the plain loop (or of an HF ``Trainer`` via :func:`hf_callback`).

    ``order`` (set on first use): the blocks in the order sub-models take them; a sub-model of depth ``k``
    keeps ``order[:k]`` (run in model order) and trains ``order[k - l_b:k]``."""

    def __init__(self, block_size: int, stage1_steps: int, seed: int = 0, train_head: bool = False,
                 submodels: str = "whole"):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        if submodels not in SUBMODELS:
            raise ValueError(f"submodels={submodels!r}: choose one of {', '.join(SUBMODELS)}")
        self.block_size, self.stage1_steps, self.train_head = block_size, stage1_steps, train_head
        self.submodels = submodels
        self.rng = random.Random(seed)
        self.order: list[int] | None = None
        self.needed = 0  # how many blocks of ``order`` the function needs (no sub-model keeps fewer)
        self.trained_blocks: list[int] = []
        self.kept: list[int] = []
        self.depth: int | None = None
        self._slice = contextlib.ExitStack()
        self._flags: dict[int, bool] = {}

    def _measure(self, model: nn.Module) -> None:
        total = len(find_blocks(model).blocks)
        if self.order is not None and len(self.order) == total:
            return
        skip = set(identity_blocks(model)) if self.submodels == "whole" else set()
        self.order = [i for i in range(total) if i not in skip] + sorted(skip)
        self.needed = total - len(skip) if self.submodels == "whole" else 0

    def depths(self, model: nn.Module) -> list[int]:
        """Depths of the sub-models: multiples of ``block_size`` up to the full depth (always included); with
        ``submodels="whole"`` none below the blocks the function needs (that count itself included)."""
        self._measure(model)
        total = len(self.order)
        paper = set(range(self.block_size, total, self.block_size)) | {total}
        return sorted({d for d in paper if d >= self.needed} | ({self.needed} if self.needed else set()))

    def on_step_begin(self, model: nn.Module, step: int) -> bool:
        """In stage one: slice the model to a random sub-model and train only the blocks it added last (and the
        head where asked); replaces no parameters."""
        self.trained_blocks, self.kept, self.depth = [], [], None
        if step >= self.stage1_steps:
            return False
        depth = self.rng.choice(self.depths(model))
        blocks = find_blocks(model).blocks
        self._flags = {id(p): p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        self.trained_blocks = sorted(self.order[max(0, depth - self.block_size):depth])
        for i in self.trained_blocks:
            blocks[i].requires_grad_(True)
        if self.train_head:
            embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
            for p in head_params(model):
                p.requires_grad_(id(p) not in embeddings)
        self.depth, self.kept = depth, sorted(self.order[:depth])
        self._slice.enter_context(sliced_blocks(model, self.kept))
        return False

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Back to full depth, every parameter's trainable flag as before the step."""
        self._slice.close()  # full depth back
        for p in model.parameters():
            p.requires_grad_(self._flags.get(id(p), p.requires_grad))
        self._flags = {}


def hf_callback(two_stage: TwoStage):
    """The same schedule as a ``transformers.TrainerCallback`` (steps are ``state.global_step``). Under DDP
    (``torchrun``) every rank draws the same sub-models (the same seed); stage 1 leaves frozen blocks without a
    gradient, so DDP must look for unused parameters, as ``Trainer`` does by default.

    >>> cb = hf_callback(TwoStage(block_size=1, stage1_steps=5))
    >>> type(cb).__name__
    'TwoStageTrainerCallback'
    """
    from transformers import TrainerCallback

    class TwoStageTrainerCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if args.world_size > 1 and args.ddp_find_unused_parameters is False:
                raise ValueError("the two-stage callback freezes blocks in stage 1, so DDP must look for parameters "
                                 "without a gradient: leave TrainingArguments.ddp_find_unused_parameters unset "
                                 "(True for a model without activation checkpointing) or set it True")

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            two_stage.on_step_begin(model, state.global_step)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            two_stage.on_step_end(model, state.global_step - 1)  # the Trainer counted the step already

    return TwoStageTrainerCallback()
