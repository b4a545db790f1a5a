"""A LayerNorm's mean fill through a per-channel scale (a layer scale λ): exact with the writer's fill row weighted.

A term ``λ ⊙ (W h + b)`` of a LayerNorm's residual needs, at a fill position, the mean of the old channels' terms,
``(1/d) Σ_i λ_i (W_i h + b_i)``. The plain mean fill writes ``mean(λ)·(mean_i W_i h + mean_i b_i)``: the mean of
a product is not the product of the means. Both factors are parameters, so the right fill is a constant of the
growth: W's and b's fill rows are their rows' mean weighted by λ, and λ's fill stays its mean:

    mean(λ) · Σ_i λ_i (W_i h + b_i) / Σ_i λ_i  =  (1/d) Σ_i λ_i (W_i h + b_i)      for every h

(``AxisMap.fill = "weighted"``, the weights read from λ when the rule is applied, as the rule's ``donor``). It
needs Σ λ ≠ 0 (else the rule falls back to the plain mean and the growth measures the deviation), and W and b to
write nothing but this product. A depthwise convolution, whose other factor is an activation, stays inexact.
"""

from __future__ import annotations

import torch.fx as fx

from ..analysis.nodes import back
from ..analysis.ops import ADDS, ASSERTS, CONTRACTIONS, LAYOUT, kinds, traits
from ..analysis.plan import Plan

SAME_TERM = LAYOUT | kinds("dropout")  # the same values (dropout is the identity in eval)


def scaled_writers(plan: Plan, g, param: str, at: str) -> dict | None:
    """{(writer parameter, its axis on the group ``g``): ``param``} for the product at node ``at`` of the per-channel
    parameter ``param`` (λ) with a term linear in the group's producers that write nothing else; None where the
    product is not of that kind (then the mean fill through it is not exact)."""
    f = plan.facts
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    u, node_of = nodes[at], {s: n for n, s in f.params.items()}
    if traits(u).kind != "scale" or traits(u).zero != "one" or param not in node_of:
        return None  # a division, or a contraction: not a per-channel product
    lam = nodes[node_of[param]]
    val = lam.meta.get("val")
    others = [a for a in u.args if isinstance(a, fx.Node) and back(a, LAYOUT) is not lam]
    if val is None or val.numel() != g.size or len(others) != 1:
        return None
    axes = {pa.param: pa.axis for pa in g.producers}
    writers, path = _writers(others[0], f, axes)
    if not writers or any(w[0] == param for w in writers):
        return None
    only_here = all(all(v in path or v is u or ASSERTS(v) for v in n.users) for n in path)
    return {w: param for w in writers} if only_here else None


def _writers(y: fx.Node, f, axes: dict) -> tuple[set, set]:
    """(the (parameter, axis) pairs whose outputs sum to ``y`` through layout ops and additions, the nodes on the
    way); an empty set where something else makes ``y`` (an activation, a product)."""
    stack, path, writers = [y], set(), set()
    while stack:
        n = stack.pop()
        if n in path:
            continue
        path.add(n)
        if n.op == "get_attr":
            if f.params.get(n.name) not in axes:
                return set(), path
            writers.add((f.params[n.name], axes[f.params[n.name]]))
        elif SAME_TERM(n) or ADDS(n):
            stack.extend(n.all_input_nodes)
        elif CONTRACTIONS(n) and traits(n).weight_at is not None:  # x W^T + b: W and b write the group
            stack.extend(a for a in n.all_input_nodes if back(a, LAYOUT).op == "get_attr")
        else:
            return set(), path
    return writers, path


def weigh_fill_rows(weighted: dict, rules: dict) -> None:
    """Make each writer's fill on its group axis the mean of its rows weighted by the scale behind it
    (``weighted``: {(writer, axis): scale parameter}, from ``scaled_writers``)."""
    for (p, axis), scale in weighted.items():
        rules[p].axes[axis].fill = "weighted"
        rules[p].donor = scale
        rules[p].notes.append(f"fill rows: the mean of its rows weighted by `{scale}`, which multiplies its output "
                              f"channel by channel (exact: mean(l·W) = mean(l)·(sum l·W / sum l))")
