"""Gathers along tensor axes as block copies: an index that is a few runs of consecutive positions (whole copies,
new units at the end) is copied a memory block at a time instead of element by element; -1 marks a fill
position, left zero for the rule to write (``tensor_rule.TensorRule``).
"""

from __future__ import annotations

import itertools
import math

import torch


def gather_axes(t: torch.Tensor, indexes: list) -> torch.Tensor:
    """``t`` gathered along every axis with an index (None: unchanged): where each index is a few runs of
    consecutive positions, one pass of block copies into the result, else one gather per axis.

    >>> gather_axes(torch.arange(4).reshape(2, 2), [torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1])]).tolist()
    [[1, 0, 1], [3, 2, 3], [1, 0, 1]]
    """
    mapped = [(a, i) for a, i in enumerate(indexes) if i is not None]
    runs = {a: _runs(i) for a, i in mapped} if not t.is_meta else {}
    blocks = 1
    for r in runs.values():
        blocks = blocks * len(r) if r is not None and all(f >= 0 for _, f, _ in r) else 1 << 30
    if not mapped or t.is_meta or blocks > 64:
        for a, i in mapped:
            t = gather(t, a, i)
        return t
    shape = [len(i) if i is not None else n for i, n in zip(list(indexes) + [None] * t.dim(), t.shape)]
    out = torch.empty(shape, dtype=t.dtype, device=t.device)
    axes = [a for a, _ in mapped]
    for combo in itertools.product(*(runs[a] for a in axes)):
        dst, src = out, t
        for a, (start, first, n) in zip(axes, combo):
            dst, src = dst.narrow(a, start, n), src.narrow(a, first, n)
        dst.copy_(src)
    return out


def _runs(index: torch.Tensor):
    """[(new start, old start, length)] of the runs of consecutive positions in ``index`` (a run of -1, a fill,
    has old start -1); None where there are many (a scattered gather)."""
    index = index.cpu()
    if len(index) == 0:
        return None
    step = index[1:] - index[:-1]
    breaks = (((step != 1) & (index[1:] >= 0)) | ((index[1:] < 0) != (index[:-1] < 0))).nonzero().flatten() + 1
    if len(breaks) + 1 > max(8, len(index) // 32):
        return None
    starts = [0] + breaks.tolist()
    ends = starts[1:] + [len(index)]
    return [(s, f, e - s) for s, f, e in zip(starts, index[starts].clamp(min=-1).tolist(), ends)]


def gather(t: torch.Tensor, axis: int, index: torch.Tensor, zero_holes: bool = True) -> torch.Tensor:
    """``t.index_select(axis, index)`` with zeros at the positions where ``index`` is -1 (a fill, written later;
    ``zero_holes=False`` leaves them unset for a caller that writes every one of them),
    as block copies where the index is a few runs of consecutive positions (whole copies: 0..n-1, 0..n-1),
    which copy memory blocks instead of gathering element by element (several times faster along a last axis).
    Both copy values only: the result is the same, bitwise.

    >>> gather(torch.arange(6).reshape(2, 3), 1, torch.tensor([0, 1, 2, 0, 1, 2, 1])).tolist()
    [[0, 1, 2, 0, 1, 2, 1], [3, 4, 5, 3, 4, 5, 4]]
    >>> gather(torch.arange(6).reshape(2, 3), 1, torch.tensor([2, 0, -1, -1])).tolist()
    [[2, 0, 0, 0], [5, 3, 0, 0]]
    """
    runs = None if t.is_meta else _runs(index)
    if runs is None:  # scattered: one gather is faster than many slices
        out = t.index_select(axis, index.clamp(min=0).to(t.device))
        holes = (index < 0).nonzero().flatten()
        return out.index_fill_(axis, holes.to(t.device), 0) if len(holes) and zero_holes else out
    shape = list(t.shape)
    shape[axis] = len(index)
    out = torch.empty(shape, dtype=t.dtype, device=t.device)
    for start, first, n in runs:
        part = out.narrow(axis, start, n)
        if first >= 0:
            part.copy_(t.narrow(axis, first, n))
        elif zero_holes:
            part.zero_()
    return out


def put_at(new: torch.Tensor, axis: int, at: torch.Tensor, values: torch.Tensor | None) -> None:
    """``new``'s positions ``at`` along ``axis`` set to ``values`` (zero where None), in place; one slice
    where the positions are consecutive (new units at the end)."""
    if len(at) == 0:
        return
    first, n = int(at[0]), len(at)
    if int(at[-1]) - first + 1 == n:  # sorted (nonzero's order) and consecutive
        part = new.narrow(axis, first, n)
        part.zero_() if values is None else part.copy_(values)
    elif values is None:
        new.index_fill_(axis, at.to(new.device), 0)
    else:
        new.index_copy_(axis, at.to(new.device), values.to(new.device, new.dtype))


def gather_fill(t: torch.Tensor, indexes: list, fills: list, scale: float = 1.0) -> torch.Tensor | None:
    """What gathering ``t`` along each axis in turn and then writing that axis's fill positions (-1) computes,
    times ``scale``, in one pass of block copies into the result (no intermediate tensor per axis). ``fills[a]``
    holds axis a's fill values at the shape the tensor has at that step (new sizes before a, the fill count at
    a, old sizes after; None: zeros). A later axis's gather copies filled entries like any others, so a block's
    values come from the fill of its last axis at a fill position, or from ``t``. None where an index is
    scattered (many runs) or the blocks are too many: the caller goes axis by axis.

    >>> t = torch.ones(2, 2)
    >>> gather_fill(t, [torch.tensor([0, 1, -1]), torch.tensor([0, 1, -1])], [torch.full((1, 2), 5.0), None]).tolist()
    [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 0.0]]
    """
    plans = [[(0, 0, n, 0)] if i is None else _ranked(i) for i, n in zip(indexes, t.shape)]
    if any(p is None for p in plans) or math.prod(len(p) for p in plans) > 64:
        return None
    out = torch.empty([sum(n for _, _, n, _ in p) for p in plans], dtype=t.dtype, device=t.device)
    for combo in itertools.product(*plans):
        dst = out
        for a, (start, _, n, _) in enumerate(combo):
            dst = dst.narrow(a, start, n)
        last = max((a for a, (_, first, _, _) in enumerate(combo) if first < 0), default=None)
        if last is not None and fills[last] is None:
            dst.fill_(0.0 * scale)  # zeros times the scale: -0.0 where it is negative, as a multiplication gives
            continue
        src = t if last is None else fills[last]
        for a, (start, first, n, rank) in enumerate(combo):  # new positions before the fill axis, old after
            src = src.narrow(a, start if last is not None and a < last else rank if a == last else first, n)
        dst.copy_(src)
        if scale != 1.0:
            dst.mul_(scale)
    return out


def _ranked(index: torch.Tensor):
    """``_runs`` with, per run, its rank among the fill positions (where a fill run's values start in a
    fill tensor that holds one entry per -1, in order)."""
    runs = _runs(index)
    if runs is None:
        return None
    out, filled = [], 0
    for start, first, n in runs:
        out.append((start, first, n, filled))
        filled += n if first < 0 else 0
    return out

