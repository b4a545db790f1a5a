"""Exact growth of a normalized group by any ratio: repeat and fill (LEMON, ICLR 2024).

For a group of size d grown to d' = n·d + r (r > 0), the residual stream becomes
``x' = [x, ..., x (n times), m·1 (r times)]`` with m = mean(x) for LayerNorm, 0 for RMSNorm. Then

    mean(x') = m,   var(x') = (n·d/d')·var(x)    (mean of squares likewise, for RMSNorm)

so a norm with eps' = (n·d/d')·eps and weight' = weight·sqrt(n·d/d') on the copies (0 on the fill) outputs
exactly [LN(x) n times, 0]. Producers of the group write the same map (fill rows = the mean of the old
rows, or 0); consumers split by n and read zeros at the fill positions. This requires every norm over the
group to be pre-norm (its output only feeds contractions or the model output): when a norm's output is the
residual itself (post-norm), no elementwise-weighted norm can be exact (docs/methods.md), and growir
falls back to balanced copies and reports the deviation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.ops import ASSERTS, CASTS, CONTRACTIONS, LINEAR, PART, SCALES, back, forward, op_name, traits
from ..analysis.walker import indexes_leading
from ..plan import Plan
from .offsets import weight_param


def _users(n: fx.Node) -> list:
    return [u for u in n.users if not ASSERTS(u)]


@dataclass(eq=False)  # compared and hashed by identity: one per norm in the graph
class NormSite:
    node: str  # the layer_norm node, or the mean of squares of a decomposed RMSNorm
    kind: str  # "layer" | "rms"
    axis: object  # the normalized axis id
    output: fx.Node
    weight: str | None = None
    bias: str | None = None
    eps_at: tuple | None = None  # (node name, arg position) of the eps literal
    eps: float | None = None
    internals: tuple = ()  # the norm's own ops that read its input (layer_norm; or the square and the multiply)

    @property
    def input(self) -> fx.Node:
        """The normalized tensor."""
        if self.kind == "layer":
            return self.output.args[0]
        mean = next(m for m in self.output.graph.nodes if m.name == self.node)
        return mean.args[0].args[0]  # mean(pow(x, 2))


@dataclass
class FillPlan:
    fills: dict = field(default_factory=dict)  # group root -> "mean" | "zero"
    sites: dict = field(default_factory=dict)  # group root -> [NormSite]
    reasons: dict = field(default_factory=dict)  # group root -> why repeat-and-fill does not apply
    copied: dict = field(default_factory=dict)  # whole-ratio group root -> why it is copied instead (exact)


def norm_sites(plan: Plan) -> list[NormSite]:
    f, nodes = plan.facts, {n.name: n for n in plan.captured.gm.graph.nodes}
    sites = []
    for name, axes in f.norms:
        n = nodes[name]
        if len(axes) == 1:
            sites.append(NormSite(name, "layer", axes[0], n, _param(n.args[2], f), _param(n.args[3], f),
                                  (name, 4) if len(n.args) > 4 else None, n.args[4] if len(n.args) > 4 else None,
                                  (n,)))
    for r in f.reads:
        n = nodes[r.node]
        if r.kind == "norm" and op_name(n) == "aten.mean" and _is_square(n.args[0]):
            site = _rms_site(n, r.axis, f)
            if site is not None:
                sites.append(site)
    return sites


def _param(arg, facts):
    return facts.params.get(arg.name) if isinstance(arg, fx.Node) else None


def _is_square(x) -> bool:
    return isinstance(x, fx.Node) and op_name(x) == "aten.pow" and x.args[1] == 2


def _only_user(n: fx.Node, op: str):
    users = _users(n)
    return users[0] if len(users) == 1 and op_name(users[0]) == op else None


def _rms_site(mean: fx.Node, axis, facts) -> NormSite | None:
    """mean(x^2) -> add eps -> rsqrt -> mul(x, .) [-> to] [-> mul(weight, .)]."""
    add = _only_user(mean, "aten.add")
    rsqrt = _only_user(add, "aten.rsqrt") if add is not None else None
    mul = _only_user(rsqrt, "aten.mul") if rsqrt is not None else None
    if mul is None or not isinstance(add.args[1], float):
        return None
    out, weight = mul, None
    while len(_users(out)) == 1 and CASTS(_users(out)[0]):
        out = _users(out)[0]
    nxt = _users(out)[0] if len(_users(out)) == 1 else None
    if nxt is not None and op_name(nxt) == "aten.mul":  # the weight: w, or c + w (a (1 + w) norm)
        params = [p for a in nxt.args[:2] if a is not out and (p := weight_param(a, facts)) is not None]
        if len(params) == 1:
            out, weight = nxt, params[0]
    return NormSite(mean.name, "rms", axis, out, weight, None, (add.name, 1), add.args[1], (mean.args[0], mul))


def _feeds_contractions(node: fx.Node, facts) -> bool:
    """Whether a norm's output only reaches parameter contractions (or the model output): pre-norm."""
    return all(u.op == "output" or (CONTRACTIONS(u) and any(_param_operand(a, facts) for a in u.all_input_nodes))
               for u in forward(node, lambda u: PART(u) or indexes_leading(u)))


def _param_operand(a: fx.Node, facts) -> bool:
    """Whether ``a`` is a parameter, through layout ops (an expert weight is transposed before its matmul)."""
    return back(a, PART).name in facts.params


