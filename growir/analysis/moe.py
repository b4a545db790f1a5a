"""Mixture-of-experts layers read from the graph: the router, the choice, the experts, and how the chosen
weights are combined -- what decides whether copying experts preserves the function (growth-math.md §11).

A layer is ``y = Σ_{e ∈ top-k} w_e(x) · FFN_e(x)``. Here it is found as a ``topk`` whose chosen axis is the
output axis of a contraction with a parameter (the router, whose rows are the experts); the experts are the
parameters that ops reached from the choice's indices alone (``cumsum(histc(sort(ids)))`` offsets of a grouped
matmul, ``w[ids]`` gathered rows) select by an axis of E. Copying each expert m times (blocked: copy j of
expert e at ``j·E + e``) with its router row gives every copy its expert's logit, so:

- a softmax over the experts *before* the choice gives each copy ``p_e / m`` (``split``): with top-k -> mk
  the m copies of every chosen expert are chosen together and their weights sum to ``p_e`` -- exact,
  renormalised or not;
- otherwise (a sigmoid, or raw logits) each copy keeps ``w_e``: exact where the chosen weights are
  renormalised (each copy then gets ``w_e / (m Σ w)``), else the copies' outputs need a factor 1/m (on the
  expert tensors that make the experts' outputs, ``outputs``);
- a constant factor on the weights (``scale``, a routed scaling factor) is the same for copies: kept;
- a group-limited choice (the experts viewed as G groups, the best groups chosen first) sees its G groups
  repeated m times in the blocked layout: exact with G -> mG groups and the groups chosen -> m times as many
  (``groups``: the sizes a config then changes).

>>> import growir, torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> torch.manual_seed(0) and None
>>> m = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=50))
>>> plan = growir.plan(m)
>>> layer, = moe_layers(plan.facts, plan.captured.gm)
>>> layer.experts, layer.k, layer.split, layer.renormalised, layer.router
(4, 2, True, True, 'model.layers.0.mlp.gate.weight')
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .nodes import back, is_tensor
from .ops import CONTRACTIONS, LAYOUT, SAME_VALUES, aten, kinds, traits
from .walker import ParamAxis, where

TOPK, SIGMOID, SUM = aten("topk"), aten("sigmoid"), aten("sum")
DIVIDES = aten("div", "div_")
SOFTMAX = kinds("softmax")
THROUGH_SUM = SAME_VALUES | aten("add")  # a sum of weights plus a small constant (an eps) is still that sum


@dataclass
class MoeLayer:
    """One mixture-of-experts layer as its graph computes it (see the module docstring)."""
    choice: str  # the topk node that picks the experts
    where: str  # the choice in words (node, op, module), for messages
    experts: int  # E
    k: int  # the experts chosen per token
    router: str  # the router's weight (state name); its rows are the experts
    tensors: list = field(default_factory=list)  # [ParamAxis]: every tensor with an axis on the experts
    outputs: list = field(default_factory=list)  # state names of the expert tensors that make their outputs
    split: bool = False  # a softmax over the experts before the choice: copies share their expert's p
    renormalised: bool = False  # the chosen weights are divided by their sum (or a softmax over the chosen)
    scale: float | None = None  # a constant factor on the combine weights
    score: str = "logits"  # "softmax" | "sigmoid" | "logits": what the router's logits become before the choice
    groups: dict = field(default_factory=dict)  # group-limited choice: {G: "groups", groups chosen: "chosen"}
    group_choice: str | None = None  # the topk node that chooses the groups

    @property
    def copies_sum(self) -> bool:
        """Whether copies' weights sum to their expert's weight with no rescaled tensor (split or renormalised)."""
        return self.split or self.renormalised


def moe_layers(facts, gm: fx.GraphModule) -> list[MoeLayer]:
    """Every mixture-of-experts layer of the graph, in graph order (see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for node in gm.graph.nodes:
        if TOPK(node):
            layer = read_layer(node, facts, order)
            if layer is not None:
                out.append(layer)
    return out


def read_layer(choice: fx.Node, facts, order: dict) -> MoeLayer | None:
    """The layer whose experts ``choice`` picks, or None where it picks from no router's output."""
    ag = facts.ag
    x = choice.args[0]
    dim = _dim(choice, len(facts.axes[x.name]))
    axis = ag.find(facts.axes[x.name][dim])
    upstream, contractions = _upstream(x)
    router = next((c for c in contractions if ag.find(facts.axes[c.name][-1]) == axis), None)
    weight = _param_of(router, facts) if router is not None else None
    if weight is None:
        return None
    experts, classes = int(ag.size_of(axis)), {axis}
    layer = MoeLayer(choice.name, where(choice), experts, int(choice.args[1]), facts.params[weight.name])
    routing = _routing(choice)
    ops = _expert_ops(routing, facts, experts)
    if not ops:  # a top-k whose indices select no weights (a choice within groups, a top-k over logits)
        return None
    classes |= {ag.find(facts.axes[node][i]) for node, i, _ in ops}
    layer.tensors = [ParamAxis(name, i) for node, name in {**facts.params, **facts.buffers}.items()
                     for i, a in enumerate(facts.axes.get(node, [])) if ag.find(a) in classes]
    layer.outputs = _outputs(ops, facts, order)
    layer.score = ("softmax" if any(SOFTMAX(n) and ag.find(facts.axes[n.name][-1]) == axis for n in upstream)
                   else "sigmoid" if any(SIGMOID(n) for n in upstream) else "logits")
    layer.split = layer.score == "softmax"
    _combine(choice, layer)
    layer.groups, layer.group_choice = _groups(upstream, axis, facts)
    return layer


def _dim(node: fx.Node, ndim: int) -> int:
    d = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    return d % ndim


def _upstream(x: fx.Node) -> tuple[set, list]:
    """The nodes ``x`` is computed from, back to (not through) contractions and parameters; the contractions."""
    seen, stack, contractions = set(), [x], []
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if CONTRACTIONS(n):
            contractions.append(n)
            continue
        stack.extend(n.all_input_nodes)
    return seen - set(contractions), contractions


def _param_of(op: fx.Node, facts):
    """The get_attr node of the parameter a contraction applies as its weight, or None."""
    at = traits(op).weight_at
    if at is None or len(op.args) <= at:
        return None
    w = back(op.args[at], LAYOUT)
    return w if isinstance(w, fx.Node) and w.name in facts.params else None


def _routing(choice: fx.Node) -> set:
    """The values computed from the chosen indices alone (sorted ids, counts per expert, offsets)."""
    seeds = [u for u in choice.users if u.args[1:] == (1,)]  # getitem(topk, 1): the indices
    region, stack = set(seeds), list(seeds)
    while stack:
        for u in stack.pop().users:
            if u not in region and all(i in region or not is_tensor(i) for i in u.all_input_nodes):
                region.add(u)
                stack.append(u)
    return region


def _expert_ops(routing: set, facts, experts: int) -> list:
    """(parameter node, its expert axis, op) for each op that applies a parameter to the routing values: a grouped
    matmul by the offsets, a gather of rows by the ids. The expert axis has size E (a pinned one where several)."""
    ag, pinned = facts.ag, {facts.ag.find(a) for a in facts.pins}
    out = []
    for r in routing:
        for op in r.users:
            if op in routing:
                continue
            for arg in op.all_input_nodes:
                p = back(arg, LAYOUT)
                if not isinstance(p, fx.Node) or p.name not in facts.params and p.name not in facts.buffers:
                    continue
                axes = facts.axes[p.name]
                fit = [i for i, a in enumerate(axes) if ag.size_of(a) == experts]
                fit = [i for i in fit if ag.find(axes[i]) in pinned] if len(fit) > 1 else fit
                if len(fit) == 1 and (p.name, fit[0], op) not in out:
                    out.append((p.name, fit[0], op))
    return out


def _outputs(ops: list, facts, order: dict) -> list[str]:
    """The expert tensors that make the experts' outputs: those whose contraction no other expert contraction
    of the layer follows (down_proj, not gate/up; a bias added after it too)."""
    uses = {node: _use(op) for node, _, op in ops}
    contractions = {u for u in uses.values() if CONTRACTIONS(u)}
    out = []
    for node, use in uses.items():
        later = {c for c in contractions if order[c] > order[use]}
        if not later or not _reaches(use, later, order):
            out.append(facts.params.get(node, facts.buffers.get(node)))
    return out


def _use(op: fx.Node) -> fx.Node:
    """Where an expert tensor meets the tokens: its op, or the first contraction after the rows it gathers."""
    n = op
    while not CONTRACTIONS(n) and len(n.users) == 1 and (traits(n).layout or traits(n).kind == "gather"):
        n = next(iter(n.users))
    return n if CONTRACTIONS(n) else op


def _reaches(start: fx.Node, targets: set, order: dict) -> bool:
    """Whether a node of ``targets`` is computed from ``start`` (the walk stops past the last target)."""
    last = max(order[t] for t in targets)
    seen, stack = set(), [start]
    while stack:
        for u in stack.pop().users:
            if u in targets:
                return True
            if u not in seen and order[u] < last:
                seen.add(u)
                stack.append(u)
    return False


def _combine(choice: fx.Node, layer: MoeLayer) -> None:
    """Renormalisation and a constant factor, read from the weights between the choice and the experts'
    outputs (the walk stops at contractions and at ops that take one's output)."""
    seen, stack = set(), [choice]
    while stack:
        for u in stack.pop().users:
            if u in seen or CONTRACTIONS(u) or any(CONTRACTIONS(i) for i in u.all_input_nodes):
                continue
            seen.add(u)
            stack.append(u)
            if SOFTMAX(u) or DIVIDES(u) and _divides_by_own_sum(u):
                layer.renormalised = True
            constant = [a for a in u.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if aten("mul")(u) and len(constant) == 1 and len(u.all_input_nodes) == 1:
                layer.scale = float(constant[0])


def _divides_by_own_sum(div: fx.Node) -> bool:
    """``w / sum(w)`` (plus a small constant): the divisor is a sum of the dividend."""
    num, den = div.args[0], div.args[1]
    if not isinstance(num, fx.Node) or not isinstance(den, fx.Node):
        return False
    total = back(den, lambda n: THROUGH_SUM(n) and not SUM(n))
    return SUM(total) and back(total.args[0], SAME_VALUES) is back(num, SAME_VALUES)


def _groups(upstream: set, axis, facts) -> tuple[dict, str | None]:
    """A group-limited choice: the experts axis viewed as (G groups, E/G), a topk over the groups picks some:
    ({G: "groups", groups chosen: "chosen"}, that topk's node name), or ({}, None)."""
    ag = facts.ag
    structure = ag.structure.get(axis)
    if structure is None or structure.kind != "prod" or len(structure.parts) != 2:
        return {}, None
    outer = ag.find(structure.parts[0])
    for n in upstream:
        if TOPK(n):
            x = n.args[0]
            if ag.find(facts.axes[x.name][_dim(n, len(facts.axes[x.name]))]) == outer:
                return {int(ag.size[outer]): "groups", int(n.args[1]): "chosen"}, n.name
    return {}, None
