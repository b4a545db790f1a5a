"""Tensors the traced forward never reads: a causal LM's cross-attention (no encoder states given), a pooler the
head skips, visual position embeddings with no visual input.

No axis of the graph reaches them, so their rules keep the old shapes (``passes/width.py``: ``UNREAD``). They do
not change the function, whatever they hold: a rebuilt class takes its own initialisation at the shape its config
gives them (what ``from_pretrained`` does for keys a checkpoint lacks), and the config search matches their shapes
as any size; a rewritten GraphModule keeps them unchanged. The record says which, either way.
"""

from __future__ import annotations

import torch

from ..passes.width import UNREAD


def unread_names(rules: dict) -> set:
    """The state names whose rule says the forward never reads them.

    >>> from growir.ir.tensor_rule import TensorRule
    >>> sorted(unread_names({"a": TensorRule("a", [], notes=[UNREAD]), "b": TensorRule("b", [])}))
    ['a']
    """
    return {name for name, rule in rules.items() if UNREAD in rule.notes}


def any_size(expected: dict, unread: set) -> dict:
    """``expected`` (name -> grown shape) with every axis of an unread tensor matching any size (None).

    >>> any_size({"w": (4, 8), "b": (4,)}, {"b"})
    {'w': (4, 8), 'b': (None,)}
    """
    return {k: (None,) * len(v) if k in unread else v for k, v in expected.items()}


def init_own(new: torch.nn.Module, unread: set, state: dict) -> list:
    """Give each unread parameter of ``new`` (built with its parameters on the meta device) whose rebuilt shape
    differs from the grown tensor's the class's own initialisation at that shape, on the grown tensors' device and
    in their dtype (zeros where the class's ``_init_weights`` does not touch it); the names, sorted. An unread
    buffer of another shape keeps the class's own value."""
    fresh, owners = [], {}
    for name in sorted(unread & set(new.state_dict())):
        *path, leaf = name.split(".")
        owner = new.get_submodule(".".join(path))
        mine = owner._parameters.get(leaf, owner._buffers.get(leaf))
        if mine is None or tuple(mine.shape) == tuple(state[name].shape):
            continue
        fresh.append(name)
        if leaf in owner._parameters:
            like = state[name]
            owner._parameters[leaf] = torch.nn.Parameter(torch.zeros(mine.shape, dtype=like.dtype, device=like.device),
                                                         requires_grad=mine.requires_grad)
            owners[id(owner)] = (path, owner)
    for path, owner in owners.values():
        with torch.no_grad():
            _initialiser(new, path)(owner)
    return fresh


def _initialiser(root: torch.nn.Module, path: list):
    """The ``_init_weights`` of the innermost Hugging Face model on ``path`` (a composite model's part initialises
    its own modules), or a no-op for a module outside any."""
    found = getattr(root, "_init_weights", None)
    module = root
    for part in path:
        module = getattr(module, part)
        found = getattr(module, "_init_weights", found) if hasattr(module, "config") else found
    return found or (lambda module: None)


def unread_note(fresh: list, kept: list) -> list:
    """The record's note: which unread tensors took the rebuilt class's initialisation (``fresh``), or were kept
    unchanged in a GraphModule (``kept``); empty where there were none.

    >>> unread_note([], ["pooler.dense.weight"])[0][:60]
    '1 tensor(s) the traced forward never reads (`pooler.dense.we'
    """
    if fresh:
        return [f"{len(fresh)} tensor(s) the traced forward never reads ({_names(fresh)}) have the rebuilt class's "
                f"own initialisation at the shape its config gives them: they do not change the function"]
    if kept:
        return [f"{len(kept)} tensor(s) the traced forward never reads ({_names(kept)}) were not grown: the "
                f"GraphModule keeps them unchanged, and they do not change its function"]
    return []


def _names(names: list) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def own_initialised(grown: torch.nn.Module, built) -> list:
    """The unread tensors of ``built`` (rules, grown state) that the rebuilt ``grown`` holds at another shape:
    those it initialised itself."""
    mine = grown.state_dict()
    return sorted(k for k in unread_names(built.record.rules)
                  if k in mine and k in built.state and mine[k].shape != built.state[k].shape)


def kept_note(built) -> list:
    """The record's note where ``built`` returns the rewritten GraphModule: its unread tensors were not grown."""
    if not isinstance(built.grown, torch.fx.GraphModule):
        return []
    return unread_note([], sorted(unread_names(built.record.rules)))
