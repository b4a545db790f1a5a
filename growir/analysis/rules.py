"""Axis rules: how an op relates the axes of its inputs and outputs, one function ``rule(walker, node)`` each.

A rule may (1) make axes equal, (2) give an axis a product or concatenation structure, (3) record a read
that matters for exactness (a mean, a sum, a contraction), (4) record graph literals that carry a size,
(5) pin axes that must never grow. The op table (``ops.py``) says which op uses which rule; the shape-changing
rules live in ``shape_rules.py``, the norms' in ``norm_rules.py``, the routing ones in ``routing_rules.py``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

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
    """Tensor operands broadcast against the output (add, mul, where, comparisons)."""
    broadcast(w, node, _tensors(node.args), w.out(node))


def unary(w: Walker, node: fx.Node) -> None:
    """The output's axes are the first operand's (activations, casts, copies)."""
    for a, o in zip(w.ax(node.args[0]), w.out(node)):
        w.eq(a, o, node)


def fresh_sized(w: Walker, node: fx.Node) -> None:
    """Creation ops with an explicit size list (zeros([B, S, 32])): the literals carry the axes' sizes."""
    out = w.out(node)
    sizes = node.args[0] if node.args and isinstance(node.args[0], (list, tuple)) else None
    if sizes is not None:
        for i, s in enumerate(sizes):
            if isinstance(s, int) and i < len(out):
                w.const(node, ("args", 0, i), out[i])


def new_sized(w: Walker, node: fx.Node) -> None:
    """new_zeros(x, [B, S, 32]) and friends: the size list (argument 1) carries the axes' sizes."""
    out = w.out(node)
    sizes = node.args[1] if len(node.args) > 1 else []
    for i, s in enumerate(sizes):
        if isinstance(s, int) and i < len(out):
            w.const(node, ("args", 1, i), out[i])


def _dims(dims, ndim: int) -> list:
    if dims is None or dims == []:  # an empty dim list reduces every axis, as None does (sum(x, []))
        return list(range(ndim))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return [d % ndim for d in dims] if ndim else []


def argument(node: fx.Node, name: str, position: int, default=None):
    """An op's argument by its schema name, given by position or keyword: ``dim`` is argument 2 of
    ``linalg_vector_norm(x, ord, dim, keepdim)``, 1 of ``sum(x, dim, keepdim)``, absent from ``sum(x, dtype)``.
    ``position`` is where it sits for a target with no schema.

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> n = g.call_function(torch.ops.aten.linalg_vector_norm.default, (x, 2.0, [-1], True))
    >>> argument(n, "dim", 1), argument(n, "keepdim", 2, False), argument(n, "dtype", 4)
    ([-1], True, None)
    """
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is not None:
        position = next((i for i, a in enumerate(schema.arguments) if a.name == name and not a.kwarg_only), None)
    return node.args[position] if position is not None and position < len(node.args) else default


def reduction(kind: str):
    """The rule of a reduction over ``dim`` (all axes when none is given): a ``kind`` read of each reduced axis,
    the kept axes equal to the output's. Arguments are read by their schema names: the reductions put ``dim``
    and ``keepdim`` at different places (after ``ord`` in a norm, before ``unbiased`` in ``var.dim``)."""
    def rule(w: Walker, node: fx.Node) -> None:
        x = w.ax(node.args[0])
        dims = _dims(argument(node, "dim", 1), len(x))
        keep = bool(argument(node, "keepdim", 2, False))
        outs = w.tuple_out(node) if isinstance(node.meta.get("val"), (list, tuple)) else [w.out(node)]
        kept = [a for i, a in enumerate(x) if i not in dims or keep]
        for i, a in enumerate(x):
            if i in dims:
                w.read(a, kind, node)
        for out in outs:  # the values and, for max/min/var_mean, the indices or means: each with the kept axes
            for a, o in zip(kept, out):
                if w.size(a) == w.size(o):  # a reduced axis kept (keepdim) has size 1 in every output
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


def linear(w: Walker, node: fx.Node) -> None:
    """linear(x, W (out, in), b): x's last axis is contracted with W's axis 1; W's axis 0 is the output's last."""
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
        if len(ba) >= 2 and w.after_softmax(a):  # probabilities @ values: the values' last axis is a head_dim
            w.read(ba[-1], "value", node)


def mm(w: Walker, node: fx.Node) -> None:
    """mm, bmm, matmul: ``matmul`` of the two operands."""
    matmul(w, node, node.args[0], node.args[1], w.out(node))


def addmm(w: Walker, node: fx.Node) -> None:
    """addmm(b, x, W) = b + x @ W; b broadcasts to the product."""
    out = w.out(node)
    matmul(w, node, node.args[1], node.args[2], out)
    broadcast(w, node, [node.args[0]], out)


