"""One rule per aten op: how the op relates the axes of its inputs and outputs.

A rule may (1) make axes equal, (2) give an axis a product or concatenation structure, (3) record a read
that matters for exactness (a mean, a sum, a contraction), (4) record graph literals that carry a size,
(5) pin axes that must never grow. Rules are data: ``RULES`` maps an op name to its function, and the
shape-changing rules live in ``shape_rules.py``.
"""

from __future__ import annotations

import torch.fx as fx

from .routing_rules import ROUTING_RULES
from .shape_rules import SHAPE_RULES
from .walker import Walker, where


def _tensors(args) -> list:
    return [a for a in args if isinstance(a, fx.Node) and a.meta.get("val") is not None
            and hasattr(a.meta["val"], "shape")]


def broadcast(w: Walker, node: fx.Node, inputs: list, out: list) -> None:
    """Right-aligned broadcasting: an input axis equals the output axis unless it is a broadcast 1."""
    for t in inputs:
        w.produce(t)
        axes = w.ax(t)
        for i, a in enumerate(reversed(axes)):
            o = out[len(out) - 1 - i]
            if w.size(a) == w.size(o):
                w.eq(a, o, node)


def elementwise(w: Walker, node: fx.Node) -> None:
    broadcast(w, node, _tensors(node.args), w.out(node))


def unary(w: Walker, node: fx.Node) -> None:
    for a, o in zip(w.ax(node.args[0]), w.out(node)):
        w.eq(a, o, node)


def no_axes(w: Walker, node: fx.Node) -> None:
    """Ops whose outputs carry no model axis (fresh masks, random numbers, scalars)."""
    w.out(node)


def fresh_sized(w: Walker, node: fx.Node) -> None:
    """Creation ops with an explicit size list (zeros([B, S, 32])): the literals carry the axes' sizes."""
    out = w.out(node)
    sizes = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else None
    if sizes is not None:
        for i, s in enumerate(sizes):
            if isinstance(s, int) and i < len(out):
                w.const(node, ("args", 0, i), out[i])


def new_sized(w: Walker, node: fx.Node) -> None:
    out = w.out(node)
    sizes = node.args[1] if len(node.args) > 1 else []
    for i, s in enumerate(sizes):
        if isinstance(s, int) and i < len(out):
            w.const(node, ("args", 1, i), out[i])


def _dims(dims, ndim: int) -> list:
    if dims is None:
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims] if ndim else []


def reduction(kind: str):
    def rule(w: Walker, node: fx.Node) -> None:
        x = w.ax(node.args[0])
        dims = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"), len(x))
        keep = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], bool) else node.kwargs.get(
            "keepdim", False)
        out = w.out(node) if not isinstance(node.meta.get("val"), (list, tuple)) else w.tuple_out(node)[0]
        kept = [a for i, a in enumerate(x) if i not in dims or keep]
        for i, a in enumerate(x):
            if i in dims:
                w.read(a, kind, node)
        for a, o in zip(kept, out):
            if w.size(a) == w.size(o):
                w.eq(a, o, node)
        if isinstance(node.meta.get("val"), (list, tuple)):
            for a, o in zip(kept, w.tuple_out(node)[1]):
                w.eq(a, o, node)
    return rule


def along_dim(kind: str):
    """Ops that keep the shape but mix values along one dim (softmax, cumsum)."""
    def rule(w: Walker, node: fx.Node) -> None:
        x, out = w.ax(node.args[0]), w.out(node)
        for a, o in zip(x, out):
            w.eq(a, o, node)
        if x:
            w.read(x[node.args[1] % len(x)], kind, node)
    return rule


def layer_norm(w: Walker, node: fx.Node) -> None:
    x, out = w.ax(node.args[0]), (w.tuple_out(node)[0] if isinstance(node.meta.get("val"), tuple) else w.out(node))
    for a, o in zip(x, out):
        w.eq(a, o, node)
    k = len(node.args[1])
    normed = x[len(x) - k:]
    for i, a in enumerate(normed):
        w.const(node, ("args", 1, i), a)
    w.f.norms.append((node.name, normed))
    for a in normed:
        w.read(a, "norm", node)
    for p in node.args[2:4]:  # weight, bias (rms_norm has eps, a float, at 3)
        w.produce(p)
        for a, b in zip(w.ax(p), normed):
            w.eq(a, b, node)


