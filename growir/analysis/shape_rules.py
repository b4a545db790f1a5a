"""Rules for ops that move, split, join or reshape axes.

- A reshape keeps the row-major flat index: ``prod(in axes) == prod(out axes)``, aligned by ``AxisGraph.align``.
- A slice, split or cat cuts one axis into consecutive parts: ``axis == cat(parts)``.
- An expand or repeat creates a replica axis: ``out == prod(replicas, in)`` (grouped-query heads).
Literal sizes in the op's arguments are recorded, so a rewritten graph can update them.
"""

from __future__ import annotations

import operator
import re

import sympy
import torch.fx as fx

from ..errors import AnalysisError
from .nodes import permutation
from .walker import Walker, where

INT_MAX = 2 ** 62


def _is_int(e) -> bool:
    return isinstance(e, sympy.Integer) or (isinstance(e, sympy.Expr) and e.is_Integer)


def _record_size_list(w: Walker, node: fx.Node, argpos: int, out: list, offset: int = 0) -> None:
    sizes = node.args[argpos] if len(node.args) > argpos else []
    for i, s in enumerate(sizes):
        axis = out[offset + i]
        if isinstance(s, int) and s != -1:
            w.const(node, ("args", argpos, i), axis)
        elif isinstance(s, fx.Node) and s.target is operator.mul:
            # e.g. batch * num_heads computed as sym_size * 4. A floordiv's literal is a divisor, not a factor of
            # the axis (a padded sequence cut into chunks: padded // chunk), so it is left as it is.
            for j, v in enumerate(s.args):
                if isinstance(v, int):
                    w.const(node, ("sym", s.name, j), axis, "factor")


def reshape(w: Walker, node: fx.Node) -> None:
    """A reshape keeps the row-major flat index; view/reshape/unflatten size literals are recorded."""
    x, out = w.ax(node.args[0]), w.out(node)
    w.f.ag.align("prod", x, out, where(node))
    name = node.target._overloadpacket.__name__
    if name in ("view", "reshape", "_unsafe_view"):
        _record_size_list(w, node, 1, out)
    elif name == "unflatten":
        _record_size_list(w, node, 2, out, offset=node.args[1] % len(x))


def permute(w: Walker, node: fx.Node) -> None:
    """permute, transpose, t: output axis k is input axis ``order[k]``."""
    x, out = w.ax(node.args[0]), w.out(node)
    for o, i in zip(out, permutation(node, len(x))):
        w.eq(x[i], o, node)


def expand(w: Walker, node: fx.Node) -> None:
    """expand / broadcast_to: equal axes stay equal, broadcast ones are replicas (grouped-query kv heads)."""
    x, out = w.ax(node.args[0]), w.out(node)
    lead = len(out) - len(x)
    for i, a in enumerate(x):
        o = out[lead + i]
        if w.size(a) == w.size(o):
            w.eq(a, o, node)
        else:
            w.f.expanded.add(o)
    if node.target._overloadpacket.__name__ == "expand":
        _record_size_list(w, node, 1, out)


def repeat(w: Walker, node: fx.Node) -> None:
    """repeat(x, reps): each repeated axis is the product of a replica axis and the input's."""
    x, out = w.ax(node.args[0]), w.out(node)
    reps = list(node.args[1])
    lead = len(out) - len(x)
    for i, r in enumerate(reps):
        o = out[i]
        src = x[i - lead] if i >= lead else None
        if src is not None and w.size(src) == 1 and w.size(o) != 1 and _produced(w, src):
            raise AnalysisError(f"{where(node)}: repeats an axis of one entry that a parameter produces (one head "
                                "of a split, say); growir takes an axis of size one in a product for a broadcast, "
                                "so it cannot follow this one as it grows. A model with two or more entries "
                                "there grows")
        if src is None or (w.size(src) == 1 and w.size(o) != 1):  # a new axis, or one broadcast from 1
            w.f.expanded.add(o)
            if isinstance(r, int):  # the literal is the axis's size: it follows the axis if a group joins it
                w.const(node, ("args", 1, i), o)
        elif isinstance(r, int) and r == 1:
            w.eq(src, o, node)
        else:  # r copies of src, r a literal or a symbolic size (position_ids.repeat(batch, 1))
            rep = w.f.ag.fresh(w.size(o) / w.size(src), f"repeat at `{node.name}`")
            w.f.expanded.add(rep)
            w.f.ag.set_structure(o, "prod", [rep, src], where(node))
            if isinstance(r, int):
                w.const(node, ("args", 1, i), rep)


