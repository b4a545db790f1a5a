"""Axis rules of the norm ops: what each normalises over (a ``norm`` read: exact under uniform copies, reported
otherwise, growth-math §2), and the per-channel operands that share its axes (weight, bias, running statistics).
The op table (``ops.py``) says which op uses which rule; ``rules.py`` holds the others.
"""

from __future__ import annotations

import torch.fx as fx

from .rules import argument
from .walker import Walker, where


def layer_norm(w: Walker, node: fx.Node) -> None:
    """layer_norm / rms_norm over the last ``len(normalized_shape)`` axes, which its weight and bias share."""
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


def batch_norm(w: Walker, node: fx.Node) -> None:
    """batch_norm(x, weight, bias, running_mean, running_var, training, ...) and its native forms: a map per
    channel (axis 1), which every per-channel operand (weight, bias, running statistics) shares; the other axes
    pass through (the saved statistics of its native forms are per channel too). In training it normalises
    over the batch and spatial axes: a norm read of each.
    """
    x = w.ax(node.args[0])
    parts = w.tuple_out(node) if isinstance(node.meta.get("val"), (list, tuple)) else [w.out(node)]
    for a, o in zip(x, parts[0]):
        w.eq(a, o, node)
    if len(x) < 2:
        return
    operands = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    for p in operands:
        w.produce(p)
    for a in [a for p in operands for a in w.ax(p)] + [p[0] for p in parts[1:] if len(p) == 1]:
        if w.size(a) == w.size(x[1]):  # saved statistics are empty (size 0) in eval
            w.eq(a, x[1], node)
    if argument(node, "training", 5, False) is True:
        for i, a in enumerate(x):
            if i != 1:
                w.read(a, "norm", node)



def group_norm(w: Walker, node: fx.Node) -> None:
    """group_norm(x (N, C, *), num_groups G, weight, bias, eps): C channels in G groups, each normalised over its
    channels and the spatial axes; weight and bias per channel. G = 1: a norm over all of C (as LayerNorm's);
    G = C: each channel alone, a map per channel, so C grows with the ``num_groups`` literal; otherwise C is the
    product (G, C/G), G pinned and the channels of a group read as a norm (copied within their group)."""
    x, out = w.ax(node.args[0]), w.out(node)
    for a, o in zip(x, out):
        w.eq(a, o, node)
    channels, groups = x[1], argument(node, "num_groups", 1)
    for p in (argument(node, "weight", 2), argument(node, "bias", 3)):
        if isinstance(p, fx.Node):
            w.produce(p)
            w.eq(w.ax(p)[0], channels, node)
    for a in x[2:]:
        w.read(a, "norm", node)
    n = w.size(channels)
    if groups == n and groups != 1:
        w.const(node, ("args", 1) if len(node.args) > 1 else ("kwargs", "num_groups"), channels)
    elif groups == 1:
        w.read(channels, "norm", node)
    else:
        g = w.f.ag.fresh(groups, f"the groups of the group norm at `{node.name}`")
        w.pin(g, f"the group count of the group norm at {where(node)} (its `num_groups` literal)")
        per = w.f.ag.fresh(n / groups, f"channels per group at `{node.name}`")
        w.f.ag.set_structure(channels, "prod", [g, per], where(node))
        w.read(per, "norm", node)
