"""Weights the graph reads as ``c + w`` (a norm parametrised as x̂·(1 + w)).

Compensations scale what a weight *does*: a norm's output multiplied by s needs (c + w') = s·(c + w), that is
w' = s·w + (s − 1)·c, not s·w. A parameter whose every use is ``add(w, c)`` with one float c gets
``TensorRule.offset = c``, so every pass that multiplies the rule's scale (tied heads, repeat-and-fill, head_dim
growth) stays correct for such norms without knowing about them.

>>> offset_of_uses([("aten.add", 1.0), ("aten.add", 1.0)])
1.0
"""

from __future__ import annotations

from ..analysis.norms import weight_uses
from ..analysis.plan import Plan


def offset_of_uses(uses: list) -> float | None:
    """The common c of uses given as (op name, float constant or None); None unless all are add(w, c)."""
    cs = {c for op, c in uses if op == "aten.add" and isinstance(c, float)}
    if not uses or len(cs) != 1 or any(op != "aten.add" or not isinstance(c, float) for op, c in uses):
        return None
    return cs.pop()


def mark_offsets(plan: Plan, rules: dict) -> None:
    """Set ``offset`` on the rule of every parameter read only as ``c + w``."""
    for node_name, state in plan.facts.params.items():
        node = next(n for n in plan.captured.gm.graph.nodes if n.name == node_name)
        c = offset_of_uses(weight_uses(node))
        if c is not None and state in rules:
            rules[state].offset = c
