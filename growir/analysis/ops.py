"""What each op does to *values*: one table of op traits, and the walks along the graph that follow them.

``rules.py`` says what an op does to *axes* (one rule per op); this table says what it does to values, which
is what the growth passes ask about: is the output the input's values rearranged (a view, a transpose, a
cast)? Is it zero when an operand is zero? Is it a contraction, a norm, a sum of terms? Every question about
op names is answered here, so that the passes and the other analyses ask for a trait, not list names.

>>> TRAITS["aten.transpose"].kind, TRAITS["aten.linear"].kind, TRAITS["aten.add"].zero
('permute', 'contraction', 'all')
>>> "aten.view" in LAYOUT and "aten.slice" not in LAYOUT and "aten.slice" in PART
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

# Kinds whose output holds (some of) the first operand's values, moved but not combined: zero when it is zero.
# (A pad adds values of its own, so it is not one of them.)
MOVES = ("cast", "copy", "dropout", "view", "permute", "slice", "split", "item", "expand", "gather", "reorder")


@dataclass(frozen=True)
class Op:
    """The value traits of one op.

    kind: cast | copy | dropout (identity in eval) | view (same elements, new shape) | permute | slice | split |
        item (one part of a tuple) | expand (broadcast or repeat) | gather | reorder (roll, flip) | pad |
        sum (a sum of terms) | scale (elementwise mul/div) | contraction | lookup (embedding) | norm | reduce |
        creation | assert | other
    zero: when the output is zero: "first" (its data operand is), "one" (any factor is), "all" (every tensor
        operand is), "always", "affine" (a norm's weight and bias are); "" when none of these holds
    linear: the output is a linear function of all its tensor operands together (a sum of terms)
    weight_at / bias_at: the operand position of the weight it applies / of the bias it adds
    value_at: the operand position of a constant it fills with (a pad's value): zero-with-first only where it is 0
    random: its value is not a function of its operands (random draws, uninitialised memory, dropout)
    label: how reports name it
    """
    kind: str
    zero: str = ""
    linear: bool = False
    weight_at: int | None = None
    bias_at: int | None = None
    value_at: int | None = None
    random: bool = False
    label: str = ""

    @property
    def zero_with_first(self) -> bool:
        """Whether the output is zero when the first (data) operand is."""
        return self.zero == "first" or self.kind in MOVES


TRAITS: dict[str, Op] = {}


def _add(kind: str, names: str, namespace: str = "aten", **traits) -> None:
    for name in names.split():
        TRAITS[f"{namespace}.{name}" if namespace else name] = Op(kind, **traits)


_add("cast", "to _to_copy type_as")
_add("copy", "contiguous clone alias detach detach_ lift_fresh_copy")
_add("dropout", "dropout feature_dropout", random=True)
_add("view", "view reshape _unsafe_view flatten unflatten squeeze unsqueeze")
_add("permute", "t numpy_T transpose permute swapaxes")
_add("slice", "slice select narrow")
_add("split", "split split_with_sizes unsafe_split chunk unbind")
_add("item", "getitem", namespace="")
_add("expand", "expand expand_as broadcast_to repeat repeat_interleave")
_add("gather", "index index_select gather")
_add("reorder", "roll flip")
_add("pad", "constant_pad_nd", zero="first", value_at=2)  # pads with its value argument: 0 unless given
_add("pad", "pad")
_add("sum", "add add_ sub cat", zero="all", linear=True)
_add("sum", "stack where index_add index_add_ index_put index_put_ scatter_add scatter_add_", zero="all")
_add("scale", "neg", zero="first", linear=True)
_add("scale", "mul", zero="one")
_add("scale", "div", zero="first")
_add("contraction", "mm matmul", zero="one", weight_at=1)
_add("contraction", "bmm einsum _grouped_mm", zero="one")
_add("contraction", "grouped_mm_fallback", namespace="transformers", zero="one")
_add("contraction", "linear", zero="one", weight_at=1, bias_at=2)
_add("contraction", "addmm", zero="one", weight_at=2, bias_at=0)
_add("contraction", "baddbmm", zero="one", bias_at=0)
_add("contraction", "conv1d conv2d conv3d", zero="one", bias_at=2)
_add("lookup", "embedding", zero="first", weight_at=0)
_add("norm", "layer_norm native_layer_norm", zero="affine", label="LayerNorm")
_add("norm", "rms_norm", zero="first", label="RMSNorm")
_add("reduce", "sum mean", zero="first")
_add("other", "native_dropout", zero="first", random=True)
_add("creation", "zeros zeros_like new_zeros", zero="always")
_add("creation", "empty empty_like", random=True)
_add("creation", "rand randn randint rand_like randn_like bernoulli normal uniform", random=True)
_add("assert", "_assert_tensor_metadata _assert_scalar")
_add("assert", "_assert_scalar", namespace="")

OTHER = Op("other")


class OpSet(frozenset):
    """A set of op names that is also a predicate on nodes: ``LAYOUT(node)``."""

    def __call__(self, node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in self

    def __or__(self, other) -> OpSet:
        return OpSet(frozenset.__or__(self, other))


def kinds(*names: str) -> OpSet:
    """The ops of the given kinds."""
    return OpSet(op for op, t in TRAITS.items() if t.kind in names)


def where_trait(test) -> OpSet:
    """The ops whose traits pass ``test`` (an ``Op -> bool``)."""
    return OpSet(op for op, t in TRAITS.items() if test(t))


# Named sets the walks use; each is a union of kinds, so a new op joins all of them by its kind.
LAYOUT = kinds("cast", "copy", "view", "permute")  # the same elements, rearranged: a parameter stays itself
SAME_VALUES = kinds("cast", "copy", "dropout", "view")  # the same values in the same order (a residual stream)
PART = kinds("cast", "copy", "dropout", "view", "permute", "slice")  # some of the input's values, rearranged
SPLITS = PART | kinds("expand", "split", "item")  # ... also replicated, or split into parts (fused projections)
CONTRACTIONS = kinds("contraction")
NORMS = kinds("norm")
CASTS = kinds("cast")
ASSERTS = kinds("assert")
WEIGHTED = where_trait(lambda t: t.weight_at is not None)  # ops that apply a weight operand: linear, mm, embedding
PROJECTIONS = where_trait(lambda t: t.weight_at is not None and t.bias_at is not None)  # x W + b: linear, addmm
SCALES = where_trait(lambda t: t.kind == "scale" and not t.linear)  # x * c, x / c: linear in x for a constant c
INDEXES = OpSet(("aten.index", "aten.index_select"))  # x[idx]: whole slices of x along indexed axes
ADDS = OpSet(("aten.add", "aten.add_"))  # a + b: a residual stream plus a term
LINEAR = where_trait(lambda t: t.linear)  # sums of terms: add, sub, neg, cat
class _FillChecked(OpSet):
    """An OpSet whose node test also asks that the constant an op fills with (``value_at``) is 0: zero padded
    with 1 is not zero."""

    def __call__(self, node) -> bool:
        if not OpSet.__call__(self, node):
            return False
        pos = TRAITS[op_name(node)].value_at
        if pos is None:
            return True
        return (node.args[pos] if len(node.args) > pos else node.kwargs.get("value", 0)) == 0


ZERO_WITH_FIRST = _FillChecked(where_trait(lambda t: t.zero_with_first))
ZERO_WITH_ONE = where_trait(lambda t: t.zero == "one")
ZERO_WITH_ALL = where_trait(lambda t: t.zero == "all")
ZEROS = where_trait(lambda t: t.zero == "always")
RANDOM = where_trait(lambda t: t.random)


def op_name(node: fx.Node) -> str:
    """'aten.linear' for aten.linear.default (namespace, then the op); the function name for Python callables."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._overloadpacket.__name__}"
    return getattr(target, "__name__", str(target))


def traits(node) -> Op:
    """The traits of the op a node calls (``OTHER`` for ops outside the table, placeholders, parameters)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return OTHER
    return TRAITS.get(op_name(node), OTHER)


def permutation(node: fx.Node, ndim: int) -> list:
    """For a permute-kind op over ``ndim`` axes: output axis k holds input axis ``order[k]``.

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> permutation(g.call_function(torch.ops.aten.transpose.int, (x, 0, -1)), 3)
    [2, 1, 0]
    """
    name, order = op_name(node), list(range(ndim))
    if name == "aten.permute":
        return [d % ndim for d in node.args[1]]
    if name in ("aten.t", "aten.numpy_T"):
        return order[::-1]
    a, b = node.args[1] % ndim, node.args[2] % ndim  # transpose, swapaxes
    order[a], order[b] = order[b], order[a]
    return order


# --- the walks --------------------------------------------------------------------------------------------------


def chain(x, through) -> list:
    """``x`` and the values it is made from, back along data operands (``args[0]``) while ``through(node)``
    holds: [x, ..., the value the chain starts from].

    >>> g = fx.symbolic_trace(lambda x: x.relu().t()).graph
    >>> [n.name for n in chain(list(g.nodes)[2], lambda n: n.name in ("relu", "t"))]
    ['t', 'relu', 'x']
    """
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


def forward(node: fx.Node, through) -> list:
    """The users of ``node`` past the ops for which ``through(user)`` holds, and past metadata asserts (which
    read a value without using it), each once, in the order first reached.

    >>> g = fx.symbolic_trace(lambda x: (x.relu() + 1, x * 2)).graph
    >>> x = next(iter(g.nodes))
    >>> [u.name for u in forward(x, lambda n: n.name == "relu")]
    ['mul', 'add']
    """
    out, seen, stack = [], set(), [node]
    while stack:
        for u in stack.pop().users:
            if u in seen or ASSERTS(u):
                continue
            seen.add(u)
            if through(u):
                stack.append(u)
            else:
                out.append(u)
    return out


def reach(starts, step) -> set:
    """Depth-first over the graph from ``starts``: ``step(node)`` returns the nodes to visit next (its inputs
    or its users, as the question needs) and may raise ``Blocked`` to end the walk. Returns the nodes visited.

    >>> g = fx.symbolic_trace(lambda x: (x + 1) * 2).graph
    >>> sorted(n.name for n in reach([list(g.nodes)[-2]], lambda n: n.all_input_nodes))
    ['add', 'mul', 'x']
    """
    seen, stack = set(), list(starts)
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        stack.extend(step(n))
    return seen


class Blocked(Exception):
    """Raised by a ``reach`` step: the walk met something that answers the question (usually: no)."""