def _produced(w: Walker, axis) -> bool:
    """Whether ``axis``'s class is a proper part of some parameter's axis (one head of a split projection: a
    width, not a broadcast). A parameter's own axis of size one (a learned probe of shape (1, 1, d) repeated
    over the batch) is a broadcast."""
    ag = w.f.ag
    root = ag.find(axis)
    return any(ag.find(a) != root and root in ag.leaf_roots(a) for node in w.f.params for a in w.f.axes.get(node, []))


def repeat_interleave(w: Walker, node: fx.Node) -> None:
    """repeat_interleave(x, r, dim): ``dim`` becomes the product of the input's and r copies."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else None)
    if dim is None or not isinstance(node.args[1], int):
        for a in out:
            w.pin(a, f"flattened by repeat_interleave at `{node.name}`")
        return
    dim %= len(x)
    for i, (a, o) in enumerate(zip(x, out)):
        if i != dim:
            w.eq(a, o, node)
    rep = w.f.ag.fresh(node.args[1], f"repeat_interleave at `{node.name}`")
    w.f.expanded.add(rep)
    w.f.ag.set_structure(out[dim], "prod", [x[dim], rep], where(node))
    w.const(node, ("args", 1), rep)
    if isinstance(node.kwargs.get("output_size"), int):  # checked against the output's size at run time
        w.const(node, ("kwargs", "output_size"), out[dim])


def select(w: Walker, node: fx.Node) -> None:
    """select(x, dim, i): ``dim`` is read at i and dropped; the other axes pass."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.args[1] % len(x)
    w.read(x[dim], "select", node, node.args[2])
    for a, o in zip([a for i, a in enumerate(x) if i != dim], out):
        w.eq(a, o, node)


def _cut(w: Walker, node: fx.Node, axis, start, out_axis) -> list | None:
    """``axis`` == cat(pre, out_axis, post) for a slice of ``out_axis``'s length at ``start``; returns the
    parts, or None where no structure applies (sequence-axis slicing, or the whole axis)."""
    n = w.size(axis)
    if not _is_int(n) or not isinstance(start, int) or not _is_int(w.size(out_axis)):
        return  # sequence-axis slicing: unrelated axes
    n, length = int(n), int(w.size(out_axis))
    if start == 0 and length == n:
        w.eq(axis, out_axis, node)
        return
    parts = []
    if start > 0:
        pre = w.f.ag.fresh(start, f"before the slice at `{node.name}`")
        parts.append(pre)
    parts.append(out_axis)
    if start + length < n:
        parts.append(w.f.ag.fresh(n - start - length, f"after the slice at `{node.name}`"))
    w.f.ag.set_structure(axis, "cat", parts, where(node))
    return parts