def linear(w: Walker, node: fx.Node) -> None:
    x, weight = node.args[0], node.args[1]
    xa, wa, out = w.ax(x), w.ax(weight), w.out(node)
    w.eq(xa[-1], wa[1], node)
    w.eq(wa[0], out[-1], node)
    w.contract(x, xa[-1], weight, wa[1], node)
    for a, o in zip(xa[:-1], out[:-1]):
        w.eq(a, o, node)
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        w.produce(node.args[2])
        w.eq(w.ax(node.args[2])[-1], out[-1], node)


def matmul(w: Walker, node: fx.Node, a, b, out: list) -> None:
    """a (..., n, k) @ b (..., k, m) -> (..., n, m), with broadcast batch dims; 1-d operands as in torch."""
    aa, ba = w.ax(a), w.ax(b)
    k_a = aa[-1]
    k_b = ba[-2] if len(ba) >= 2 else ba[-1]
    w.eq(k_a, k_b, node)
    w.contract(a, k_a, b, k_b, node)
    if len(ba) >= 2:
        w.eq(ba[-1], out[-1], node)
    if len(aa) >= 2:
        w.eq(aa[-2], out[-2 if len(ba) >= 2 else -1], node)
    batch_out = out[:-2] if len(aa) >= 2 and len(ba) >= 2 else out[:-1]
    for t_axes in (aa[:-2], ba[:-2]):
        for i, ax in enumerate(reversed(t_axes)):
            o = batch_out[len(batch_out) - 1 - i]
            if w.size(ax) == w.size(o):
                w.eq(ax, o, node)
    if w.param_of(a) is None and w.param_of(b) is None:  # attention written out: batch dims hold the heads
        for o in batch_out:
            w.read(o, "batch", node)
        if len(ba) >= 2 and _after_softmax(a):  # probabilities @ values: the values' last axis is a head_dim
            w.read(ba[-1], "value", node)


def _after_softmax(x) -> bool:
    """Whether ``x`` is a softmax's output, through casts, dropout and copies."""
    while isinstance(x, fx.Node) and x.op == "call_function":
        name = x.target._overloadpacket.__name__ if hasattr(x.target, "_overloadpacket") else ""
        if name in ("softmax", "_softmax"):
            return True
        if name not in ("to", "_to_copy", "type_as", "dropout", "clone", "contiguous", "detach", "alias"):
            return False
        x = x.args[0]
    return False


def mm(w: Walker, node: fx.Node) -> None:
    matmul(w, node, node.args[0], node.args[1], w.out(node))


def addmm(w: Walker, node: fx.Node) -> None:
    out = w.out(node)
    matmul(w, node, node.args[1], node.args[2], out)
    broadcast(w, node, [node.args[0]], out)


def einsum(w: Walker, node: fx.Node) -> None:
    equation, operands = node.args[0].replace(" ", ""), node.args[1]
    lhs, rhs = equation.split("->") if "->" in equation else (equation, None)
    specs = lhs.split(",")
    if "." in equation:
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError(f"einsum with an ellipsis at `{node.name}`: write the axes out explicitly")
    first = {}
    for spec, t in zip(specs, operands):
        for letter, a in zip(spec, w.ax(t)):
            if letter in first:
                w.eq(first[letter], a, node)
            else:
                first[letter] = a
    rhs = rhs if rhs is not None else "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    for letter, o in zip(rhs, w.out(node)):
        w.eq(first[letter], o, node)
    contracted = [c for c in first if c not in rhs]
    holders = {c: [(t, a) for spec, t in zip(specs, operands) for l, a in zip(spec, w.ax(t)) if l == c]
               for c in contracted}
    for c, pairs in holders.items():
        (ta, aa), (tb, ab) = pairs[0], pairs[-1]
        w.contract(ta, aa, tb, ab, node)
    if len(operands) == 2 and all(w.param_of(t) is None for t in operands):
        _einsum_attention_reads(w, node, specs, operands, rhs, first)


