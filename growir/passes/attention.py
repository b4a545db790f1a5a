"""head_dim growth: copies of query/key dimensions multiply the attention scores; undo it on the query.

With every head_dim index copied k times, q'.k' = k (q.k). The score scale 1/sqrt(head_dim) either follows
the new size (a default scale, or the standard explicit 1/sqrt(d) that a rebuilt config recomputes), giving
a net factor k / sqrt(k) = sqrt(k), or is a constant that does not follow it (a fixed 1.0), giving k. The query
projection (weight and bias) is divided by that factor, so the scores, the softmax and the output are
unchanged. Value dimensions are copied and the output projection splits them, as for any group.
"""

from __future__ import annotations

import math

import torch.fx as fx

from ..analysis.walker import op_name
from ..plan import Plan
from .width import WidthResult

THROUGH = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.permute", "aten.contiguous",
           "aten.to", "aten._to_copy", "aten.clone", "aten.dropout", "aten.alias", "aten.expand", "aten.unsqueeze",
           "aten.squeeze", "aten.type_as"}
CONTRACT = {"aten.linear", "aten.addmm"}


def compensate_head_dim(plan: Plan, maps: dict, width: WidthResult):
    """Scale query producers; return (reasons it failed, compensated (root, kind) pairs, scale rewrites)."""
    f, ag = plan.facts, plan.facts.ag
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reasons, done, scales = [], set(), {}
    for site in f.attention:
        leaves = ag.leaf_roots(site["q"][-1])
        grown = [leaf for leaf in leaves if leaf in maps]
        if not grown:
            continue
        where = f"the attention at `{site['node']}`"
        tree = ag.expand(site["q"][-1])
        if len(leaves) != 1 or tree != leaves[0]:
            reasons.append(f"{where} splits head_dim (rotary rotate-half): head_dim growth keeps rotary "
                           f"frequencies only by the interleaved construction, which growir does not do yet")
            continue
        m = maps[grown[0]]
        if not m.uniform:
            reasons.append(f"{where}: head_dim {m.old} -> {m.new} is not a whole multiple; copied query/key "
                           f"dimensions then weigh unevenly in the scores")
            continue
        k = m.new // m.old
        node = nodes[site["node"]]
        scale = node.kwargs.get("scale")
        follows = scale is None or math.isclose(scale, m.old ** -0.5, rel_tol=1e-9)
        factor = 1 / math.sqrt(k) if follows else 1 / k
        params = _query_params(node.args[0], f)
        if not params:
            reasons.append(f"{where}: growir could not trace the query back to one projection (a fused QKV "
                           f"weight, or an op between them); head_dim growth needs to rescale it")
            continue
        for p in params:
            width.rules[p].scale *= factor
            width.rules[p].notes.append(f"query scaled by {factor:.4g}: head_dim x{k} at {site['node']}")
        if scale is not None and follows:
            scales[site["node"]] = m.new ** -0.5
        done |= {(grown[0], "contract"), (grown[0], "scale")}
    return reasons, done, scales


def _query_params(x, facts) -> list[str]:
    """The weight and bias of the projection that produces the query, through layout ops."""
    while isinstance(x, fx.Node) and x.op == "call_function" and op_name(x) in THROUGH:
        x = x.args[0]
    if not isinstance(x, fx.Node) or x.op != "call_function" or op_name(x) not in CONTRACT:
        return []
    weights = list(x.args[1:3]) if op_name(x) == "aten.linear" else [x.args[2], x.args[0]]
    weights = [a for a in weights if isinstance(a, fx.Node)]
    out = [facts.params[a.name] for a in weights if a.name in facts.params]
    return out if len(out) == len(weights) else []


def rewrite_scales(gm: fx.GraphModule, scales: dict) -> None:
    """Explicit 1/sqrt(head_dim) scales follow the new head_dim, as a rebuilt config recomputes them."""
    for n in gm.graph.nodes:
        if n.name in scales:
            n.kwargs = {**n.kwargs, "scale": scales[n.name]}
