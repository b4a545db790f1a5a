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

from ..analysis.axes import PROD, is_structured, tree_leaves
from ..plan import Plan
from .tensor_rule import AxisMap, TensorRule


@dataclass
class GroupMap:
    old: int
    new: int
    index: torch.Tensor  # [new] -> old position, or -1 at a fill position (repeat-and-fill)
    counts: torch.Tensor  # [old] copy counts
    fill: str | None = None  # what producers write at fill positions: "mean" (LayerNorm) or "zero" (RMSNorm)
    # ("interleave": rotary head_dim; "fresh": units whose consumers read zero, see per_unit.py; "random": fresh
    # units of the fresh width method, random producers and zero consumers, see fresh.py)
    copies: torch.Tensor | None = None  # "interleave"/"fresh": [new] -> the old position each new one sits beside

    def as_copies(self) -> "GroupMap":
        return GroupMap(self.old, self.new, self.copies, self.counts) if self.copies is not None else self

    @property
    def uniform(self) -> bool:
        return bool((self.counts == self.counts[0]).all())


def fpi_index(old: int, new: int, gen: torch.Generator) -> torch.Tensor:
    """Balanced: whole copies first, then the remainder drawn at random without replacement."""
    reps, rem = divmod(new, old)
    base = torch.arange(old).repeat(reps)
    extra = torch.randperm(old, generator=gen)[:rem].sort().values
    return torch.cat([base, extra])


def random_index(old: int, new: int, gen: torch.Generator) -> torch.Tensor:
    """bert2BERT's mapping: each new position copies an old one drawn uniformly at random (with replacement)."""
    return torch.cat([torch.arange(old), torch.randint(0, old, (new - old,), generator=gen)])


def fill_index(old: int, new: int, reps: int | None = None) -> torch.Tensor:
    """Repeat-and-fill (LEMON): n = new // old whole copies (or ``reps``), then fill positions marked -1."""
    reps = new // old if reps is None else reps
    return torch.cat([torch.arange(old).repeat(reps), torch.full((new - reps * old,), -1, dtype=torch.long)])


def interleave_index(old: int, new: int) -> torch.Tensor:
    """Rotary frequencies: old pair j becomes new pair k·j (the same frequency at head_dim k·d); the pairs in
    between are fill positions (-1) whose query/key rows are zero."""
    k = new // old
    i = torch.arange(new)
    return torch.where(i % k == 0, i // k, -1)


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


def tree_map(tree, ag, maps: dict):
    """(index, counts, old size, new size) of an axis tree; index/counts None when nothing in it grew."""
    if is_structured(tree):
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
    """Row-major combination; a fill position in any part makes the combined position a fill (-1)."""
    index, counts = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)
    for g, c, old, _ in sub:
        combined = index[:, None] * old + g[None, :]
        index = torch.where((index[:, None] < 0) | (g[None, :] < 0), -1, combined).reshape(-1)
        counts = (counts[:, None] * c[None, :]).reshape(-1)
    return index, counts


def _cat(sub):
    index, counts, off = [], [], 0
    for g, c, old, _ in sub:
        index.append(torch.where(g >= 0, g + off, -1))
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
    consumed = {(p, i) for p, i, _ in f.consumed}
    for node_name, state in {**f.params, **f.buffers}.items():
        trees, axes = [], []
        for i, axis in enumerate(f.axes.get(node_name, [])):
            tree = ag.expand(axis)
            index, counts, _, _ = tree_map(tree, ag, maps)
            contracted = (state, i) in consumed
            if contracted and state in f.produced and index is not None:
                res.tied.append((state, i))
                contracted = False  # copied for the embedding; the contraction is compensated elsewhere
            fill, source = None, None
            if index is not None and bool((index < 0).any()):
                fill = "zero" if contracted else _fill_kind(tree, maps)
                if not contracted and any(maps[leaf].copies is not None for leaf in tree_leaves(tree) if leaf in maps):
                    # rotary growth: only the query must be zero at the new dimensions (attention.py zeroes
                    # its rows); keys, norms and tables copy a neighbour so that the new dimensions train
                    source = tree_map(tree, ag, {r: m.as_copies() for r, m in maps.items()})[0]
                    fill = "geometric" if state in f.buffers.values() else "copy"
            axes.append(AxisMap(index, counts if contracted and index is not None else None, fill, source=source))
            trees.append(tree)
        res.rules[state] = TensorRule(state, axes)
        res.axis_trees[state] = trees
    for alias, canonical in f.aliases.items():
        res.rules[alias] = res.rules[canonical]
    gm = plan.captured.gm
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        if name not in res.rules:  # a tensor the traced forward never reads: carried over unchanged
            res.rules[name] = TensorRule(name, [AxisMap() for _ in t.shape], notes=["unused by the forward"])
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