def _einsum_attention_reads(w: Walker, node: fx.Node, specs: list, operands, rhs: str, first: dict) -> None:
    """Attention written as einsum, as ``matmul`` reads it: letters both operands and the output share are
    batch (head) axes; after a softmax, the values' own output letter is a head_dim."""
    for c in rhs:
        if all(c in spec for spec in specs):
            w.read(first[c], "batch", node)
    if _after_softmax(operands[0]):
        for c in specs[1]:
            if c in rhs and c not in specs[0]:
                w.read(first[c], "value", node)


def embedding(w: Walker, node: fx.Node) -> None:
    wa, idx, out = w.ax(node.args[0]), w.ax(node.args[1]), w.out(node)
    w.pin(wa[0], f"the table size of the embedding at `{node.name}` (vocabulary or positions)")
    w.produce(node.args[0])
    w.eq(wa[1], out[-1], node)
    for a, o in zip(idx, out[:-1]):
        w.eq(a, o, node)


def conv(w: Walker, node: fx.Node) -> None:
    """Convolution: the input channels are contracted with the weight's axis 1; grouped and depthwise
    convolutions see ``grouped_channels``. Kernel and spatial axes never grow."""
    xa, wa, out = w.ax(node.args[0]), w.ax(node.args[1]), w.out(node)
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    if groups == 1:
        w.eq(xa[1], wa[1], node)
        w.contract(node.args[0], xa[1], node.args[1], wa[1], node)
        w.eq(wa[0], out[1], node)
    else:
        grouped_channels(w, node, xa, wa, out, groups)
    w.eq(xa[0], out[0], node)
    for a in wa[2:] + out[2:]:
        w.pin(a, f"a spatial axis of the convolution at `{node.name}`")
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        w.produce(node.args[2])
        w.eq(w.ax(node.args[2])[0], out[1], node)


def sdpa(w: Walker, node: fx.Node) -> None:
    q, k, v = (w.ax(a) for a in node.args[:3])
    out = w.out(node)
    gqa = node.kwargs.get("enable_gqa", False)
    for t in (k, v):
        w.eq(q[0], t[0], node) if w.size(q[0]) == w.size(t[0]) else None
    w.eq(q[0], out[0], node) if w.size(q[0]) == w.size(out[0]) else None
    w.eq(k[1], v[1], node)
    w.eq(q[1], out[1], node)
    if not gqa or w.size(q[1]) == w.size(k[1]):
        w.eq(q[1], k[1], node)
    else:  # query head h reads kv head h // (Hq / Hk): heads = kv x group
        group = w.f.ag.fresh(w.size(q[1]) / w.size(k[1]), f"query heads per kv head at `{node.name}`")
        w.f.expanded.add(group)
        w.f.ag.set_structure(q[1], "prod", [k[1], group], f"enable_gqa at `{node.name}`")
    w.eq(q[-2], out[-2], node)
    w.eq(k[-2], v[-2], node)
    w.eq(q[-1], k[-1], node)
    w.eq(v[-1], out[-1], node)
    w.contract(node.args[0], q[-1], node.args[1], k[-1], node)
    scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
    if scale is None:
        w.read(q[-1], "scale", node, "default scale 1/sqrt(head_dim) follows the runtime size")
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if isinstance(mask, fx.Node):
        bshape = [q[0], q[1], q[-2], k[-2]]
        broadcast(w, node, [mask], bshape)
    w.f.attention.append({"node": node.name, "q": q, "k": k, "v": v, "out": out, "scaled": scale is not None})


