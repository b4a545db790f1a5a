"""Rules for routing, sorting, scattering and grouped-matmul ops (mixture-of-experts layers and friends).

A mixture-of-experts layer routes each token to k of E experts: a router (a linear over the residual stream,
a consumer) scores the experts, ``topk`` picks k, and the experts run as one grouped matmul over expert
weights stored as ``(E, in, out)`` tensors, with ``sort``/``histc``/``index_put`` moving tokens around.
Copying a width group keeps every router logit, hence every routing decision; the expert count E and the
k chosen are not width: they are pinned. The expert weights' ``in``/``out`` axes are width groups like a
dense FFN's (all experts share one group, since one tensor holds them all).
Ops that select along an axis (``topk``, ``sort``, ``roll``, ``flip``) record an ``index`` read on it:
copying a grown axis does not commute with them, so a grown axis read this way makes the growth inexact.
"""

from __future__ import annotations

import torch.fx as fx

from ..errors import UnsupportedOpError
from .walker import Walker, where


def _dim(node: fx.Node, pos: int, name: str, default, ndim: int):
    d = node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)
    return d % ndim if isinstance(d, int) and ndim else d


def topk(w: Walker, node: fx.Node) -> None:
    """topk(x, k, dim=-1) -> (values, indices): the chosen axis is a new axis of size k."""
    x = w.ax(node.args[0])
    dim = _dim(node, 2, "dim", -1, len(x))
    values, indices = w.tuple_out(node)
    for out in (values, indices):
        w.eq_except(x, out, dim, node)
    w.eq(values[dim], indices[dim], node)
    w.pin(x[dim], f"the axis `{node.name}` chooses its top k from (e.g. the experts a router picks), at "
                  f"{where(node)}")
    w.pin(values[dim], f"the k chosen by `{node.name}` at {where(node)}")
    w.read(x[dim], "index", node)


def sort(w: Walker, node: fx.Node) -> None:
    """sort(x, dim=-1) -> (values, indices); argsort(x, dim=-1) -> indices: same axes as x."""
    x = w.ax(node.args[0])
    dim = _dim(node, 1, "dim", -1, len(x))
    outs = w.tuple_out(node) if isinstance(node.meta.get("val"), (list, tuple)) else [w.out(node)]
    for out in outs:
        for a, o in zip(x, out):
            w.eq(a, o, node)
    if x:
        w.read(x[dim], "index", node)


def histc(w: Walker, node: fx.Node) -> None:
    """histc(x, bins): counts over every element of x into ``bins`` bins (a literal, not a width)."""
    for a in w.ax(node.args[0]):
        w.read(a, "index", node)
    out = w.out(node)
    w.pin(out[0], f"the bins of `{node.name}` at {where(node)}")
    w.const(node, ("args", 1), out[0])


def one_hot(w: Walker, node: fx.Node) -> None:
    """one_hot(ids, num_classes): the ids' axes, then a new class axis (a literal, not a width)."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    w.pin(out[-1], f"the classes of `{node.name}` at {where(node)}")


def _trailing_eq(w: Walker, node: fx.Node, src: list, dst: list) -> None:
    """Right-aligned: a trailing axis of ``src`` equals ``dst``'s unless it is a broadcast 1."""
    for a, o in zip(reversed(src), reversed(dst)):
        if w.size(a) == w.size(o):
            w.eq(a, o, node)


def index_put(w: Walker, node: fx.Node) -> None:
    """index_put(x, indices, values): x's axes; the values fill the axes after the indexed ones."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    used = [i for i, t in enumerate(node.args[1]) if t is not None]
    for i in used:
        w.read(x[i], "index", node)
    w.produce(node.args[2])
    _trailing_eq(w, node, w.ax(node.args[2]), x[used[-1] + 1:] if used else x)


def _updated_along(w: Walker, node: fx.Node) -> tuple[list, int]:
    """For ops that write into x along ``dim`` (args 0 and 1): the output is x, and ``dim`` is read."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.args[1] % len(x)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    w.read(x[dim], "index", node)
    return x, dim


def index_add(w: Walker, node: fx.Node) -> None:
    """index_add(x, dim, index, source): source's axes are x's except ``dim``, which has the index's length."""
    x, dim = _updated_along(w, node)
    src = w.ax(node.args[3])
    w.eq_except(x, src, dim, node)
    w.eq(w.ax(node.args[2])[0], src[dim], node)


def scatter(w: Walker, node: fx.Node) -> None:
    """scatter(x, dim, index, src): index and src have one shape, at most x's on every axis but ``dim``."""
    x, dim = _updated_along(w, node)
    idx = w.ax(node.args[2])
    src = w.ax(node.args[3]) if len(node.args) > 3 and isinstance(node.args[3], fx.Node) else []
    for i, a in enumerate(idx):
        if src:
            w.eq(a, src[i], node)
        if i != dim and w.size(a) == w.size(x[i]):
            w.eq(a, x[i], node)


def grouped_mm(w: Walker, node: fx.Node) -> None:
    """grouped_mm(x (S, in), weight (E, in, out), offs (E,)) -> (S, out): rows of x in E consecutive groups,
    group e multiplied by weight[e]. ``in`` is contracted (the weight consumes it), E is pinned."""
    x, wt, out = w.ax(node.args[0]), w.ax(node.args[1]), w.out(node)
    if len(x) != 2 or len(wt) != 3:
        raise UnsupportedOpError(
            f"grouped matmul at {where(node)} multiplies a {len(x)}-d input by a {len(wt)}-d weight; growir "
            f"handles the mixture-of-experts form (tokens (S, in) by expert weights (E, in, out))")
    w.eq(x[1], wt[1], node)
    w.contract(node.args[0], x[1], node.args[1], wt[1], node)
    w.eq(x[0], out[0], node)
    w.eq(wt[2], out[1], node)
    w.pin(wt[0], f"the experts (groups) of the grouped matmul at {where(node)}")
    offs = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
    if isinstance(offs, fx.Node):
        w.eq(w.ax(offs)[0], wt[0], node)
    bias = node.kwargs.get("bias", node.args[3] if len(node.args) > 3 else None)
    if isinstance(bias, fx.Node):
        w.produce(bias)
        w.eq(w.ax(bias)[-1], out[1], node)


def roll(w: Walker, node: fx.Node) -> None:
    """roll(x, shifts, dims): the shifts are amounts and the dims axes (none given: the flattened tensor)."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    for d in (dims or range(len(x))):
        w.read(x[d % len(x)], "index", node)


def flip(w: Walker, node: fx.Node) -> None:
    """flip(x, dims): reverses each listed axis."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    for d in node.args[1]:
        w.read(x[d % len(x)], "index", node)
