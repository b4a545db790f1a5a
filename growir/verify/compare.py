"""One comparison of a grown output with its source's, shared by every check growir makes: the self-measure of
each ``grow`` (:mod:`growir.verify.measure`), the ONNX Runtime check (:mod:`growir.verify.onnx_check`), the
block-by-block check of two folders (:mod:`growir.verify.blocks`) and the config search's rebuild check.

Alignment. A grown output is wider than its source's along the axes that grew. :func:`map_source_output` maps
the source output ``s`` into the grown coordinates by the plan's index maps (:func:`output_maps`, one per
flat output and axis: grown position -> source position), giving ``expected`` and the ``index`` of the grown
output ``g`` that must equal it.

Deviation. With ``Δ = g[index] - expected`` and the relative scale ``max(1, max|expected|)``,

    deviation = max|Δ| / max(1, max|expected|)

absolute for outputs of magnitude up to 1 and relative to the output's largest magnitude beyond that. A
growth is exact when, in float32, ``deviation <= TOLERANCE`` on every output: only the order of summation
changed. That is the bound ``|Δ_i| <= atol * max(1, max|expected|) + rtol * |expected_i|`` (:func:`bound`) with
``atol = TOLERANCE`` and ``rtol = 0``; the ONNX check applies the same bound with its own ``atol``/``rtol``.
A NaN on one side only never passes; NaN on both sides counts as equal (:func:`abs_diff`).

>>> import torch
>>> source = torch.tensor([[1.0, -4.0]])
>>> grown = torch.tensor([[1.0, -4.0, 1.0]])           # the hidden axis grew 2 -> 3: position 2 copies 0
>>> deviation(source, grown, [None, torch.tensor([0, 1, 0])])
0.0
>>> deviation(source, grown + 2e-5, [None, torch.tensor([0, 1, 0])]) <= TOLERANCE  # 2e-5 / max(1, 4)
True
"""

from __future__ import annotations

import math

import torch

from ..ir.index_maps import tree_map

__all__ = ["TOLERANCE", "output_maps", "axis_maps", "map_source_output", "relative_scale", "abs_diff", "bound",
           "deviation"]

TOLERANCE = 1e-5  # deviation <= TOLERANCE in float32 counts as exact (a function-preserving growth measures ~1e-6)


def output_maps(plan, maps: dict) -> list:
    """Per flat graph output, per axis: the index map (new position -> source position) or None.

    ``maps``: the width index maps (group root -> ``GroupMap``) the plan's growth made.
    """
    return [axis_maps(plan, axes, maps) for axes in plan.facts.outputs]


def axis_maps(plan, axes, maps: dict) -> list | None:
    """Per axis of one graph value (its axis ids, ``plan.facts.axes[node]``): the index map or None."""
    if not axes:
        return None
    return [tree_map(plan.facts.ag.expand(axis), plan.facts.ag, maps)[0] for axis in axes]