def getitem(w: Walker, node: fx.Node) -> None:
    src, i = node.args
    if isinstance(src, fx.Node) and src.name in w.f.tuple_axes:
        for a, o in zip(w.f.tuple_axes[src.name][i], w.out(node)):
            w.eq(a, o, node)
    elif isinstance(src, fx.Node) and isinstance(src.meta.get("val"), (list, tuple)):
        w.tuple_out(src)
        getitem(w, node)


def native_dropout(w: Walker, node: fx.Node) -> None:
    x = w.ax(node.args[0])
    for t in w.tuple_out(node):
        for a, o in zip(x, t):
            w.eq(a, o, node)


def min_max(w: Walker, node: fx.Node) -> None:
    """min/max: elementwise with a tensor second argument, else a reduction."""
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        elementwise(w, node)
    else:
        reduction("max")(w, node)


def like(w: Walker, node: fx.Node) -> None:
    """zeros_like / full_like: same shape as the input, values unrelated."""
    unary(w, node)


def gather(w: Walker, node: fx.Node) -> None:
    x, idx, out = w.ax(node.args[0]), w.ax(node.args[2]), w.out(node)
    dim = node.args[1] % len(x)
    for i, (a, o) in enumerate(zip(idx, out)):
        w.eq(a, o, node)
        if i != dim and w.size(x[i]) == w.size(o):
            w.eq(x[i], o, node)
    w.read(x[dim], "index", node)


def index_tensor(w: Walker, node: fx.Node) -> None:
    x, out = w.ax(node.args[0]), w.out(node)
    indices = list(node.args[1])
    used = [i for i, t in enumerate(indices) if t is not None]
    for i in used:
        w.read(x[i], "index", node)
    contiguous = used == list(range(used[0], used[-1] + 1))
    rest_before = x[:used[0]] if contiguous else []
    rest_after = x[used[-1] + 1:] if contiguous else [a for i, a in enumerate(x) if i not in used]
    nb = len(out) - len(rest_before) - len(rest_after)
    for a, o in zip(rest_before, out):
        w.eq(a, o, node)
    for a, o in zip(rest_after, out[len(out) - len(rest_after):]):
        w.eq(a, o, node)
    bpart = out[len(rest_before):len(rest_before) + nb]
    broadcast(w, node, [indices[i] for i in used], bpart)


def index_select(w: Walker, node: fx.Node) -> None:
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.args[1] % len(x)
    w.eq_except(x, out, dim, node)
    w.read(x[dim], "index", node)
    w.eq(w.ax(node.args[2])[0], out[dim], node)


UNARY = ["abs", "neg", "relu", "gelu", "silu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "sin", "cos",
         "erf", "to", "_to_copy", "contiguous", "clone", "dropout", "alias", "detach", "lift_fresh_copy",
         "clamp", "clamp_min", "clamp_max", "hardtanh", "leaky_relu", "logical_not", "bitwise_not", "reciprocal",
         "square", "sign", "floor", "ceil", "round", "isnan", "isinf", "softplus", "mish", "elu", "relu_", "gelu_",
         "silu_", "tril", "triu", "feature_dropout", "log1p", "expm1", "erfinv", "hardswish", "hardsigmoid",
         "relu6", "fill", "type_as", "trunc", "sgn"]
BINARY = ["add", "sub", "mul", "div", "rsub", "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge",
          "__and__", "__or__", "__xor__", "bitwise_and", "bitwise_or", "bitwise_xor", "logical_and", "logical_or",
          "maximum", "minimum", "fmod", "remainder", "floor_divide", "lerp", "addcmul", "addcdiv",
          "add_", "mul_", "sub_", "div_", "masked_fill_", "copy_", "copy", "atan2", "hypot"]
REDUCTIONS = {"mean": "norm", "var": "norm", "std": "norm", "var_mean": "norm", "sum": "sum", "prod": "sum",
              "logsumexp": "sum", "amax": "max", "amin": "max", "argmax": "max", "argmin": "max", "any": "max",
              "all": "max", "norm": "sum", "linalg_vector_norm": "sum"}

