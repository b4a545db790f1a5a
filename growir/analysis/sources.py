"""Where a query or key comes from: the projection rows that write it, and the norm in between.

head_dim growth rescales the query (and zeroes its new rotary dimensions), so it has to find the tensors
that scale it linearly, and checks that the key does not share them. Walking back from the attention's argument
through layout ops and ops linear in it
(rotary: ``q*cos + rotate_half(q)*sin``), it stops at

- a norm over the head (a per-head q/k norm): the norm's weight and bias scale its output, and the walk
  continues behind the norm to the projection, whose scale the norm removes;
- a projection (``linear``/``addmm``): its weight and bias. When the projection is fused (one QKV weight
  whose output is sliced or split), only some of its rows reach the query. Which ones is a question about
  data flow, answered by running the same layout ops on row labels: the projection's output holds its own
  row number, and whatever labels arrive at the query are the rows that write it.

Anything else on the way (an op growir cannot see through) gives ``None``: the caller reports the attention
as not exact rather than guessing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .norms import NormSite
from .nodes import back
from .ops import CAT, DIV, EXPAND, LAYOUT, LINEAR, MUL, NEG, PROJECTIONS, SAME_VALUES, SCALES, SELECT, SPLITS
from .ops import WEIGHTED, Blocked, reach, traits


@dataclass
class Rows:
    """A parameter and the old positions along one of its axes that write the traced tensor (None: all)."""
    param: str
    axis: int
    rows: torch.Tensor | None
    size: int = 0  # the axis's old size


@dataclass
class Source:
    """Where a query or key comes from: the projection rows writing it, and a norm in between if there is one."""
    proj: list  # [Rows] of the projection (weight, bias)
    norm: NormSite | None = None  # a norm between the projection and the attention
    norm_proj: list | None = None  # [Rows] of the projection behind that norm

    @property
    def writers(self) -> list:
        """The projection rows that write the tensor (behind the norm, if any)."""
        return self.norm_proj if self.norm is not None else self.proj

    @property
    def scales(self) -> list:
        """What scales the tensor linearly: the norm's parameters, or else the projection's rows."""
        if self.norm is None:
            return self.proj
        return [Rows(p, 0, None) for p in (self.norm.weight, self.norm.bias) if p is not None]


def param_dependent(gm: fx.GraphModule, facts) -> set:
    """Nodes whose value depends on a parameter (rotary cos/sin tables depend only on buffers and inputs)."""
    dep = set()
    for n in gm.graph.nodes:  # graph order is topological
        if (n.op == "get_attr" and n.name in facts.params) or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def trace_source(x: fx.Node, facts, dep: set, norms: list[NormSite]) -> Source | None:
    """The ``Source`` of ``x`` (an attention's query or key), or None where the graph holds something else."""
    by_output = {s.output: s for s in norms}
    first = _walk(x, facts, dep, by_output)
    if first is None:
        return None
    end, path = first
    if isinstance(end, NormSite):
        if end.weight is None:
            return None
        behind = _walk(end.input, facts, dep, {})
        if behind is None or isinstance(behind[0], NormSite):
            return None
        proj = _rows(behind[0], behind[1], end.input, facts)
        return Source([], end, proj) if proj is not None else None
    proj = _rows(end, path, x, facts)
    return Source(proj) if proj is not None else None


def _walk(x, facts, dep: set, stop_at: dict):
    """Back from ``x`` to one contraction with parameters (or one norm in ``stop_at``); (end, path nodes)."""
    ends = set()

    def step(n: fx.Node) -> list:
        if n not in dep:
            return []
        if n in stop_at:
            ends.add(stop_at[n])
            return []
        if PROJECTIONS(n):
            operands = [n.args[i] for i in (traits(n).weight_at, traits(n).bias_at) if i < len(n.args)]
            if not all(a.name in facts.params for a in operands if isinstance(a, fx.Node)):
                raise Blocked
            ends.add(n)
            return []
        if SPLITS(n):
            inputs = [n.args[0]]
        elif LINEAR(n) or MUL(n):
            inputs = list(n.args[0] if CAT(n) else n.args[:2])
            if MUL(n) and all(a in dep for a in inputs):
                raise Blocked  # a product of two traced tensors is not linear in either
        else:
            raise Blocked
        return [a for a in inputs if isinstance(a, fx.Node) and a in dep]

    try:
        path = reach([x], step)
    except Blocked:
        return None
    if len(ends) != 1:
        return None
    return next(iter(ends)), path


def _concrete(node: fx.Node) -> list[int]:
    """The node's shape with every symbol (batch, sequence) taken as 1: ``4*s0`` becomes 4."""
    return [s if isinstance(s, int) else int(s.node.expr.subs({v: 1 for v in s.node.expr.free_symbols}))
            for s in node.meta["val"].shape]


def _rows(proj: fx.Node, path: set, x: fx.Node, facts) -> list[Rows] | None:
    """Run the path's layout ops on row labels from ``proj``'s output to ``x``; the labels that arrive are the
    rows of the projection's weight (and bias) that write ``x``."""
    at = traits(proj)
    weight = proj.args[at.weight_at]
    bias = proj.args[at.bias_at] if len(proj.args) > at.bias_at else None
    out_axis = at.weight_out  # linear's weight is (out, in); addmm's is (in, out)
    n_rows = weight.meta["val"].shape[out_axis]
    shape = _concrete(proj)
    labels = {proj: torch.arange(n_rows, dtype=torch.float64).expand(shape)}
    try:
        for n in proj.graph.nodes:  # topological: every input's labels exist before a node needs them
            if n in path and n is not proj:
                labels[n] = _propagate(n, labels)
    except (RuntimeError, IndexError, ValueError, TypeError, KeyError):
        return None
    if x not in labels or labels[x] is None:
        return None
    rows = torch.unique(labels[x]).long()
    rows = None if len(rows) == n_rows else rows
    out = [Rows(facts.params[weight.name], out_axis, rows, n_rows)]
    if isinstance(bias, fx.Node):
        out.append(Rows(facts.params[bias.name], 0, rows, n_rows))
    return out


def _propagate(n: fx.Node, labels: dict):
    args = [labels[a] if isinstance(a, fx.Node) and a in labels else a for a in n.args]
    traced = [a for a in n.args if isinstance(a, fx.Node) and a in labels]
    if n.target is operator.getitem:
        return args[0][args[1]]
    if traits(n).kind == "view":
        return args[0].reshape(_concrete(n))
    if EXPAND(n):
        return args[0].expand(_concrete(n))
    if SAME_VALUES(n) or NEG(n):
        return args[0]
    if traits(n).kind == "slice":
        dim = args[1] % args[0].dim()
        if _concrete(n.args[0])[dim] == 1 and not isinstance(n.args[0].meta["val"].shape[dim], int):
            return args[0].select(dim, 0) if SELECT(n) else args[0]
        return n.target(args[0], *[a if isinstance(a, int) else None for a in args[1:]])
    if CAT(n):
        return torch.cat([labels[t] for t in n.args[0]], *args[1:])
    if LINEAR(n) or MUL(n):
        if len(traced) == 2 and not torch.equal(torch.unique(labels[traced[0]]), torch.unique(labels[traced[1]])):
            raise ValueError("a sum of two tensors written by different rows")
        return torch.broadcast_to(labels[traced[0]], _concrete(n))
    return n.target(*args, **n.kwargs)  # transpose, permute, unsqueeze, squeeze, split, chunk


# --- multiplications by constants (size-derived values: passes/size_values.py) --------------------------------


@dataclass
class Scaling:
    """``scaled * c`` or ``scaled / c`` where ``scaled`` is linear in one parameter and c is a constant."""
    node: str  # the mul/div node
    literal: int | None  # arg position of c when it is a float literal
    buffer: str | None  # state name of the one-element buffer holding c, else None
    value: float  # c
    param: str  # the parameter ``scaled`` is linear in
    scaled: fx.Node
    divides: bool  # scaled / c


def constant_scalings(gm: fx.GraphModule, facts) -> list[Scaling]:
    """Every multiplication (or division) of a parameter-linear tensor by a nonzero constant, in graph order;
    a product of two such tensors gives one entry per operand order (the constant second first)."""
    found = []
    for n in gm.graph.nodes:
        if not SCALES(n) or len(n.args) != 2:
            continue
        divides = DIV(n)
        for pos in (1,) if divides else (1, 0):
            scalar, other = scalar_value(n.args[pos], gm, facts), n.args[1 - pos]
            param = linear_param(other, facts) if scalar is not None else None
            if param is not None and scalar[0]:
                found.append(Scaling(n.name, pos if scalar[1] is None else None, scalar[1], scalar[0], param, other,
                                     divides))
    return found


def scalar_value(arg, gm: fx.GraphModule, facts):
    """(value, buffer state name or None) of a float literal or a one-element buffer; None otherwise."""
    if isinstance(arg, float):
        return arg, None
    x = back(arg, LAYOUT)
    if isinstance(x, fx.Node) and x.op == "get_attr" and x.name in facts.buffers:
        t = gm.get_buffer(x.target)
        if t.numel() == 1 and t.is_floating_point() and not t.is_meta:  # a meta plan holds no values
            return float(t), facts.buffers[x.name]
    return None


def linear_param(x, facts) -> str | None:
    """The parameter a tensor is linear in: an embedding lookup or a bias-free linear map of one parameter."""
    x = back(x, LAYOUT)
    if not WEIGHTED(x):
        return None
    at = traits(x)
    if at.bias_at is not None and len(x.args) > at.bias_at and x.args[at.bias_at] is not None:
        return None  # x W + b is not linear in W alone
    w = back(x.args[at.weight_at], LAYOUT)
    return facts.params.get(w.name) if isinstance(w, fx.Node) and w.op == "get_attr" else None
