"""Find a model's stack of transformer blocks from its module structure, and cut or stack it in place.

The block list is the ``nn.ModuleList`` of blocks (children of one class whose parameters of one name have one
shape: identical blocks, or kinds of one stack such as dense and MoE layers) that holds the most parameters; no
table of architecture names is needed.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
...                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=256))
>>> find_blocks(m).path
'model.layers'
>>> with sliced_blocks(m, 2):
...     len(find_blocks(m).blocks)
2
>>> len(find_blocks(m).blocks)
3

A block whose residual writers are zero (growir's exact depth growth adds such blocks) is an identity: the
model computes the same function without it.

>>> block = m.model.layers[1]
>>> _ = block.self_attn.o_proj.weight.data.zero_(), block.mlp.down_proj.weight.data.zero_()
>>> identity_blocks(m)
[1]
>>> with sliced_blocks(m, [0, 2]) as kept:
...     [b.self_attn.layer_idx for b in kept]  # numbered by position while sliced (the KV cache's index)
[0, 1]
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..verify.compare import TOLERANCE, deviation


@dataclass(frozen=True)
class BlockStack:
    """Where the blocks live: ``getattr(parent, attr) is blocks``; ``path`` is the dotted module name."""
    parent: nn.Module
    attr: str
    path: str
    blocks: nn.ModuleList


def _one_stack(module: nn.ModuleList) -> bool:
    """Whether the children are blocks of one stack: one class, and a parameter name means one shape in all of
    them (a first-k-dense stack's dense and MoE layers are; stages of other widths are not)."""
    shapes = {}
    return len({type(child) for child in module}) == 1 and all(
        shapes.setdefault(n, tuple(p.shape)) == tuple(p.shape) for child in module for n, p in child.named_parameters())


def find_blocks(model: nn.Module) -> BlockStack:
    """The ``nn.ModuleList`` of blocks of one stack holding the most parameters (ValueError if there is none)."""
    best, best_size = None, -1
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not _one_stack(module):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = path, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks of one class; "
                         "pass a model built from repeated transformer layers")
    parent_path, _, attr = best.rpartition(".")
    parent = model.get_submodule(parent_path)
    return BlockStack(parent, attr, best, getattr(parent, attr))


def _set_depth(model: nn.Module, stack: BlockStack, blocks: nn.ModuleList) -> None:
    setattr(stack.parent, stack.attr, blocks)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(blocks)  # HF decoders iterate layers[: config.num_hidden_layers]


def _number(blocks, indices) -> None:
    for i, block in zip(indices, blocks):
        for module in block.modules():  # HF attention keeps its index for the KV cache
            if hasattr(module, "layer_idx"):
                module.layer_idx = i


@contextlib.contextmanager
def sliced_blocks(model: nn.Module, keep):
    """Run ``model`` as a sub-model (embeddings and head shared): its bottom ``keep`` blocks, or, for a list of
    indices, those blocks in model order; restore the full stack on exit. While sliced, the kept blocks are
    numbered by position (``layer_idx``), so a cache sized for the sub-model indexes them right."""
    stack = find_blocks(model)
    count = len(stack.blocks)
    indices = list(range(keep)) if isinstance(keep, int) else sorted(set(keep))
    if not indices or indices[0] < 0 or indices[-1] >= count:
        raise ValueError(f"sub-model {keep!r} is outside the {count} blocks of {stack.path}")
    config = getattr(model, "config", None)
    old_layers = getattr(config, "num_hidden_layers", None)
    kept = [stack.blocks[i] for i in indices]
    numbered = [(m, m.layer_idx) for block in kept for m in block.modules() if hasattr(m, "layer_idx")]
    _set_depth(model, stack, nn.ModuleList(kept))
    _number(kept, range(len(kept)))
    try:
        yield kept
    finally:
        for module, index in numbered:
            module.layer_idx = index
        setattr(stack.parent, stack.attr, stack.blocks)
        if old_layers is not None:
            config.num_hidden_layers = old_layers


def _probe_output(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out[0]


def identity_blocks(model: nn.Module, tokens: int = 8, seed: int = 0) -> list[int]:
    """The blocks the model's function does not need: dropping one alone leaves the output on a random token
    probe within growir's exactness bound (``TOLERANCE``, :mod:`growir.verify.compare`). growir's exact depth
    growth of a pre-norm model adds such blocks (zero residual writers); a stacked copy is not one. The model
    runs in eval mode (no dropout) for the probe and is put back as it was."""
    count = len(find_blocks(model).blocks)
    if count < 2:
        return []  # dropping the only block leaves no model
    vocab = model.get_input_embeddings().num_embeddings
    # a short probe: every position table holds 8 positions, and the model's config is not read (no field names)
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(next(model.parameters()).device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = _probe_output(model, ids)
            found = []
            for i in range(count):
                with sliced_blocks(model, [j for j in range(count) if j != i]):
                    if deviation(full, _probe_output(model, ids)) <= TOLERANCE:
                        found.append(i)
    finally:
        model.train(training)
    return found


def stack_blocks(model: nn.Module, depth: int) -> list[int]:
    """Grow to ``depth`` blocks in place, StackBERT-style: blocks 1..L then copies of 1..L again (the
    remainder from the top). Returns the indices of the new blocks.

    >>> from transformers import BertConfig, BertForMaskedLM
    >>> m = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                                intermediate_size=32, vocab_size=257))
    >>> stack_blocks(m, 4), m.config.num_hidden_layers
    ([2, 3], 4)
    """
    stack = find_blocks(model)
    old = list(stack.blocks)
    if depth < len(old):
        raise ValueError(f"cannot stack {stack.path} from {len(old)} down to {depth} blocks")
    extra = [copy.deepcopy(old[i % len(old)]) for i in range(depth - len(old))]
    _number(old + extra, range(depth))
    _set_depth(model, stack, nn.ModuleList(old + extra))
    return list(range(len(old), depth))