RULES: dict = {f"aten.{name}": unary for name in UNARY}
RULES.update({f"aten.{name}": elementwise for name in BINARY + ["pow"]})
RULES.update({f"aten.{name}": reduction(kind) for name, kind in REDUCTIONS.items()})
RULES.update({f"aten.{n}": along_dim("softmax") for n in ("softmax", "_softmax", "log_softmax", "_log_softmax")})
RULES.update({f"aten.{n}": along_dim("cumsum") for n in ("cumsum", "cumprod")})
RULES.update({f"aten.{n}": fresh_sized for n in ("zeros", "ones", "full", "empty", "rand", "randn", "arange",
                                                   "scalar_tensor", "tensor", "randint", "linspace")})
RULES.update({f"aten.{n}": new_sized for n in ("new_zeros", "new_ones", "new_full", "new_empty")})
RULES.update({f"aten.{n}": like for n in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like",
                                          "randn_like")})
RULES.update({
    "aten.layer_norm": layer_norm, "aten.native_layer_norm": layer_norm, "aten.rms_norm": layer_norm,
    "aten.linear": linear, "aten.mm": mm, "aten.bmm": mm, "aten.matmul": mm, "aten.addmm": addmm,
    "aten.einsum": einsum, "aten.embedding": embedding, "aten.conv1d": conv, "aten.conv2d": conv,
    "aten.conv3d": conv, "aten.scaled_dot_product_attention": sdpa, "getitem": getitem,
    "aten.native_dropout": native_dropout, "aten.gather": gather, "aten.index": index_tensor,
    "aten.index_select": index_select, "aten.min": min_max, "aten.max": min_max,
})
RULES.update(SHAPE_RULES)

# --- rules added for mixture-of-experts, routing and the ops issue #11 found missing ---------------------------


def baddbmm(w: Walker, node: fx.Node) -> None:
    """baddbmm(x, a, b) = beta * x + alpha * (a @ b), batched; x broadcasts to the product's shape."""
    out = w.out(node)
    matmul(w, node, node.args[1], node.args[2], out)
    broadcast(w, node, [node.args[0]], out)


def grouped_channels(w: Walker, node: fx.Node, xa: list, wa: list, out: list, groups: int) -> None:
    """conv(groups=G): input channels = G x (in per group), output channels = G x (out per group), and group g's
    outputs contract group g's inputs with the weight's axis 1. Depthwise (one input channel per group): the
    groups *are* the channels, so the channel group grows and the ``groups`` literal with it (each channel is
    filtered on its own, so copying channels copies outputs). Otherwise the group count is pinned and the
    channels per group may grow."""
    if w.size(wa[1]) == 1:  # depthwise: groups == input channels
        w.eq(wa[0], out[1], node)
        if w.size(out[1]) == w.size(xa[1]):
            w.eq(xa[1], out[1], node)
        else:  # a channel multiplier m: output channel c * m + j filters input channel c
            mult = w.f.ag.fresh(w.size(out[1]) / w.size(xa[1]), f"channel multiplier at `{node.name}`")
            w.pin(mult, f"the channel multiplier of the depthwise convolution at {where(node)}")
            w.f.ag.set_structure(out[1], "prod", [xa[1], mult], where(node))
        w.const(node, ("args", 6), xa[1])
        w.produce(node.args[1])
        w.pin(wa[1], f"the one input channel per group of the depthwise convolution at `{node.name}`")
        return
    g = w.f.ag.fresh(groups, f"the groups of the convolution at `{node.name}`")
    w.pin(g, f"the group count of the grouped convolution at {where(node)} (its `groups` literal)")
    w.f.ag.set_structure(xa[1], "prod", [g, wa[1]], where(node))
    w.contract(node.args[0], xa[1], node.args[1], wa[1], node)
    per_out = w.f.ag.fresh(w.size(wa[0]) / groups, f"output channels per group at `{node.name}`")
    w.f.ag.set_structure(wa[0], "prod", [g, per_out], where(node))
    w.eq(wa[0], out[1], node)


RULES.update(ROUTING_RULES)
RULES.update({"aten.baddbmm": baddbmm, "aten.detach_": unary})
