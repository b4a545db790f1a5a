"""Values that come from a group's size: keep the function when a rebuilt model recomputes them.

A model may multiply a tensor by a constant computed from a width, such as an embedding scaled by sqrt(hidden)
(a float literal in the graph, or a 0-d buffer). A config rebuilt with the new width computes the new value
f(d'), not the old f(d). When the scaled tensor is linear in one parameter W (an embedding lookup, a linear
map without bias), the ratio rho = f(d')/f(d) is absorbed there:

    c' · (W / rho)·x = rho·c · (W / rho)·x = c · W·x

so the graph's literal (or buffer) is rewritten to f(d') -- the value the rebuilt model holds -- and W is
divided by rho. A head tied to W then computes logits / rho; ``exactness.compensate_tied`` reads W's scale
and multiplies the norm before the head by rho (for a norm read as (1 + w): 1 + w' = rho·(1 + w), which the
rule's ``offset`` expresses).

The match is by value only (f in sqrt, identity, 1/sqrt, 1/x of the size of a group the scaled tensor
carries), and a false match is harmless: the literal and W change together, so the graph computes the
same function whatever the constant meant; the rebuilt model is checked against the graph numerically.

>>> import math
>>> _match(math.sqrt(32.0), 32, 64)
('sqrt', 8.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis.ops import LAYOUT, WEIGHTED, forward
from ..analysis.sources import constant_scalings
from ..analysis.plan import Plan
from .width import WidthResult

SIZE_FUNCTIONS = {"sqrt": math.sqrt, "size": float, "1/sqrt": lambda d: d ** -0.5, "1/size": lambda d: 1.0 / d}


@dataclass
class SizeValue:
    """A multiplication by a constant equal to f(size of a grown group), and where it can be absorbed."""
    node: str  # the mul/div node
    literal: int | None  # arg position of a float literal, or None
    buffer: str | None  # state name of a 0-d buffer holding the constant, or None
    param: str  # the parameter the scaled tensor is linear in
    old: float
    new: float
    why: str  # "sqrt(32)" etc.
    divides: bool = False  # x / c rather than x * c

    @property
    def ratio(self) -> float:
        """Factor the product changes by when the constant becomes ``new``."""
        return self.old / self.new if self.divides else self.new / self.old


def _match(value: float, old: int, new: int) -> tuple[str, float] | None:
    """(f's name, f(new)) for the first f with f(old) == value."""
    for name, f in SIZE_FUNCTIONS.items():
        if math.isclose(value, f(old), rel_tol=1e-6):
            return name, f(new)
    return None


def find_size_values(plan: Plan, maps: dict) -> list[SizeValue]:
    """Every mul/div of a parameter-linear tensor by a constant that equals f(old size) of a grown group
    the tensor carries."""
    f, ag, found, done = plan.facts, plan.facts.ag, [], set()
    for s in constant_scalings(plan.captured.gm, f):
        if s.node in done:
            continue  # one constant per multiplication: the first operand that matches
        leaves = {leaf for a in f.axes.get(s.scaled.name, []) for leaf in ag.leaf_roots(a) if leaf in maps}
        hits = {(name, new): leaf for leaf in leaves
                for name, new in [_match(s.value, maps[leaf].old, maps[leaf].new) or (None, None)] if name}
        if len({new for _, new in hits}) != 1:
            continue  # no size matches, or two groups give different new values: leave it
        (name, new), leaf = next(iter(hits.items()))
        found.append(SizeValue(s.node, s.literal, s.buffer, s.param, s.value, new, f"{name}({maps[leaf].old})",
                               s.divides))
        done.add(s.node)
    return found


def _absorbable(plan: Plan, width: WidthResult, param: str, values: list[SizeValue]) -> str:
    """Why the ratio of ``values`` cannot be moved into ``param`` ("" when it can): every use of the
    parameter must be scaled by the same ratio, or be the head of a tied embedding (compensated later)."""
    if len({round(v.ratio, 12) for v in values}) != 1:
        return "its uses are scaled by constants that change differently"
    f, nodes = plan.facts, {n.name: n for n in plan.captured.gm.graph.nodes}
    scaled = {v.node for v in values}
    heads = {node for p, _, node in f.consumed if p == param} if any(p == param for p, _ in width.tied) else set()
    for name in (n for n, state in f.params.items() if state == param):
        for use in forward(nodes[name], LAYOUT):
            if use.name in heads or (WEIGHTED(use) and all(u.name in scaled for u in forward(use, LAYOUT))):
                continue
            return f"`{param}` is also read at `{use.name}` without that constant"
    return ""


def absorb_size_values(plan: Plan, maps: dict, width: WidthResult) -> tuple[dict, list[str]]:
    """Move each size-derived constant to its new value and its ratio into the parameter it scales.
    Returns the literal rewrites for the graph ({node: (arg position, value)}) and what was left as it was.
    Run it before ``compensate_tied``, which reads the tied parameter's scale."""
    by_param, literals, buffers, left = {}, {}, {}, []
    for v in find_size_values(plan, maps):
        by_param.setdefault(v.param, []).append(v)
    for param, values in by_param.items():
        why = _absorbable(plan, width, param, values)
        if why:
            left.append(f"{values[0].why} at `{values[0].node}` was kept: {why}")
            continue
        rho = values[0].ratio
        width.rules[param].scale /= rho
        width.rules[param].notes.append(f"divided by {rho:.6g}: the constant {values[0].why} that scales it "
                                        f"becomes {values[0].new:.6g}")
        for v in values:
            if v.buffer is not None:
                buffers[v.buffer] = v
            else:
                literals[v.node] = (v.literal, v.new)
    for name, v in buffers.items():  # one buffer may scale several lookups: set it once
        width.rules[name].scale *= v.new / v.old
        width.rules[name].notes.append(f"{v.why} recomputed at the new size: {v.new:.6g}")
    return literals, left
