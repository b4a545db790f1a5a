"""Width growth by index maps (bert2BERT's function-preserving initialization, Net2Net's rule).

For a group of old size n grown to n', ``g: [n'] -> [n]`` is the identity on the first n positions; with
copy counts ``c_i = |g^-1(i)|``:

    producer axis (a parameter writes the group):     W'[j] = W[g(j)]
    consumer axis (a parameter contracts the group):  W'[j] = W[g(j)] / c_g(j)

Summing the consumer's copies gives back the old pre-activation, and elementwise ops in between commute
with copying. Composite axes (heads x head_dim, q | k | v) combine their parts' maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..ir.axes import is_structured, tree_leaves
from ..analysis.plan import Plan
from ..frontend.folder import named_tensors
from ..ir.tensor_rule import AxisMap, TensorRule
from ..ir.index_maps import GroupMap, fpi_index, fill_index, interleave_index, tree_map

UNREAD = "unused by the forward"  # the note of a tensor's rule where no node of the graph reads it


def group_maps(plan: Plan, sizes: dict, seed: int = 0, index_fn=fpi_index, fills: dict | None = None,
               one_copy: bool = False) -> dict:
    """A ``GroupMap`` per grown group root; groups in ``fills`` (root -> fill kind) repeat and fill (with
    ``one_copy``: the old units once, the rest filled), or interleave (rotary frequencies, fill kind
    "interleave": zero rows between)."""
    gen = torch.Generator().manual_seed(seed)
    maps, fills = {}, fills or {}
    for g in plan.groups:
        new = sizes.get(g.id, g.size)
        if g.size is not None and new != g.size:
            if fills.get(g.root) == "interleave":
                index = interleave_index(g.size, new)
            elif g.root in fills:
                index = fill_index(g.size, new, 1 if one_copy else None)
            else:
                index = index_fn(g.size, new, gen)
            counts = torch.bincount(index[index >= 0], minlength=g.size)
            copies = torch.arange(new) // (new // g.size) if fills.get(g.root) == "interleave" else None
            maps[g.root] = GroupMap(g.size, new, index, counts, fills.get(g.root), copies)
    return maps


@dataclass
class WidthResult:
    """The width stage's output: a TensorRule per state name, the axis trees that made them, and the tied
    (param, axis) pairs."""
    rules: dict = field(default_factory=dict)  # state name -> TensorRule
    axis_trees: dict = field(default_factory=dict)  # state name -> [tree per axis]
    tied: list = field(default_factory=list)  # (param, axis) both copied and contracted (tied embeddings)


def width_rules(plan: Plan, maps: dict) -> WidthResult:
    """Per-tensor rules for every parameter and buffer the graph reads."""
    f, ag, res = plan.facts, plan.facts.ag, WidthResult()
    consumed = {(p, i) for p, i, _ in f.consumed}
    for node_name, state in {**f.params, **f.buffers}.items():
        trees, axes = [], []
        for i, axis in enumerate(f.axes.get(node_name, [])):
            tree = ag.expand(axis)
            index, counts, _, _ = tree_map(tree, ag, maps)
            contracted = (state, i) in consumed
            tied = contracted and state in f.produced and index is not None
            if tied:
                res.tied.append((state, i))
                contracted = False  # copied for the embedding; the contraction is compensated elsewhere
            fill, source = None, None
            if index is not None and bool((index < 0).any()):
                fill = "zero" if contracted else _fill_kind(tree, maps)
                # fresh units tied (an embedding read as the head): random as the producer, but the head must read
                # 0 there (as any consumer of a fresh unit does), and zero is both
                fill = "zero" if tied and fill == "random" else fill
                if not contracted and any(maps[leaf].copies is not None for leaf in tree_leaves(tree) if leaf in maps):
                    # rotary growth: only the query must be zero at the new dimensions (attention.py zeroes
                    # its rows); keys, norms and tables copy a neighbour so that the new dimensions train
                    source = tree_map(tree, ag, {r: m.as_copies() for r, m in maps.items()})[0]
                    fill = "geometric" if state in f.buffers.values() else "copy"
                if fill == "random" and state in f.variances:  # a variance drawn around zero: NaN at its root
                    fill = "mean" if not is_structured(tree) else "zero"
            axes.append(AxisMap(index, counts if contracted and index is not None else None, fill, source=source))
            trees.append(tree)
        res.rules[state] = TensorRule(state, axes)
        res.axis_trees[state] = trees
    for alias, canonical in f.aliases.items():
        res.rules[alias] = res.rules[canonical]
    gm = plan.captured.gm
    for name, t in named_tensors(gm):
        if name not in res.rules:  # a tensor the traced forward never reads: carried over unchanged
            res.rules[name] = TensorRule(name, [AxisMap() for _ in t.shape], notes=[UNREAD])
    return res


def _fill_kind(tree, maps: dict) -> str:
    """What a producer writes at fill positions: a plain axis says; inside a composite axis only zero works,
    or random where every filled part is fresh units."""
    m = maps.get(tree) if not is_structured(tree) else None
    if m is not None and m.fill is not None:
        return {"interleave": "zero", "fresh": "zero", "random": "random"}.get(m.fill, m.fill)
    kinds = {maps[leaf].fill for leaf in tree_leaves(tree) if leaf in maps and maps[leaf].fill is not None}
    if kinds == {"random"}:
        return "random"
    if kinds <= {"zero", "interleave", "fresh", "random"}:
        return "zero"
    raise ValueError("a mean fill inside a composite axis: repeat-and-fill applies to plain axes only")

