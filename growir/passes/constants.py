"""Graph literals that carry a group's size (view shapes, split sizes, slice bounds, expand sizes).

A rewritten graph must run at the new sizes, so each recorded literal is replaced by the new size of the
axis it describes. Size-derived *values* (a 1/sqrt(head_dim) scale) are not shapes and are carried over.
"""

from __future__ import annotations

import operator

import sympy
import torch.fx as fx

from ..analysis.plan import Plan
from ..ir.index_maps import tree_map


def new_sizes(plan: Plan, maps: dict):
    """Two functions of an axis under the group maps: ``size`` (its grown size, symbolic where the axis is
    dynamic) and ``concrete_factor`` (the product of its static grown leaf sizes)."""
    ag = plan.facts.ag

    def size(axis) -> sympy.Expr:
        _, _, _, new = tree_map(ag.expand(axis), ag, maps)
        return sympy.sympify(new)

    def concrete_factor(axis) -> int:
        total = 1
        for leaf in ag.leaf_roots(axis):
            m = maps.get(leaf)
            s = m.new if m is not None else ag.size[leaf]
            if sympy.sympify(s).is_Integer:
                total *= int(s)
        return total
    return size, concrete_factor


def rewrite_constants(plan: Plan, maps: dict, gm: fx.GraphModule) -> int:
    """Update the literals in ``gm`` (a copy of the captured graph); returns how many changed."""
    size, factor = new_sizes(plan, maps)
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for c in plan.facts.consts:
        if c.kind == "factor":
            value = factor(c.axis)
            if c.path[0] == "sym":  # one factor of a product (batch * 4 * 4 as (batch * 4) * 4): the others keep theirs
                rest = _literal_product([a for j, a in enumerate(nodes[c.path[1]].args) if j != c.path[2]])
                value = value // rest if value % rest == 0 else value
        elif c.kind == "end":
            axes = c.axis if isinstance(c.axis, tuple) and isinstance(c.axis[0], tuple) else (c.axis,)
            value = sum(int(size(a)) for a in axes)
        else:
            value = size(c.axis)
            if not value.is_Integer:
                continue
            value = int(value)
        if c.path[0] == "kwargs":  # repeat_interleave's output_size
            node = nodes[c.node]
            changed += node.kwargs.get(c.path[1]) != value
            node.kwargs = {**node.kwargs, c.path[1]: value}
            continue
        if c.path[0] == "sym":
            node, pos = nodes[c.path[1]], c.path[2]
        else:
            node, pos = nodes[c.node], c.path[1:]
        changed += _set_arg(node, pos, value)
    return changed


def _literal_product(args) -> int:
    """The product of the integer literals in ``args`` and in the products they are made of (a size computed
    as ``(sym_size * 4) * 4`` holds 4 in its inner product), as the graph holds them now (rewritten or not).

    >>> g = fx.Graph(); b = g.placeholder("b"); inner = g.call_function(operator.mul, (b, 4))
    >>> _literal_product([inner, 2]), _literal_product([b])
    (8, 1)
    """
    total = 1
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool):
            total *= a
        elif isinstance(a, fx.Node) and a.target is operator.mul:
            total *= _literal_product(a.args)
    return total


def _set_arg(node: fx.Node, pos, value: int) -> int:
    pos = pos if isinstance(pos, tuple) else (pos,)
    args = list(node.args)
    if len(pos) == 1:
        old = args[pos[0]]
        args[pos[0]] = value
    else:
        inner = list(args[pos[0]])
        old = inner[pos[1]]
        inner[pos[1]] = value
        args[pos[0]] = type(node.args[pos[0]])(inner) if isinstance(node.args[pos[0]], tuple) else inner
    if old == value:
        return 0
    node.args = tuple(args)
    return 1