def einsum(w: Walker, node: fx.Node) -> None:
    """einsum: axes with one letter are equal; letters missing from the output are contracted. An ellipsis is
    written out with letters of its own, its axes broadcast (right-aligned) against the output's."""
    equation, operands = node.args[0].replace(" ", ""), node.args[1]
    lhs, rhs = equation.split("->") if "->" in equation else (equation, None)
    specs, ellipsis = lhs.split(","), ""
    if "." in equation:
        specs, rhs, ellipsis = _written_out(w, node, specs, operands, rhs)
    first = {}
    for spec, t in zip(specs, operands):
        for letter, a in zip(spec, w.ax(t)):
            if letter in ellipsis:
                continue
            if letter in first:
                w.eq(first[letter], a, node)
            else:
                first[letter] = a
    rhs = rhs if rhs is not None else "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    out = dict(zip(rhs, w.out(node)))
    for letter, o in out.items():
        if letter not in ellipsis:
            w.eq(first[letter], o, node)
    for spec, t in zip(specs, operands):  # the ellipsis axes broadcast: equal to the output's unless a 1
        for letter, a in zip(spec, w.ax(t)):
            if letter in ellipsis and w.size(a) == w.size(out[letter]):
                w.eq(a, out[letter], node)
    first.update({c: out[c] for c in ellipsis})
    contracted = [c for c in first if c not in rhs]
    holders = {c: [(t, a) for spec, t in zip(specs, operands) for l, a in zip(spec, w.ax(t)) if l == c]
               for c in contracted}
    for c, pairs in holders.items():
        (ta, aa), (tb, ab) = pairs[0], pairs[-1]
        w.contract(ta, aa, tb, ab, node)
    if len(operands) == 2 and all(w.param_of(t) is None for t in operands):
        _einsum_attention_reads(w, node, specs, operands, rhs, first)


def _written_out(w: Walker, node: fx.Node, specs: list, operands, rhs: str | None) -> tuple:
    """(specs, rhs, the ellipsis' letters): each ``...`` replaced by unused letters, right-aligned across the
    operands as einsum broadcasts them (numpy's rule: an implicit output starts with the ellipsis)."""
    used = set("".join(specs) + (rhs or ""))
    widths = [len(w.ax(t)) - len(s.replace("...", "")) if "..." in s else 0 for s, t in zip(specs, operands)]
    letters = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in used][:max(widths)]
    ellipsis = "".join(letters)
    if rhs is not None and "..." not in rhs and ellipsis:
        from ..errors import UnsupportedOpError
        raise UnsupportedOpError(f"einsum at `{node.name}` sums its ellipsis axes away: write the axes out explicitly")
    specs = [s.replace("...", ellipsis[len(ellipsis) - k:]) for s, k in zip(specs, widths)]
    if rhs is None:
        lhs = ",".join(specs)
        rhs = ellipsis + "".join(sorted(c for c in set(lhs) - {","} - set(ellipsis) if lhs.count(c) == 1))
    return specs, rhs.replace("...", ellipsis), ellipsis


def _einsum_attention_reads(w: Walker, node: fx.Node, specs: list, operands, rhs: str, first: dict) -> None:
    """Attention written as einsum, as ``matmul`` reads it: letters both operands and the output share are
    batch (head) axes; after a softmax, the values' own output letter is a head_dim."""
    for c in rhs:
        if all(c in spec for spec in specs):
            w.read(first[c], "batch", node)
    if w.after_softmax(operands[0]):
        for c in specs[1]:
            if c in rhs and c not in specs[0]:
                w.read(first[c], "value", node)


def embedding(w: Walker, node: fx.Node) -> None:
    """embedding(table, ids): the table's rows are pinned (vocabulary, positions), its columns the output's last."""
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
    w.f.ag.data.extend(out[2:])  # the input's positions, strided (an image's patch grid): the data's, never a width
    if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
        w.produce(node.args[2])
        w.eq(w.ax(node.args[2])[0], out[1], node)


def sdpa(w: Walker, node: fx.Node) -> None:
    """scaled_dot_product_attention(q, k, v): batch, heads (kv heads x a group with enable_gqa), sequence and
    head_dim axes tied across q, k, v and the output; q and k contracted over head_dim."""
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
    """One part of a tuple output: that part's axes."""
    src, i = node.args
    if isinstance(src, fx.Node) and src.name in w.f.tuple_axes:
        for a, o in zip(w.f.tuple_axes[src.name][i], w.out(node)):
            w.eq(a, o, node)
    elif isinstance(src, fx.Node) and isinstance(src.meta.get("val"), (list, tuple)):
        w.tuple_out(src)
        getitem(w, node)


