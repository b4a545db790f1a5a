"""The axis rule of an op with no hand rule, read from its own meta kernel by the distinct-prime probe
(``probe.py`` says how, and what it finds): equal axes made one, products and concatenations given their
structure, axes it cannot relate pinned, axes the op mixes read. The op table registers it as ``derived`` for the
ops it names, and the walker applies it to any aten op the table lacks.

>>> import torch
>>> g = torch.fx.symbolic_trace(lambda x: x.relu()).graph
>>> x = next(iter(g.nodes)); x.meta["val"] = torch.empty(2, 3)
>>> node = g.call_function(torch.ops.aten.tensor_split.sections, (x, 3, -1))
>>> tensors, args, kwargs = signature(node)
>>> [t.name for t in tensors], args
(['x'], (Operand(k=0), 3, -1))
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import UnsupportedOpError
from ..ir.axes import CAT, PROD
from .probe import Operand, Relations, Size, relations
from .walker import Walker, where


def signature(node: fx.Node):
    """The probe's view of a node: its tensor operands (fx nodes), and its arguments with ``Operand(k)`` in their
    places and ``Size(expr)`` for a size computed in the graph. Raises ``ValueError`` for an argument computed in
    the graph that is neither (a float, a bool)."""
    tensors = []

    def slot(leaf):
        if not isinstance(leaf, fx.Node):
            return leaf
        val = leaf.meta.get("val")
        if isinstance(val, int):
            return val
        if isinstance(val, torch.SymInt):
            return Size(val.node.expr, val.node.hint)
        if not isinstance(val, torch.Tensor):
            raise ValueError(f"its argument `{leaf.name}` is computed in the graph and is neither a tensor nor a "
                             "size, so no probe at other sizes can keep it consistent")
        tensors.append(leaf)
        return Operand(len(tensors) - 1)

    args, kwargs = pytree.tree_map(slot, (tuple(node.args), dict(node.kwargs)))
    return tensors, args, kwargs


def derived(w: Walker, node: fx.Node) -> None:
    """The axis rule read from the op's own meta kernel (``probe.py`` says how), for ops with no hand
    rule: equal axes made one, products and concatenations given their structure, the rest pinned or read."""
    try:
        tensors, args, kwargs = signature(node)
        vals = [t.meta["val"] for t in tensors]
        rel = relations(node.target, [tuple(v.shape) for v in vals], args, kwargs, [v.dtype for v in vals])
        real = _ranks(node.meta.get("val"))
        if real != [len(out) for out in rel.outputs]:
            raise ValueError(f"at the probe's sizes it makes {len(rel.outputs)} outputs, at the graph's {len(real)} "
                             "(their number or rank follows a size, set by its literals)")
    except ValueError as exc:
        raise UnsupportedOpError(
            f"growir has no hand rule for the op `{node.target}` at {where(node)}, and cannot derive one from its "
            f"meta kernel: {exc}. Rewrite that step with ops growir reads, or give the op a row with an axis rule "
            f"in growir/analysis/ops.py") from None
    _apply(w, node, tensors, rel)


def _ranks(val) -> list:
    """The rank of each output of a node's value (0 for a non-tensor one)."""
    return [v.dim() if isinstance(v, torch.Tensor) else 0 for v in (val if isinstance(val, (list, tuple)) else [val])]


def _apply(w: Walker, node: fx.Node, tensors: list, rel: Relations) -> None:
    axes = [w.ax(t) for t in tensors]
    one = lambda c: axes[c[0][0]][c[0][1]]  # noqa: E731 - a class's axes are equal; its first stands for it
    outs = [w.out(node)] if isinstance(node.meta.get("val"), torch.Tensor) else w.tuple_out(node)
    for t in tensors:
        w.produce(t)
    for c in rel.tied + rel.mixed + [c for c, _ in rel.parts]:
        for k, a in c[1:]:  # the kernel refused these axes at different sizes: the op needs them equal
            w.eq(one(c), axes[k][a], node)
    for j, out in enumerate(rel.outputs):
        for i, (kind, dep) in enumerate(out):
            o = outs[j][i]
            if kind == "eq":
                for k, a in dep[0]:
                    w.eq(axes[k][a], o, node)
            elif kind in (PROD, CAT):
                w.f.ag.set_structure(o, kind, [one(c) for c in dep], where(node))
            elif kind in ("fixed", "follows"):
                w.pin(o, f"an axis of {where(node)} whose size is set by its literals or follows its operands "
                         "by a law growir does not grow")
    for c, pieces in rel.parts:
        w.f.ag.set_structure(one(c), CAT, [outs[j][i] for j, i in pieces], where(node))
    for c in rel.tied:
        for k, a in c:
            w.pin(axes[k][a], f"an axis whose size {where(node)} ties to its literals or to its output's size "
                              "by a law growir does not grow")
    for c in rel.mixed + rel.uncopied:
        for k, a in c:
            w.read(axes[k][a], "index", node)
