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

from ..analysis.axes import CAT, PROD
from ..plan import Plan
from .tensor_rule import AxisMap, TensorRule


@dataclass
class GroupMap:
    old: int
    new: int
    index: torch.Tensor  # [new] -> old position
    counts: torch.Tensor  # [old] copy counts

    @property
    def uniform(self) -> bool:
        return bool((self.counts == self.counts[0]).all())


def fpi_index(old: int, new: int, gen: torch.Generator) -> torch.Tensor:
    """Whole copies first (balanced), then the remainder drawn at random without replacement (bert2BERT)."""
    reps, rem = divmod(new, old)
    base = torch.arange(old).repeat(reps)
    extra = torch.randperm(old, generator=gen)[:rem].sort().values
    return torch.cat([base, extra])


def group_maps(plan: Plan, sizes: dict, seed: int = 0, index_fn=fpi_index) -> dict:
    """A ``GroupMap`` per grown group root."""
    gen = torch.Generator().manual_seed(seed)
    maps = {}
    for g in plan.groups:
        new = sizes.get(g.id, g.size)
        if g.size is not None and new != g.size:
            index = index_fn(g.size, new, gen)
            maps[g.root] = GroupMap(g.size, new, index, torch.bincount(index, minlength=g.size))
    return maps


def tree_map(tree, ag, maps: dict):
    """(index, counts, old size, new size) of an axis tree; index/counts None when nothing in it grew."""
    if isinstance(tree, tuple) and len(tree) == 2 and tree[0] in (PROD, CAT) and isinstance(tree[1], list):
        kind, parts = tree
        sub = [tree_map(t, ag, maps) for t in parts]
        if all(s[0] is None for s in sub):
            return None, None, _combine_size(kind, [s[2] for s in sub]), _combine_size(kind, [s[3] for s in sub])
        sub = [(s[0] if s[0] is not None else torch.arange(int(s[2])),
                s[1] if s[1] is not None else torch.ones(int(s[2]), dtype=torch.long), int(s[2]), int(s[3]))
               for s in sub]
        return (_prod(sub) if kind == PROD else _cat(sub)) + (_combine_size(kind, [s[2] for s in sub]),
                                                              _combine_size(kind, [s[3] for s in sub]))
    m = maps.get(tree)
    if m is None:
        size = ag.size[tree]
        return None, None, size, size
    return m.index, m.counts, m.old, m.new


def _combine_size(kind, sizes):
    out = 1 if kind == PROD else 0
    for s in sizes:
        out = out * s if kind == PROD else out + s
    return out


def _prod(sub):
    index, counts, stride = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), 1
    for g, c, old, _ in sub:
        index = (index[:, None] * old + g[None, :]).reshape(-1)
        counts = (counts[:, None] * c[None, :]).reshape(-1)
    return index, counts


def _cat(sub):
    offsets, index, counts, off = [], [], [], 0
    for g, c, old, _ in sub:
        index.append(g + off)
        counts.append(c)
        off += old
    return torch.cat(index), torch.cat(counts)


@dataclass
class WidthResult:
    rules: dict = field(default_factory=dict)  # state name -> TensorRule
    axis_trees: dict = field(default_factory=dict)  # state name -> [tree per axis]
    tied: list = field(default_factory=list)  # (param, axis) both copied and contracted (tied embeddings)


def width_rules(plan: Plan, maps: dict) -> WidthResult:
    """Per-tensor rules for every parameter and buffer the graph reads."""
    f, ag, res = plan.facts, plan.facts.ag, WidthResult()
    consumed = {(p, ag.find(a)) for p, a, _ in f.consumed}
    for node_name, state in {**f.params, **f.buffers}.items():
        trees, axes = [], []
        for i, axis in enumerate(f.axes.get(node_name, [])):
            tree = ag.expand(axis)
            index, counts, _, _ = tree_map(tree, ag, maps)
            contracted = (state, ag.find(axis)) in consumed
            if contracted and state in f.produced and index is not None:
                res.tied.append((state, i))
                contracted = False  # copied for the embedding; the contraction is compensated elsewhere
            axes.append(AxisMap(index, counts if contracted and index is not None else None))
            trees.append(tree)
        res.rules[state] = TensorRule(state, axes)
        res.axis_trees[state] = trees
    for alias, canonical in f.aliases.items():
        res.rules[alias] = res.rules[canonical]
    return res
