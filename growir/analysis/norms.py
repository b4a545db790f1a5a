"""The norms of a graph: where each one is, what it normalizes, the parameters that scale its output, what
reads its output (pre-norm: only contractions) and what writes its input (a linear sum of terms, or not).

A norm is a LayerNorm/RMSNorm op (``aten.layer_norm``, ``aten.rms_norm``) or an RMSNorm written out:
``x * rsqrt(mean(x^2) + eps)`` [cast] [``* w`` or ``* (c + w)``]. The passes (repeat-and-fill, the residual
rescale, tied heads, head_dim growth) read these facts instead of walking the graph themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .nodes import back, chain, op_name
from .ops import ADD, ASSERTS, CASTS, CONTRACTIONS, LAYOUT, LINEAR, MEAN, MUL, NORMS, PART, POW, RSQRT, SCALES
from .ops import forward, indexes_leading, traits
from .walker import Facts


@dataclass(eq=False)  # compared and hashed by identity: one per norm in the graph
class NormSite:
    """One norm over one axis: where it is, what it normalizes, its output, and the parameters scaling it."""
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

    def pre_norm(self, facts: Facts) -> bool:
        """Whether the output only reaches parameter contractions (or the model output), through layout ops,
        gathers of whole tokens and products (a padding mask: a zero at the fill stays zero): a pre-norm, whose
        output is not the residual stream itself."""
        return all(u.op == "output" or (CONTRACTIONS(u) and any(is_param(a, facts) for a in u.all_input_nodes))
                   for u in forward(self.output, lambda u: PART(u) or indexes_leading(u) or SCALES(u)))

    def nonlinear_source(self) -> str | None:
        """The op that makes the input, through layout ops, when the input is not linear in the parameters
        writing its terms (an activation such as a GELU between a transform and its norm); None otherwise."""
        x = back(self.input, PART)
        if x.op in ("get_attr", "placeholder") or LINEAR(x) or SCALES(x) or traits(x).kind in ("contraction", "lookup"):
            return None
        return f"`{op_name(x) if x.op == 'call_function' else x.op}` (at {x.name})"


def norm_sites(gm: fx.GraphModule, facts: Facts) -> list[NormSite]:
    """Every norm over one axis: norm ops (from the facts) and written-out RMSNorms (a mean of squares)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = []
    for name, axes in facts.norms:
        n = nodes[name]
        if len(axes) == 1:
            eps = (name, 4) if len(n.args) > 4 else None
            sites.append(NormSite(name, "layer", axes[0], n, _param(n.args[2], facts), _param(n.args[3], facts),
                                  eps, n.args[4] if eps else None, (n,)))
    for r in facts.reads:
        n = nodes[r.node]
        if r.kind == "norm" and MEAN(n) and is_square(n.args[0]):
            site = _rms_site(n, r.axis, facts)
            if site is not None:
                sites.append(site)
    return sites


def _param(arg, facts: Facts):
    return facts.params.get(arg.name) if isinstance(arg, fx.Node) else None


def is_square(x) -> bool:
    """``x ** 2`` (the mean of which an RMSNorm divides by)."""
    return POW(x) and x.args[1] == 2


def _users(n: fx.Node) -> list:
    return [u for u in n.users if not ASSERTS(u)]


def _only_user(n: fx.Node, family):
    users = _users(n)
    return users[0] if len(users) == 1 and family(users[0]) else None


def _rms_site(mean: fx.Node, axis, facts: Facts) -> NormSite | None:
    """mean(x^2) -> add eps -> rsqrt -> mul(x, .) [-> to] [-> mul(weight, .)]."""
    add = _only_user(mean, ADD)
    rsqrt = _only_user(add, RSQRT) if add is not None else None
    mul = _only_user(rsqrt, MUL) if rsqrt is not None else None
    if mul is None or not isinstance(add.args[1], float):
        return None
    out, weight = mul, None
    while len(_users(out)) == 1 and CASTS(_users(out)[0]):
        out = _users(out)[0]
    nxt = _users(out)[0] if len(_users(out)) == 1 else None
    if nxt is not None and MUL(nxt):  # the weight: w, or c + w (a (1 + w) norm)
        params = [p for a in nxt.args[:2] if a is not out and (p := weight_param(a, facts)) is not None]
        if len(params) == 1:
            out, weight = nxt, params[0]
    return NormSite(mean.name, "rms", axis, out, weight, None, (add.name, 1), add.args[1], (mean.args[0], mul))


def is_param(a, facts: Facts) -> bool:
    """Whether ``a`` is a parameter, through layout ops and parts (an expert weight is transposed before its
    matmul)."""
    return back(a, PART).name in facts.params


def weight_param(x, facts: Facts) -> str | None:
    """The parameter behind a norm's weight operand: ``w`` or ``c + w``, through layout ops; else None."""
    x = back(x, LAYOUT)
    if ADD(x) and len(x.args) == 2:
        nodes = [a for a in x.args if isinstance(a, fx.Node)]
        if len(nodes) == 1 and any(isinstance(a, float) for a in x.args):
            x = back(nodes[0], LAYOUT)
    return facts.params.get(x.name) if isinstance(x, fx.Node) and x.op == "get_attr" else None


def weight_uses(node: fx.Node) -> list:
    """The float constant c of each use of ``node`` past layout ops that adds it (``c + w``), None for any other
    use. A norm parametrised as x̂·(1 + w) reads its weight only as 1.0 + w: [1.0, 1.0, ...]."""
    out = []
    for u in forward(node, LAYOUT):
        c = None
        if ADD(u) and len(u.args) == 2:
            other = next((a for a in u.args if not isinstance(a, fx.Node)), None)
            c = other if isinstance(other, float) and u.kwargs.get("alpha", 1) == 1 else None
        out.append(c)
    return out


def scaling_params(x, facts: Facts) -> list[str]:
    """Parameters that scale the output of the norm producing ``x`` (weight and bias), through layout ops and
    parts; [] when ``x`` is no norm's output."""
    x = back(x, PART)
    if not isinstance(x, fx.Node) or x.op != "call_function":
        return []
    if NORMS(x):
        return [facts.params[a.name] for a in x.args[2:4] if isinstance(a, fx.Node) and a.name in facts.params]
    if ADD(x):
        a, b = x.args[:2]
        bias = [facts.params[t.name] for t in (a, b) if isinstance(t, fx.Node) and t.name in facts.params]
        rest = [t for t in (a, b) if isinstance(t, fx.Node) and t.name not in facts.params]
        return bias + scaling_params(rest[0], facts) if len(bias) == 1 and len(rest) == 1 else []
    if MUL(x):  # a norm's weight: w, or c + w (a (1 + w) norm; its rule's offset keeps it right)
        ps = [p for t in x.args[:2] if (p := weight_param(t, facts)) is not None]
        return ps if len(ps) == 1 else []
    return []


def reaches_output(x) -> bool:
    """Whether ``x``, the value it is a layout view of, or another view of that value is returned by the graph."""
    views = lambda u: PART(u) or traits(u).kind == "item"  # noqa: E731
    return any(u.op == "output" for n in chain(x, PART) if isinstance(n, fx.Node) for u in forward(n, views))
