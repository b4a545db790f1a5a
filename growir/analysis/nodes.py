"""Plain helpers on fx nodes that know no op: an op's table key, and the walk back along data operands.

They sit below the op table (``ops.py``) and the walker, which both use them; anything that asks what an op
*does* asks the table instead.

>>> g = fx.symbolic_trace(lambda x: x.relu().t()).graph
>>> [n.name for n in chain(list(g.nodes)[2], lambda n: n.name in ("relu", "t"))]
['t', 'relu', 'x']
"""

from __future__ import annotations

import torch
import torch.fx as fx


def op_name(node: fx.Node) -> str:
    """The op table's key for a node: 'aten.linear' for aten.linear.default (namespace, then the op); the
    function name for Python callables ('getitem').

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> op_name(g.call_function(torch.ops.aten.linear.default, (x, x)))
    'aten.linear'
    """
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._overloadpacket.__name__}"
    return getattr(target, "__name__", str(target))


def attr_value(node: fx.Node):
    """The value a ``get_attr`` node reads: the attribute at its dotted target on the module that owns its graph.

    >>> graph = fx.Graph()
    >>> node = graph.get_attr("layer.weight")
    >>> _ = graph.output(node)
    >>> gm = fx.GraphModule(torch.nn.ModuleDict({"layer": torch.nn.Linear(2, 3)}), graph)
    >>> tuple(attr_value(node).shape)
    (3, 2)
    """
    value = node.graph.owning_module
    for part in node.target.split("."):
        value = getattr(value, part)
    return value


def is_tensor(node: fx.Node) -> bool:
    """Whether the node makes one tensor (its recorded value); size arithmetic (SymInts) and tuples do not."""
    return isinstance(node.meta.get("val"), torch.Tensor)


def floats(node: fx.Node) -> bool:
    """Whether the node makes a floating-point tensor, or a tuple holding one (an op's several outputs)."""
    val = node.meta.get("val")
    return any(isinstance(v, torch.Tensor) and v.is_floating_point()
               for v in (val if isinstance(val, (list, tuple)) else [val]))


def permutation(node: fx.Node, ndim: int) -> list:
    """For a permute-kind op over ``ndim`` axes: output axis k holds input axis ``order[k]``. Read from the
    arguments: one operand (``t``, ``numpy_T``) reverses the axes, a list (``permute``) is the order, two ints
    (``transpose``, ``swapaxes``) are swapped.

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> permutation(g.call_function(torch.ops.aten.transpose.int, (x, 0, -1)), 3)
    [2, 1, 0]
    """
    order = list(range(ndim))
    if len(node.args) == 1:
        return order[::-1]
    if isinstance(node.args[1], (list, tuple)):
        return [d % ndim for d in node.args[1]]
    a, b = node.args[1] % ndim, node.args[2] % ndim
    order[a], order[b] = order[b], order[a]
    return order


def chain(x, through) -> list:
    """``x`` and the values it is made from, back along data operands (``args[0]``) while ``through(node)``
    holds: [x, ..., the value the chain starts from]."""
    out = [x]
    while isinstance(x, fx.Node) and through(x):
        x = x.args[0]
        out.append(x)
    return out


def back(x, through):
    """``x`` followed back along its data operand (``args[0]``) while ``through(node)`` holds: the value the
    chain starts from (a parameter behind its transposes, the op behind a cast).

    >>> g = fx.symbolic_trace(lambda x: x.relu().t()).graph
    >>> x, to, t = list(g.nodes)[:3]
    >>> back(t, lambda n: n.name in ("relu", "t")).name
    'x'
    """
    return chain(x, through)[-1]
