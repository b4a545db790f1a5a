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


def rotary_half(plan: Plan, site) -> object | None:
    """The half-head group of a rotate-half rotary attention (head_dim == cat(half, half)), else None."""
    tree = plan.facts.ag.expand(site["q"][-1])
    structured = lambda t: isinstance(t, tuple) and len(t) == 2 and isinstance(t[1], list)
    if structured(tree) and tree[0] == "cat" and len(tree[1]) == 2 and tree[1][0] == tree[1][1] \
            and not structured(tree[1][0]):
        return tree[1][0]
    return None


def rotary_fills(plan: Plan, sizes: dict) -> dict:
    """Rotary half-head groups that grow: their frequencies interleave (see ``interleave_index``)."""
    out = {}
    for site in plan.facts.attention:
        half = rotary_half(plan, site)
        g = plan.group_of(half) if half is not None else None
        if g is not None and sizes.get(g.id, g.size) != g.size:
            out[half] = "interleave"
    return out


def compensate_head_dim(plan: Plan, maps: dict, width: WidthResult):
    """Scale query producers; return (reasons it failed, compensated (root, kind) pairs, scale rewrites)."""
    f, ag = plan.facts, plan.facts.ag
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reasons, done, scales = [], set(), {}
    dep = param_dependent(plan.captured.gm, f)
    for site in f.attention:
        leaves = ag.leaf_roots(site["q"][-1])
        grown = [leaf for leaf in leaves if leaf in maps]
        if not grown:
            continue
        where = f"the attention at `{site['node']}`"
        tree = ag.expand(site["q"][-1])
        half = rotary_half(plan, site)
        if half is not None and maps[half].fill == "interleave" and maps[half].new % maps[half].old == 0:
            # no copies: the scores keep their sum; only a scale that follows head_dim changes (by 1/sqrt(k))
            m, node = maps[half], nodes[site["node"]]
            k = m.new // m.old
            scale = node.kwargs.get("scale")
            follows = scale is None or math.isclose(scale, (2 * m.old) ** -0.5, rel_tol=1e-9)
            params = _query_params(node.args[0], f, dep)
            if not params:
                reasons.append(f"{where}: growir could not trace the query back to one projection")
                continue
            for p in params:
                width.rules[p].scale *= math.sqrt(k) if follows else 1.0
                width.rules[p].notes.append(f"rotary head_dim x{k}: frequencies interleaved at {site['node']}")
            if scale is not None and follows:
                scales[site["node"]] = (2 * m.new) ** -0.5
            done |= {(half, "contract"), (half, "scale")}
            continue
        if len(leaves) != 1 or tree != leaves[0]:
            reasons.append(f"{where} splits head_dim in a way growir cannot grow exactly (partial rotary?)")
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
        params = _query_params(node.args[0], f, dep)
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


LINEAR_IN_Q = {"aten.add", "aten.sub", "aten.neg", "aten.slice", "aten.cat", "aten.mul"}


def _query_params(x, facts, dep: set) -> list[str]:
    """The weight and bias of the one projection that produces the query, through layout ops and ops linear
    in the query (rotary: q*cos + rotate_half(q)*sin). Empty when that is not what the graph holds."""
    found, stack, seen = set(), [x], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n not in dep:
            continue
        seen.add(n)
        name = op_name(n) if n.op == "call_function" else n.op
        if name in CONTRACT:
            weights = list(n.args[1:3]) if name == "aten.linear" else [n.args[2], n.args[0]]
            weights = tuple(a.name for a in weights if isinstance(a, fx.Node))
            if not all(w in facts.params for w in weights):
                return []
            found.add(weights)
        elif name in THROUGH:
            stack.append(n.args[0])
        elif name in LINEAR_IN_Q:
            inputs = n.args[0] if name == "aten.cat" else n.args[:2]
            stack.extend(a for a in inputs if isinstance(a, fx.Node))
        else:
            return []
    if len(found) != 1:
        return []
    return [facts.params[w] for w in next(iter(found))]


def param_dependent(gm: fx.GraphModule, facts) -> set:
    """Nodes whose value depends on a parameter (rotary cos/sin tables depend only on buffers and inputs)."""
    dep = set()
    for n in gm.graph.nodes:  # graph order is topological
        if (n.op == "get_attr" and n.name in facts.params) or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


def rewrite_scales(gm: fx.GraphModule, scales: dict) -> None:
    """Explicit 1/sqrt(head_dim) scales follow the new head_dim, as a rebuilt config recomputes them."""
    for n in gm.graph.nodes:
        if n.name in scales:
            n.kwargs = {**n.kwargs, "scale": scales[n.name]}
