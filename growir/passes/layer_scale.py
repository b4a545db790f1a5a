"""A LayerNorm's mean fill through a per-channel scale (a layer scale λ): exact with the writer's fill row weighted.

A term ``λ ⊙ (W h + b)`` of a LayerNorm's residual needs, at a fill position, the mean of the old channels' terms,
``(1/d) Σ_i λ_i (W_i h + b_i)``. The plain mean fill writes ``mean(λ)·(mean_i W_i h + mean_i b_i)``: the mean of
a product is not the product of the means. Both factors are parameters, so the right fill is a constant of the
growth: W's and b's fill rows are their rows' mean weighted by λ, and λ's fill stays its mean:

    mean(λ) · Σ_i λ_i (W_i h + b_i) / Σ_i λ_i  =  (1/d) Σ_i λ_i (W_i h + b_i)      for every h

(``AxisMap.fill = "weighted"``, the weights read from λ when the rule is applied, as the rule's ``donor``). It
needs W and b to write nothing but this product, and Σ λ ≠ 0: where λ's entries cancel, mean(λ) = 0 and the fill
term is zero whatever its rows, while the target is not, so no fill is exact. The reason then names λ
(``cancelled_scales``): at a whole ratio the group is copied (exact), at another its writers take the plain mean
(``tensor_rule.cancels``: a rule's weights that cancel fall back to it) and the deviation is measured.
A depthwise convolution, whose other factor is an activation, stays inexact.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..analysis.nodes import attr_value, back
from ..analysis.ops import ADDS, ASSERTS, CONTRACTIONS, LAYOUT, kinds, traits
from ..analysis.plan import Plan
from ..ir.tensor_rule import cancels

SAME_TERM = LAYOUT | kinds("dropout")  # the same values (dropout is the identity in eval)
SIZES = (torch.SymInt, torch.SymFloat, int, float)  # a node's value that is size arithmetic, not a tensor


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


def cancelled_scales(plan: Plan, weighted: dict) -> dict:
    """{scale: why} for the layer scales among ``weighted``'s values ({(writer, axis): scale}, from
    ``scaled_writers``) whose entries sum to zero, so that a fill weighted by them has no value (module docstring),
    in name order; none where the values are unknown (planned on the meta device)."""
    wanted, seen, out = set(weighted.values()), set(), {}
    for node in plan.captured.gm.graph.find_nodes(op="get_attr"):
        param = plan.facts.params.get(node.name)
        if param not in wanted or param in seen:
            continue
        seen.add(param)
        value = attr_value(node)
        if isinstance(value, torch.Tensor) and not value.is_meta and cancels(value):
            out[param] = (f"`{param}` multiplies the group channel by channel and its entries sum to zero: the "
                          f"fill's term, mean(λ)·(its rows), is zero, while the mean of the old channels' terms is "
                          f"not (a weighted fill needs Σλ ≠ 0)")
    return dict(sorted(out.items()))


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
        elif SAME_TERM(n) or ADDS(n):  # their operands but sizes: a reshape's SymInts are no term
            stack.extend(a for a in n.all_input_nodes if not isinstance(a.meta.get("val"), SIZES))
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
