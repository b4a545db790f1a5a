"""Consumer copies split by random shares instead of 1/count: ``sum_k f_k·W·x = W·x`` where the copies' inputs
are equal, with the stored shares made to sum exactly to the old weight (``TensorRule``'s ``split`` axes).
"""

from __future__ import annotations

import torch


def split_factors(shape, axis: int, index: torch.Tensor, bounds: tuple, seed: int,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-element weights for a consumer axis's copies instead of 1/count: uniform draws in ``bounds``,
    divided by their sum over each old position's copies, so they sum to 1 there (a single copy gets exactly 1,
    a fill position 1). ``sum_k f_k·W·x = W·x`` because the copies' inputs are equal; the factors stay within
    [lo/(lo+(c-1)·hi), hi/(hi+(c-1)·lo)], so nothing is amplified (unlike cancelling noise). Drawn in
    ``dtype`` (the rule's compute dtype): the stored shares are made to sum exactly by ``exact_shares``.

    >>> f = split_factors((3, 4), 1, torch.tensor([0, 1, 0, 1]), (0.25, 0.75), seed=0)
    >>> torch.allclose(f[:, :2] + f[:, 2:], torch.ones(3, 2)), bool((f > 0.24).all())
    (True, True)
    """
    lo, hi = bounds
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(tuple(shape), generator=gen, dtype=dtype).mul_(hi - lo).add_(lo).movedim(axis, 0)
    live = index >= 0
    g = index.clamp(min=0)
    sums = torch.zeros((int(g.max()) + 1,) + u.shape[1:], dtype=u.dtype).index_add_(0, g[live], u[live])
    f = u / sums[g]
    f[~live] = 1.0
    return f.movedim(0, axis)


def exact_shares(whole: torch.Tensor, shares: torch.Tensor, factors: torch.Tensor, axis: int,
                 index: torch.Tensor) -> torch.Tensor:
    """``shares`` (copies of ``whole`` along ``axis`` by ``index``, times ``factors``) with each old position's
    smallest share replaced by the whole minus the others, so the stored shares sum to the old weight: with two
    copies exactly (the other share is at least half the whole, so the subtraction is exact, Sterbenz's lemma),
    with more up to one rounding. ``fl(w·a) + fl(w·(1-a))`` is not ``w``: that error, amplified by a norm over
    a few dimensions, moved a tiny model's outputs by 2e-5 even in float64.

    >>> w = torch.tensor([0.1, 0.7]); i = torch.tensor([0, 1, 0, 1]); f = torch.tensor([0.3, 0.6, 0.7, 0.4])
    >>> s = exact_shares(w, w[i] * f, f, 0, i); bool(((s[:2] + s[2:]) == w).all())
    True
    """
    live = index >= 0
    g = index.clamp(min=0)
    moved, f, w = shares.movedim(axis, 0), factors.movedim(axis, 0).to(shares.device), whole.movedim(axis, 0)
    rest = (-1,) + (1,) * (f.dim() - 1)
    big = torch.full(w.shape, float("inf"), dtype=f.dtype, device=f.device)
    smallest = big.scatter_reduce(0, g.view(rest).expand_as(f), f.masked_fill(~live.view(rest), float("inf")), "amin")
    counts = torch.bincount(g[live], minlength=len(w))
    tied = (f == smallest[g]) & (live & (counts[g] > 1)).view(rest)
    # one mark per old position: copies whose factors tie (float32 draws do, a few in a million) would each
    # take the whole minus the others, and the stored shares would sum to more than the old weight
    pos = torch.arange(len(g), dtype=torch.int32, device=f.device).view(rest).expand_as(f)
    last = len(g)
    first = torch.full(w.shape, last, dtype=pos.dtype, device=f.device).scatter_reduce(
        0, g.view(rest).expand_as(f), pos.masked_fill(~tied, last), "amin")
    mark = tied & (pos == first[g])
    others = torch.zeros_like(w).index_add_(0, g[live], moved.masked_fill(mark, 0)[live])
    return torch.where(mark, w[g] - others[g], moved).movedim(0, axis)