def slice_(w: Walker, node: fx.Node) -> None:
    """slice(x, dim, start, end, step): ``dim`` is cut into (before, the slice, after)."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    end = node.args[3] if len(node.args) > 3 and node.args[3] is not None else INT_MAX
    step = node.args[4] if len(node.args) > 4 else 1
    w.eq_except(x, out, dim, node)
    if step != 1:
        if not _strided(w, node, x[dim], out[dim], start, end, step):
            w.read(x[dim], "index", node)
        return
    n = w.size(x[dim])
    if isinstance(start, int) and start < 0 and _is_int(n):
        start += int(n)
    parts = _cut(w, node, x[dim], start, out[dim])
    if parts:
        pre = parts[0] if start > 0 else None
        if pre is not None:
            w.const(node, ("args", 2), pre, "size")
        if isinstance(end, int) and end < INT_MAX:
            w.const(node, ("args", 3), (pre, out[dim]) if pre is not None else out[dim], "end")
    elif start == 0 and (not isinstance(end, int) or end >= INT_MAX) and w.size(x[dim]) == w.size(out[dim]):
        w.eq(x[dim], out[dim], node)


def _strided(w: Walker, node: fx.Node, axis, out_axis, start, end, step) -> bool:
    """``x[..., j::k]`` over a whole axis of k·m entries: entry i·k + j, so the axis is the product (m, k) and the
    slice keeps the outer m (interleaved pairs: ``q[..., 0::2]``, ``q[..., 1::2]``); m grows, k is pinned. False
    where that does not hold (a partial range, a size not a multiple of k, an axis already a concatenation)."""
    n, ag = w.size(axis), w.f.ag
    if not (_is_int(n) and isinstance(start, int) and isinstance(step, int) and 0 <= start < step
            and isinstance(end, int) and end >= INT_MAX and int(n) % step == 0):  # no literal holds the size
        return False
    structure = ag.structure.get(ag.find(axis))
    if structure is not None and structure.kind != "prod":
        return False
    k = ag.fresh(step, f"the step of the strided slice at `{node.name}`")
    w.pin(k, f"the step of the strided slice at {where(node)}")
    ag.set_structure(axis, "prod", [out_axis, k], where(node))
    return True


def narrow(w: Walker, node: fx.Node) -> None:
    """narrow(x, dim, start, length): a slice."""
    x, out = w.ax(node.args[0]), w.out(node)
    dim = node.args[1] % len(x)
    w.eq_except(x, out, dim, node)
    parts = _cut(w, node, x[dim], node.args[2], out[dim])
    if parts:
        if node.args[2] > 0:
            w.const(node, ("args", 2), parts[0], "size")
        w.const(node, ("args", 3), out[dim], "size")


def _join(w: Walker, node: fx.Node, whole: list, pieces: list, dim: int) -> None:
    """``whole[dim]`` == cat(piece[dim] for pieces); the other axes are equal."""
    # torch.cat skips a 1-d empty operand in a cat of any rank (a legacy empty cache: cat([empty(0), x], -2))
    pieces = [p for p in pieces if len(p) == len(whole) and not (w.size(p[dim]) == 0)]
    for p in pieces:
        for i, (a, o) in enumerate(zip(p, whole)):
            if i != dim:
                w.eq(a, o, node)
    sizes = [w.size(p[dim]) for p in pieces]
    if all(_is_int(s) for s in sizes):
        w.f.ag.set_structure(whole[dim], "cat", [p[dim] for p in pieces], where(node))


def cat(w: Walker, node: fx.Node) -> None:
    """cat(tensors, dim): the output's ``dim`` is the concatenation of the inputs'."""
    out = w.out(node)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(out)
    _join(w, node, out, [w.ax(t) for t in node.args[0]], dim)


def split(w: Walker, node: fx.Node) -> None:
    """split / split_with_sizes: the input's ``dim`` is the concatenation of the parts'."""
    x = w.ax(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(x)
    parts = w.tuple_out(node)
    _join(w, node, x, parts, dim)
    name = node.target._overloadpacket.__name__
    if name == "split" and isinstance(node.args[1], int):
        w.const(node, ("args", 1), parts[0][dim], "size")
    elif name == "split_with_sizes":
        for i, p in enumerate(parts):
            w.const(node, ("args", 1, i), p[dim], "size")


def chunk(w: Walker, node: fx.Node) -> None:
    """chunk(x, n, dim): split into n parts."""
    x = w.ax(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(x)
    _join(w, node, x, w.tuple_out(node), dim)


def unbind(w: Walker, node: fx.Node) -> None:
    """unbind(x, dim): ``dim`` is read (indexed) and each part has the other axes."""
    x = w.ax(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(x)
    w.read(x[dim], "index", node)
    for t in w.tuple_out(node):
        for a, o in zip([a for i, a in enumerate(x) if i != dim], t):
            w.eq(a, o, node)


def stack(w: Walker, node: fx.Node) -> None:
    """stack(tensors, dim): every input's axes are the output's other than the new ``dim``."""
    out = w.out(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(out)
    rest = [a for i, a in enumerate(out) if i != dim]
    for t in node.args[0]:
        for a, o in zip(w.ax(t), rest):
            w.eq(a, o, node)


def pad(w: Walker, node: fx.Node) -> None:
    """constant_pad_nd / pad: unpadded axes pass; a padded axis is read as an index."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        if w.size(a) == w.size(o):
            w.eq(a, o, node)
        else:
            w.read(a, "index", node)