def plan_fill(plan: Plan, sizes: dict, every: bool = False) -> FillPlan:
    """Which grown groups repeat and fill: a normalized group whose new size is not a whole multiple, or with
    ``every`` each grown normalized group (the fresh width method fills whole ratios too)."""
    ag, out = plan.facts.ag, FillPlan()
    sites = norm_sites(plan)
    for g in plan.groups:
        new = sizes.get(g.id, g.size)
        if g.size is None or new == g.size or (new % g.size == 0 and not every) or not any(
                r.kind == "norm" for r in g.reads):
            continue
        mine = [s for s in sites if g.root in ag.leaf_roots(s.axis)]
        why = _why_not(plan, g, mine)
        if why:
            (out.copied if new % g.size == 0 else out.reasons)[g.root] = why
            continue
        out.fills[g.root] = "mean" if mine[0].kind == "layer" else "zero"
        out.sites[g.root] = mine
    return out


def _why_not(plan: Plan, g, mine: list[NormSite]) -> str:
    ag, f = plan.facts.ag, plan.facts
    norm_reads = {r.node for r in g.reads if r.kind == "norm"}
    if norm_reads - {s.node for s in mine} or any(ag.expand(s.axis) != g.root for s in mine):
        return "a norm over it is not a recognized LayerNorm/RMSNorm over this group alone"
    if len({s.kind for s in mine}) != 1:
        return "LayerNorm and RMSNorm both read it (their fills differ: the mean vs zero)"
    nonlinear = [(s.node, op) for s in mine if (op := _nonlinear_source(s.input))]
    if nonlinear:
        return (f"the norm at `{nonlinear[0][0]}` reads the output of {nonlinear[0][1]}, which is not linear in "
                f"the parameters that write the group: a fill (or a rescale) before it is not what the norm sees")
    post = [s.node for s in mine if not _feeds_contractions(s.output, f)]
    if post:
        return f"the norm at `{post[0]}` feeds the residual stream (post-norm): no exact construction exists"
    for pa in g.producers + g.consumers:
        node = next(n for n, s in f.params.items() if s == pa.param)
        if ag.expand(f.axes[node][pa.axis]) != g.root:
            return f"`{pa.param}` holds it inside a fused axis"
    return ""


def _nonlinear_source(x: fx.Node) -> str | None:
    """The op that makes a norm's input, through layout ops, when it is not linear in the parameters writing
    its terms (an activation such as a GELU between a transform and its norm); None otherwise."""
    x = back(x, PART)
    if x.op in ("get_attr", "placeholder") or LINEAR(x) or SCALES(x) or traits(x).kind in ("contraction", "lookup"):
        return None
    return f"`{op_name(x) if x.op == 'call_function' else x.op}` (at {x.name})"


def adjust_norms(fp: FillPlan, maps: dict, rules: dict, rescaled: set = frozenset()) -> tuple[dict, dict]:
    """Norm weights x sqrt(n·d/d') on the copies and 0 on the fill. Groups whose residual stream is rescaled
    (``rescale.py``) keep their eps; the others need eps x n·d/d'. Returns those eps rewrites in the graph
    ({node: (arg position, eps')}) and the same as values ({eps: eps'}) for a rebuilt config."""
    eps, values = {}, {}
    for root, sites in fp.sites.items():
        m = maps[root]
        ratio = kept_fraction(m)
        for s in sites:
            for p, scale in ((s.weight, math.sqrt(ratio)), (s.bias, 1.0)):
                if p is not None:
                    rules[p].scale *= scale
                    _fill_from_copies(rules[p].axes[-1], m.new, m.old, p == s.weight)
                    rules[p].notes.append(f"repeat-and-fill: x{scale:.4g}" + (", fill 0" if p == s.bias else ""))
            if s.eps_at is not None and s.eps is not None and root not in rescaled:
                eps[s.eps_at[0]] = (s.eps_at[1], s.eps * ratio)
                values[s.eps] = s.eps * ratio
    return eps, values


def kept_fraction(m) -> float:
    """ρ = n·d/d': the share of the filled axis that holds copies (the norms' statistics shrink by it)."""
    return float(m.counts.sum()) / m.new


def open_fill_columns(plan: Plan, fp: FillPlan, maps: dict, rules: dict, kind: str = "copy") -> None:
    """Give the fill dimensions something to learn from. The norm's output is 0 there whatever its weight, and
    a contraction that reads only norm outputs may hold any column there: with copies (or ``kind="random"``
    draws) in both instead of zeros, the fill dimensions of the residual receive gradients; with zeros in
    both they never would."""
    for root, sites in fp.sites.items():
        m, outputs = maps[root], {s.output for s in sites}
        for p, i, source in group_reads(plan, root):
            axis = rules[p].axes[i]
            if axis.divide is not None and source in outputs:
                if kind == "random":
                    axis.fill, axis.source = "random", None
                else:
                    _fill_from_copies(axis, m.new, m.old, True)


def group_reads(plan: Plan, root) -> list[tuple[str, int, fx.Node]]:
    """(parameter, axis, the activation it contracts) for every contraction over the group ``root``."""
    f = plan.facts
    on_group = {(pa.param, pa.axis) for pa in plan.group_of(root).consumers}
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    return [(p, i, reads_from(nodes[node], f)) for p, i, node in f.consumed if (p, i) in on_group]


def _fill_from_copies(axis, new: int, old: int, copy: bool) -> None:
    axis.fill = "copy" if copy else "zero"
    axis.source = torch.arange(new) % old if copy else None


def reads_from(node: fx.Node, facts) -> fx.Node | None:
    """The activation a contraction reads, back through layout ops and multiplications by constants."""
    x = next((a for a in node.args if isinstance(a, fx.Node) and a.name not in facts.params), None)
    return back(x, lambda n: PART(n) or indexes_leading(n) or (SCALES(n) and not isinstance(n.args[1], fx.Node)))


def rewrite_eps(gm: fx.GraphModule, eps: dict) -> None:
    for n in gm.graph.nodes:
        if n.name in eps:
            pos, value = eps[n.name]
            args = list(n.args)
            args[pos] = value
            n.args = tuple(args)
