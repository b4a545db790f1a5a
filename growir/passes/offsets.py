"""Weights the graph reads as ``c + w`` (a norm parametrised as x̂·(1 + w)).

Compensations scale what a weight *does*: a norm's output multiplied by s needs (c + w') = s·(c + w), that is
w' = s·w + (s − 1)·c, not s·w. A parameter whose every use is ``add(w, c)`` with one float c gets
``TensorRule.offset = c``, so every pass that multiplies the rule's scale (tied heads, repeat-and-fill, head_dim
growth) stays correct for such norms without knowing about them.

>>> offset_of_uses([("aten.add", 1.0), ("aten.add", 1.0)])
1.0
"""

from __future__ import annotations

import torch.fx as fx

from ..analysis.ops import LAYOUT, back, forward, op_name
from ..plan import Plan


def offset_of_uses(uses: list) -> float | None:
    """The common c of uses given as (op name, float constant or None); None unless all are add(w, c)."""
    cs = {c for op, c in uses if op == "aten.add" and isinstance(c, float)}
    if not uses or len(cs) != 1 or any(op != "aten.add" or not isinstance(c, float) for op, c in uses):
        return None
    return cs.pop()


def _terminal_uses(node: fx.Node) -> list:
    """(op name, float constant) of each use past layout ops; a non-add use gives (op, None)."""
    out = []
    for u in forward(node, LAYOUT):
        name = op_name(u) if u.op == "call_function" else u.op
        if name == "aten.add" and len(u.args) == 2:
            other = u.args[1] if u.args[0] is node else u.args[0]
            out.append((name, other if isinstance(other, float) and u.kwargs.get("alpha", 1) == 1 else None))
        else:
            out.append((name, None))
    return out


def mark_offsets(plan: Plan, rules: dict) -> None:
    """Set ``offset`` on the rule of every parameter read only as ``c + w``."""
    for node_name, state in plan.facts.params.items():
        node = next(n for n in plan.captured.gm.graph.nodes if n.name == node_name)
        c = offset_of_uses(_terminal_uses(node))
        if c is not None and state in rules:
            rules[state].offset = c


def weight_param(x, facts) -> str | None:
    """The parameter behind a norm's weight operand: ``w`` or ``c + w``, through layout ops; else None."""
    x = back(x, LAYOUT)
    if isinstance(x, fx.Node) and x.op == "call_function" and op_name(x) == "aten.add" and len(x.args) == 2:
        nodes = [a for a in x.args if isinstance(a, fx.Node)]
        if len(nodes) == 1 and any(isinstance(a, float) for a in x.args):
            x = back(nodes[0], LAYOUT)
    return facts.params.get(x.name) if isinstance(x, fx.Node) and x.op == "get_attr" else None