def pool(w: Walker, node: fx.Node) -> None:
    """avg/max/adaptive pooling over the last k axes (k from the op: 1d, 2d, 3d): those axes are pooled, and
    the output's are new (sized by the op's literals); the leading (batch, channel) axes pass through."""
    x, out = w.ax(node.args[0]), (w.tuple_out(node)[0] if isinstance(node.meta.get("val"), (list, tuple))
                                  else w.out(node))
    name = node.target._overloadpacket.__name__
    k = int(re.search(r"(\d)d", name).group(1))
    for a, o in zip(x[:len(x) - k], out):
        w.eq(a, o, node)
    kept = _unpooled(node, k) if not name.startswith(("adaptive", "_adaptive")) else [False] * k
    for a, o, same in zip(x[len(x) - k:], out[len(out) - k:], kept):
        if same:  # a window of 1 at stride 1: a sequence pooled over (seq, hidden) by (2, 1) keeps hidden
            w.eq(a, o, node)
            continue
        w.read(a, "max" if "max" in name else "sum", node)
        w.pin(o, f"a pooled axis of {where(node)}")
        w.f.ag.data.append(o)  # pooled axes are the data's (a sequence, an image), never a width


def _unpooled(node: fx.Node, k: int) -> list:
    """Per pooled axis, whether the pool leaves it as it is: window 1, stride 1, no padding (or dilation)."""
    def per_axis(pos, default):
        v = node.args[pos] if len(node.args) > pos and node.args[pos] not in (None, []) else default
        return list(v) * (k if len(v) == 1 else 1) if isinstance(v, (list, tuple)) else [v] * k
    kernel = per_axis(1, [0])
    stride, padding = per_axis(2, kernel), per_axis(3, [0])
    return [kk == 1 and st == 1 and pd == 0 for kk, st, pd in zip(kernel, stride, padding)]


def im2col(w: Walker, node: fx.Node) -> None:
    """im2col(x (N, C, H, W), kernel_size, ...) -> (N, C·K, L) (``F.unfold``): each block's K = prod(kernel_size)
    entries of channel c sit at c·K + k, so the output's axis is the product (C, K) and C grows through it; K, the
    spatial axes and the block count L are the image's, pinned."""
    _image_and_columns(w, node, w.ax(node.args[0]), w.out(node), node.args[1])


def col2im(w: Walker, node: fx.Node) -> None:
    """col2im(x (N, C·K, L), output_size, kernel_size, ...) -> (N, C, H, W) (``F.fold``), im2col's inverse: the
    overlapping entries summed are channel c's own, so C grows as in ``im2col``."""
    _image_and_columns(w, node, w.out(node), w.ax(node.args[0]), node.args[2])


def _image_and_columns(w: Walker, node: fx.Node, image, columns, kernel) -> None:
    """An image's axes (N, C, H, W) and its columns' (N, C·K, L): batch axes equal, (C, K) the columns' product,
    the spatial axes and the block count pinned."""
    _patches(w, node, image[-3], columns[-2], kernel)
    for a, o in zip(image[:-3], columns[:-2]):
        w.eq(a, o, node)
    for a in image[-2:] + columns[-1:]:
        w.pin(a, f"a spatial axis of the patches at {where(node)}")


def _patches(w: Walker, node: fx.Node, channels, patches, kernel) -> None:
    """``patches`` == (``channels``, K) for K = prod(``kernel``), channel-major; K pinned."""
    k = 1
    for s in kernel:
        k *= s
    if k == 1:
        w.eq(channels, patches, node)
        return
    entries = w.f.ag.fresh(k, f"the kernel entries of the patches at `{node.name}`")
    w.pin(entries, f"the kernel entries of the patches at {where(node)}")
    w.f.ag.set_structure(patches, "prod", [channels, entries], where(node))
