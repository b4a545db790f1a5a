"""Find a model's stack of transformer blocks from its module structure, and cut or stack it in place.

The block list is the ``nn.ModuleList`` whose children are identical modules (same class, same parameter
shapes) and that holds the most parameters; no table of architecture names is needed.

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
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockStack:
    """Where the blocks live: ``getattr(parent, attr) is blocks``; ``path`` is the dotted module name."""
    parent: nn.Module
    attr: str
    path: str
    blocks: nn.ModuleList


def _signature(module: nn.Module) -> tuple:
    return (type(module),) + tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def find_blocks(model: nn.Module) -> BlockStack:
    """The ``nn.ModuleList`` of identical children holding the most parameters (ValueError if there is none)."""
    best, best_size = None, -1
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({_signature(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = path, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of identical blocks; "
                         "pass a model built from repeated transformer layers")
    parent_path, _, attr = best.rpartition(".")
    parent = model.get_submodule(parent_path)
    return BlockStack(parent, attr, best, getattr(parent, attr))


def _set_depth(model: nn.Module, stack: BlockStack, blocks: nn.ModuleList) -> None:
    setattr(stack.parent, stack.attr, blocks)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(blocks)  # HF decoders iterate layers[: config.num_hidden_layers]


@contextlib.contextmanager
def sliced_blocks(model: nn.Module, depth: int):
    """Run ``model`` as its bottom ``depth`` blocks (embeddings and head shared); restore the full stack on exit."""
    stack = find_blocks(model)
    if not 1 <= depth <= len(stack.blocks):
        raise ValueError(f"depth {depth} is outside 1..{len(stack.blocks)} for {stack.path}")
    config = getattr(model, "config", None)
    old_layers = getattr(config, "num_hidden_layers", None)
    _set_depth(model, stack, nn.ModuleList(list(stack.blocks)[:depth]))
    try:
        yield stack.blocks[:depth]
    finally:
        setattr(stack.parent, stack.attr, stack.blocks)
        if old_layers is not None:
            config.num_hidden_layers = old_layers


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
    for i, block in enumerate(old + extra):
        for module in block.modules():  # HF attention keeps its index for the KV cache
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
    _set_depth(model, stack, nn.ModuleList(old + extra))
    return list(range(len(old), depth))
