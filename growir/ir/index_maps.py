"""Index maps: for a group of old size n grown to n', ``g: [n'] -> [n]`` (-1 at a fill position) and the copy
counts ``c_i = |g^-1(i)|``; composite axes (heads x head_dim, q | k | v) combine their parts' maps.

>>> m = tree_map(0, None, {0: GroupMap(2, 4, fpi_index(2, 4, None), torch.tensor([2, 2]))})
>>> m[0].tolist(), m[1].tolist(), m[2:]
([0, 1, 0, 1], [2, 2], (2, 4))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .axes import PROD, is_structured


@dataclass
class GroupMap:
    """How one group's axis grows from ``old`` to ``new`` positions: where each new position is copied from
    (``index``), how many copies each old one has (``counts``, the divisor of the consumers that read it), and
    what fills the positions that copy nothing.

    >>> import torch
    >>> m = GroupMap(2, 4, torch.tensor([0, 1, 0, 1]), torch.tensor([2, 2]))
    >>> m.uniform, m.as_copies() is m
    (True, True)
    """
    old: int
    new: int
    index: torch.Tensor  # [new] -> old position, or -1 at a fill position (repeat-and-fill)
    counts: torch.Tensor  # [old] copy counts
    fill: str | None = None  # what producers write at fill positions: "mean" (LayerNorm) or "zero" (RMSNorm)
    # ("interleave": rotary head_dim; "fresh": units whose consumers read zero, see per_unit.py; "random": fresh
    # units of the fresh width method, random producers and zero consumers, see fresh.py)
    copies: torch.Tensor | None = None  # "interleave"/"fresh": [new] -> the old position each new one sits beside

    def as_copies(self) -> "GroupMap":
        """The map by the old position each new one sits beside (``copies``) where a fill has one, else itself."""
        return GroupMap(self.old, self.new, self.copies, self.counts) if self.copies is not None else self

    @property
    def uniform(self) -> bool:
        """Whether every old position has as many copies as the others (a whole-number ratio)."""
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