def map_source_output(source_out: torch.Tensor, grown_shape, maps=None) -> tuple[torch.Tensor, tuple]:
    """Align a source output with a grown output: ``grown_out[index]`` should equal ``expected``.

    ``maps`` has one entry per axis: None (the axis is unchanged, or grew keeping the source's indices
    first) or a LongTensor ``g`` of length ``grown_shape[axis]`` with ``g[j]`` = the source index that
    grown index ``j`` copies; mapped axes compare ``source_out.index_select(axis, g)`` with the whole grown
    axis. An unmapped axis that grew compares the leading slice ``grown_out[..., :old]`` (growir's maps
    are the identity on the first ``old`` indices). Raises ValueError for shapes that cannot correspond.

    >>> s = torch.tensor([[1., 2., 3.]])
    >>> expected, index = map_source_output(s, (1, 5), [None, torch.tensor([0, 1, 2, 0, 2])])
    >>> expected.tolist(), index
    ([[1.0, 2.0, 3.0, 1.0, 3.0]], (slice(None, None, None), slice(None, None, None)))
    >>> map_source_output(s, (1, 5))[1]
    (slice(None, None, None), slice(0, 3, None))
    """
    grown_shape = tuple(grown_shape)
    if source_out.dim() != len(grown_shape):
        raise ValueError(f"source output has shape {tuple(source_out.shape)} but grown output {grown_shape}: "
                         "a growth changes sizes, never the number of axes")
    if maps is not None and len(maps) != source_out.dim():
        raise ValueError(f"output map has {len(maps)} axes but the output has {source_out.dim()}")
    expected, index = source_out, []
    for axis, (old, new) in enumerate(zip(source_out.shape, grown_shape)):
        g = None if maps is None else maps[axis]
        if g is not None:
            g = torch.as_tensor(g, dtype=torch.long, device=source_out.device)
            if g.dim() != 1 or len(g) != new or (len(g) and (int(g.min()) < -1 or int(g.max()) >= old)):
                raise ValueError(f"output map of axis {axis} must be {new} source indices in [0, {old}) "
                                 f"(or -1 for a fill position); got shape {tuple(g.shape)}")
            if bool((g < 0).any()):  # fill positions (repeat-and-fill) copy nothing: compare the copies
                keep = (g >= 0).nonzero().squeeze(1)
                expected = expected.index_select(axis, g[keep])
                index.append(keep)
                continue
            expected = expected.index_select(axis, g)
            index.append(slice(None))
        elif new >= old:
            index.append(slice(None) if new == old else slice(0, old))
        else:
            raise ValueError(f"axis {axis} shrank from {old} to {new}: a grown output cannot be narrower")
    return expected, tuple(index)


def relative_scale(expected: torch.Tensor) -> float:
    """``max(1, max|expected|)``: what an output's deviation is relative to (1 for an empty output).

    >>> relative_scale(torch.tensor([0.5, -3.0])), relative_scale(torch.tensor([0.5]))
    (3.0, 1.0)
    """
    return max(1.0, float(expected.abs().max())) if expected.numel() else 1.0


def abs_diff(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``|got - expected|``, infinite where exactly one side is NaN (never within tolerance), 0 where both are.

    >>> nan = float("nan")
    >>> abs_diff(torch.tensor([1.0, nan, nan]), torch.tensor([3.0, 0.0, nan])).tolist()
    [2.0, inf, 0.0]
    """
    diff = (got - expected).abs()
    both_nan = got.isnan() & expected.isnan()
    return torch.where(both_nan, torch.zeros_like(diff), torch.where(diff.isnan(), math.inf, diff))


def bound(expected: torch.Tensor, atol: float, rtol: float = 0.0) -> torch.Tensor:
    """The largest ``|Δ_i|`` allowed per element: ``atol * max(1, max|expected|) + rtol * |expected_i|``.

    >>> bound(torch.tensor([1000.0, -2.0]), atol=0.5, rtol=0.25).tolist()  # 0.5 * 1000 + 0.25 * |s_i|
    [750.0, 500.5]
    """
    return atol * relative_scale(expected) + rtol * expected.abs()


def deviation(source: torch.Tensor, grown: torch.Tensor, maps=None) -> float | None:
    """``max|Δ| / max(1, max|expected|)`` of ``grown`` against ``source`` mapped to its positions by ``maps``
    (:func:`map_source_output`), computed in at least float32; None for a non-float or empty source output.

    >>> deviation(torch.tensor([2.0, 0.5]), torch.tensor([2.0, 0.5, 7.0]))  # the leading slice is compared
    0.0
    >>> deviation(torch.tensor([1, 2]), torch.tensor([1, 2])) is None
    True
    """
    if not isinstance(source, torch.Tensor) or not source.is_floating_point() or not source.numel():
        return None
    dtype = torch.promote_types(torch.promote_types(source.dtype, grown.dtype), torch.float32)
    expected, index = map_source_output(source.to(dtype), grown.shape, maps)
    diff = abs_diff(grown.to(dtype)[index], expected)
    return float(diff.max()) / relative_scale(expected) if diff.numel() else 0.0