def native_dropout(w: Walker, node: fx.Node) -> None:
    """native_dropout(x) -> (output, mask), both with x's axes."""
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
    """gather(x, dim, index): the output has the index's axes; x's other axes of equal size are equal to them."""
    x, idx, out = w.ax(node.args[0]), w.ax(node.args[2]), w.out(node)
    dim = node.args[1] % len(x)
    for i, (a, o) in enumerate(zip(idx, out)):
        w.eq(a, o, node)
        if i != dim and w.size(x[i]) == w.size(o):
            w.eq(x[i], o, node)
    w.read(x[dim], "index", node)


def index_tensor(w: Walker, node: fx.Node) -> None:
    """x[i0, i1, ...] (aten.index): indexed axes are read; the index tensors broadcast into the output, in place
    of the indexed axes when they are contiguous, first otherwise (numpy's rule)."""
    x, out = w.ax(node.args[0]), w.out(node)
    used, indices, pos = [], [], 0
    for t in node.args[1]:  # a boolean mask indexes as many axes as it has, into one axis of data-dependent size
        val = t.meta.get("val") if isinstance(t, fx.Node) else None
        mask = val is not None and val.dtype in (torch.bool, torch.uint8)
        if t is not None:
            used += list(range(pos, pos + (val.dim() if mask else 1)))
            indices += [] if mask else [t]
        pos += val.dim() if mask else 1
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
    broadcast(w, node, indices, bpart)


def index_select(w: Walker, node: fx.Node) -> None:
    """index_select(x, dim, index): x's axes, except ``dim``, which has the index's length."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.args[1] % len(x)
    w.eq_except(x, out, dim, node)
    w.read(x[dim], "index", node)
    w.eq(w.ax(node.args[2])[0], out[dim], node)


# --- batched products and grouped convolutions ----------------------------------------------------------------


def baddbmm(w: Walker, node: fx.Node) -> None:
    """baddbmm(x, a, b) = beta * x + alpha * (a @ b), batched; x broadcasts to the product's shape."""
    out = w.out(node)
    matmul(w, node, node.args[1], node.args[2], out)
    broadcast(w, node, [node.args[0]], out)


def _groups_at(node: fx.Node) -> tuple:
    """Where a convolution's ``groups`` literal sits in its arguments."""
    return ("args", 6) if len(node.args) > 6 else ("kwargs", "groups")


def grouped_channels(w: Walker, node: fx.Node, xa: list, wa: list, out: list, groups: int) -> None:
    """conv(groups=G): input channels = G x (in per group), output channels = G x (out per group), and group g's
    outputs contract group g's inputs with the weight's axis 1. Depthwise (one input channel per group): the
    groups *are* the channels, so the channel group grows and the ``groups`` literal with it (each channel is
    filtered on its own, so copying channels copies outputs). Otherwise the channels per group may grow, and the
    group count is pinned unless the analysis finds it equal to other axes (Zaya groups q and k channels by head:
    groups = heads + kv heads): then it grows with them, since a grouped convolution is block-diagonal and a copied
    group copies its outputs, and the ``groups`` literal follows it."""
    if w.size(wa[1]) == 1:  # depthwise: groups == input channels
        w.eq(wa[0], out[1], node)
        if w.size(out[1]) == w.size(xa[1]):
            w.eq(xa[1], out[1], node)
        else:  # a channel multiplier m: output channel c * m + j filters input channel c
            mult = w.f.ag.fresh(w.size(out[1]) / w.size(xa[1]), f"channel multiplier at `{node.name}`")
            w.pin(mult, f"the channel multiplier of the depthwise convolution at {where(node)}")
            w.f.ag.set_structure(out[1], "prod", [xa[1], mult], where(node))
        w.const(node, _groups_at(node), xa[1])
        w.produce(node.args[1])
        w.pin(wa[1], f"the one input channel per group of the depthwise convolution at `{node.name}`")
        return
    g = w.f.ag.fresh(groups, f"the groups of the convolution at `{node.name}`")
    w.const(node, _groups_at(node), g)
    w.f.ag.counts.setdefault(g, f"the group count of the grouped convolution at {where(node)} (its `groups` literal)")
    w.f.ag.set_structure(xa[1], "prod", [g, wa[1]], where(node))
    w.contract(node.args[0], xa[1], node.args[1], wa[1], node)
    per_out = w.f.ag.fresh(w.size(wa[0]) / groups, f"output channels per group at `{node.name}`")
    w.f.ag.set_structure(wa[0], "prod", [g, per_out], where(node))
    w.eq(wa[0], out[1], node)

