"""Weights the graph reads as ``c + w`` (a norm parametrised as x̂·(1 + w)).

Compensations scale what a weight *does*: a norm's output multiplied by s needs (c + w') = s·(c + w), that is
w' = s·w + (s − 1)·c, not s·w. A parameter whose every use is ``add(w, c)`` with one float c gets
``TensorRule.offset = c``, so every pass that multiplies the rule's scale (tied heads, repeat-and-fill, head_dim
growth) stays correct for such norms without knowing about them.

>>> offset_of_uses([1.0, 1.0]), offset_of_uses([1.0, None])
(1.0, None)
"""

from __future__ import annotations

from ..analysis.norms import weight_uses
from ..analysis.plan import Plan


def offset_of_uses(uses: list) -> float | None:
    """The common c of uses given as the float c of an add(w, c), None for any other use; None unless all are
    add(w, c) with one c."""
    if not uses or None in uses or len(set(uses)) != 1:
        return None
    return uses[0]


def mark_offsets(plan: Plan, rules: dict) -> None:
    """Set ``offset`` on the rule of every parameter read only as ``c + w``."""
    for node_name, state in plan.facts.params.items():
        node = next(n for n in plan.captured.gm.graph.nodes if n.name == node_name)
        c = offset_of_uses(weight_uses(node))
        if c is not None and state in rules:
            rules[state].offset = c
