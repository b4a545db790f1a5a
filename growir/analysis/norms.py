"""The norms of a graph: where each one is, what it normalizes, the parameters that scale its output, what
reads its output (pre-norm: only contractions) and what writes its input (a linear sum of terms, or not).

A norm is a LayerNorm/RMSNorm op (``aten.layer_norm``, ``aten.rms_norm``) or one written out, recognised by its
arithmetic (never by its module's class), in any dtype casts between the steps:

- RMS: ``x * rsqrt(mean(x^2) + eps)``, or ``x / sqrt(mean(x^2) + eps)`` (``x^2``: ``pow``, ``square`` or ``x * x``;
  the root: also ``pow(., ∓0.5)``);
- LayerNorm: the same over ``x - mean(x)``: ``(x - m) * rsqrt(mean((x - m)^2) + eps)``, m = mean(x) over the axis;

each optionally followed by a weight (``* w`` or ``* (c + w)``) and then a bias (``+ b``), or by neither (a norm with
no affine parameters). The passes (repeat-and-fill, the residual rescale, tied heads, head_dim growth) read these
facts instead of walking the graph themselves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.fx as fx

from .nodes import back, chain, op_name
from .ops import ADD, ASSERTS, CASTS, CONTRACTIONS, DIV, LAYOUT, LINEAR, MEAN, MUL, NORMS, PART, POW, RSQRT, SCALES
from .ops import LINEAR_IN_FIRST, aten, forward, indexes_leading, traits
from .walker import Facts

# single ops a written-out norm is made of (beyond ops.py's ADD, MUL, DIV, POW, RSQRT, MEAN): what they compute
# decides, so they are matched here as moe.py matches its own
SUB, SQRT, SQUARE = aten("sub"), aten("sqrt"), aten("square")


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
    internals: tuple = ()  # the norm's own ops that read its input (layer_norm; or the mean, square, multiply...)
    source: fx.Node | None = None  # the normalized tensor of a written-out norm (a norm op's is its first operand)
    means: tuple = ()  # names of every mean over the axis a written-out norm takes (LayerNorm: of x and of (x-m)^2)

    @property
    def input(self) -> fx.Node:
        """The normalized tensor."""
        return self.source if self.source is not None else self.output.args[0]

    @property
    def reads(self) -> tuple:
        """Names of the nodes by which the norm reads its axis (the walker's ``norm`` reads)."""
        return self.means or (self.node,)

    def pre_norm(self, facts: Facts) -> bool:
        """Whether the output only reaches parameter contractions (or the model output), through layout ops,
        gathers of whole tokens and products (a padding mask: a zero at the fill stays zero): a pre-norm, whose
        output is not the residual stream itself."""
        return all(u.op == "output" or (CONTRACTIONS(u) and any(is_param(a, facts) for a in u.all_input_nodes))
                   for u in forward(self.output, lambda u: PART(u) or indexes_leading(u) or SCALES(u)))

    def nonlinear_source(self, zero_fill: bool = False) -> str | None:
        """The op that makes the input, through layout ops, when the input is not linear in the parameters
        writing its terms (an activation such as a GELU between a transform and its norm); None otherwise.
        With ``zero_fill`` (an RMSNorm's fill is 0, not a mean) an elementwise op that keeps zero at zero
        (``keeps_zero``: a GELU, SiLU, ReLU, tanh) passes too: zero in, zero out, whatever its curve; so does an
        attention, zero where its values are (a norm over the heads of its output: new heads' values are 0)."""
        x = back(self.input, LINEAR_IN_FIRST)
        while zero_fill and (keeps_zero(x) or traits(x).kind == "attention"):  # attention: zero where values are
            x = back(x.args[2] if traits(x).kind == "attention" else x.args[0], LINEAR_IN_FIRST)
        if x.op in ("get_attr", "placeholder") or LINEAR(x) or SCALES(x) or traits(x).kind in (
                "contraction", "lookup", "sum"):  # sums of their tensor operands (add, cat, stack, where, scatter-add)
            return None
        return f"`{op_name(x) if x.op == 'call_function' else x.op}` (at {x.name})"


def keeps_zero(node: fx.Node) -> bool:
    """Whether an elementwise op of one tensor is zero wherever its input is (f(0) = 0), asked of the op itself:
    it runs once on zeros with the node's own literal arguments (cached per op and arguments)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and traits(node).kind == "pointwise"):
        return False
    if any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
        return False
    key = (node.target, tuple(node.args[1:]), tuple(sorted(node.kwargs.items())))
    try:
        return _keeps_zero(*key)
    except TypeError:  # an unhashable literal: not cached, asked again
        return _keeps_zero.__wrapped__(*key)


@functools.lru_cache(maxsize=None)
def _keeps_zero(target, args: tuple, kwargs: tuple) -> bool:
    try:
        y = target(torch.zeros(4), *args, **dict(kwargs))
    except Exception:  # noqa: BLE001 -- an op that does not run on a float vector of zeros claims nothing
        return False
    return isinstance(y, torch.Tensor) and y.shape == (4,) and bool((y == 0).all())


def norm_sites(gm: fx.GraphModule, facts: Facts) -> list[NormSite]:
    """Every norm over one axis: norm ops (from the facts) and written-out norms (a mean of squares)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = []
    for name, axes in facts.norms:
        n = nodes[name]
        if len(axes) == 1:
            rms = traits(n).zero != "affine"  # rms_norm(x, shape, weight, eps): no mean, no bias operand
            at = 3 if rms else 4
            eps = (name, at) if len(n.args) > at and isinstance(n.args[at], float) else None
            bias = None if rms or len(n.args) < 4 else _param(n.args[3], facts)
            sites.append(NormSite(name, "rms" if rms else "layer", axes[0], n,
                                  _param(n.args[2], facts) if len(n.args) > 2 else None, bias,
                                  eps, n.args[at] if eps else None, (n,)))
    for r in facts.reads:
        n = nodes[r.node]
        if r.kind == "norm" and MEAN(n) and squared(n.args[0]) is not None:
            site = written_site(n, r.axis, facts)
            if site is not None:
                sites.append(site)
    return sites


def _param(arg, facts: Facts):
    return facts.params.get(arg.name) if isinstance(arg, fx.Node) else None


def is_square(x) -> bool:
    """``x ** 2`` (the mean of which an RMSNorm divides by)."""
    return POW(x) and x.args[1] == 2


def squared(x) -> fx.Node | None:
    """The ``v`` of ``x = v ** 2`` (``pow(v, 2)``, ``square(v)`` or ``v * v``); None when ``x`` is no square."""
    if not isinstance(x, fx.Node):
        return None
    if is_square(x) or SQUARE(x):
        return x.args[0]
    return x.args[0] if MUL(x) and len(x.args) == 2 and x.args[0] is x.args[1] else None


def _users(n: fx.Node) -> list:
    return [u for u in n.users if not ASSERTS(u)]


def _only_user(n: fx.Node, family):
    users = _users(n)
    return users[0] if len(users) == 1 and family(users[0]) else None


def _centred(v: fx.Node, mean: fx.Node) -> tuple | None:
    """(x, mean(x)) when ``v`` is ``x - mean(x)`` with that mean over the same dims as ``mean``; else None."""
    if not (isinstance(v, fx.Node) and SUB(v) and len(v.args) == 2 and isinstance(v.args[1], fx.Node)
            and v.kwargs.get("alpha", 1) == 1):
        return None
    x, m = v.args
    same = MEAN(m) and m.args[0] is x and list(m.args[1:]) == list(mean.args[1:])
    return (x, m) if same else None


def _normalized(mean: fx.Node) -> tuple | None:
    """(the add of eps, the product or quotient that divides by the root, the tensor it divides) for
    ``mean + eps`` followed by ``v * rsqrt(.)`` or ``v / sqrt(.)`` (or ``pow(., -0.5)``, ``pow(., 0.5)``); None for
    anything else."""
    add = _only_user(mean, ADD)
    if add is None or sum(isinstance(a, float) for a in add.args[:2]) != 1:
        return None
    root = _only_user(add, lambda u: RSQRT(u) or SQRT(u) or (POW(u) and u.args[1] in (0.5, -0.5)))
    inverse = root is not None and (RSQRT(root) or POW(root) and root.args[1] == -0.5)
    scaled = _only_user(root, MUL if inverse else DIV) if root is not None else None
    if scaled is None or len(scaled.args) != 2 or scaled.args[0] is scaled.args[1]:
        return None
    if DIV(scaled):
        return (add, scaled, scaled.args[0]) if scaled.args[1] is root else None
    return add, scaled, next(a for a in scaled.args if a is not root)


def written_site(mean: fx.Node, axis, facts: Facts) -> NormSite | None:
    """The norm written out around ``mean`` (the mean of a square, over ``axis``): RMS when the square is of the
    normalized tensor, LayerNorm when it is of that tensor less its mean over the same dims; None when the ops
    around it compute anything else (module docstring)."""
    if len(mean.args) < 2 or not isinstance(mean.args[1], (list, tuple)) or len(mean.args[1]) != 1:
        return None  # a mean over several axes normalizes no single axis
    v = squared(mean.args[0])
    centred = _centred(v, mean)
    found = _normalized(mean)
    if found is None:
        return None
    add, scaled, numerator = found
    if not (numerator is v or (centred is not None and _centred(numerator, mean) == centred)):
        return None
    x = centred[0] if centred else v
    out, weight, bias = _affine(scaled, facts)
    ops = {mean.args[0], scaled, numerator} | ({centred[1], v} if centred else set())
    eps_pos = next(i for i, a in enumerate(add.args[:2]) if isinstance(a, float))
    return NormSite(mean.name, "layer" if centred else "rms", axis, out, weight, bias, (add.name, eps_pos),
                    add.args[eps_pos], tuple(u for u in _users(x) if u in ops), x,
                    (centred[1].name, mean.name) if centred else ())


def _past_casts(n: fx.Node) -> fx.Node:
    while len(_users(n)) == 1 and CASTS(_users(n)[0]):
        n = _users(n)[0]
    return n


def _affine(normalized: fx.Node, facts: Facts) -> tuple:
    """(the norm's output, its weight, its bias) after the normalized tensor: ``* w`` (or ``* (c + w)``) and then
    ``+ b``, each optional, in casts."""
    out, weight, bias = _past_casts(normalized), None, None
    nxt = _users(out)[0] if len(_users(out)) == 1 else None
    if nxt is not None and MUL(nxt):  # the weight: w, or c + w (a (1 + w) norm)
        params = [p for a in nxt.args[:2] if a is not out and (p := weight_param(a, facts)) is not None]
        if len(params) == 1:
            out, weight = nxt, params[0]
    after = _past_casts(out)
    nxt = _users(after)[0] if len(_users(after)) == 1 else None
    if nxt is not None and ADD(nxt) and len(nxt.args) == 2 and nxt.kwargs.get("alpha", 1) == 1:
        params = [p for a in nxt.args if a is not after and (p := _param(back(a, LAYOUT), facts)) is not None]
        if len(params) == 1:
            out, bias = nxt, params[0]
    return out, weight, bias


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
    tensors = [a for a in x.args[:2] if isinstance(a, fx.Node)]
    if SCALES(x) and len(tensors) == 1 and (MUL(x) or x.args[0] is tensors[0]):  # x * c, x / c (MiniCPM's logit
        return scaling_params(tensors[0], facts)  # scale): linear in x, so whatever scales x scales it
    if MUL(x):  # a norm's weight: w, or c + w (a (1 + w) norm; its rule's offset keeps it right)
        ps = [p for t in x.args[:2] if (p := weight_param(t, facts)) is not None]
        return ps if len(ps) == 1 else []
    at = traits(x).weight_at if CONTRACTIONS(x) else None
    if at is not None and len(forward(x, PART)) == 1:  # a projection read by the head alone (OPT's project_out)
        ps = [back(a, LAYOUT) for a in x.args[at:at + 2] if isinstance(a, fx.Node)]  # its weight and its bias
        if ps and all(a.name in facts.params for a in ps) and traits(x).bias_at in (None, at + 1):
            return [facts.params[a.name] for a in ps]
    return []


def reaches_output(x) -> bool:
    """Whether ``x``, the value it is a layout view of, or another view of that value is returned by the graph."""
    views = lambda u: PART(u) or traits(u).kind == "item"  # noqa: E731
    return any(u.op == "output" for n in chain(x, PART) if isinstance(n, fx.Node) for u in forward(n, views))
