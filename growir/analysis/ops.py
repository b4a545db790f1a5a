"""The op table: every op growir knows, once, with what it does to *axes* and what it does to *values*.

Each row registers ops under a *kind* (their value family) with their axis rule and value traits:

- the **rule** (``rules.py``, ``shape_rules.py``, ``norm_rules.py``, ``routing_rules.py``) says how the op relates
  the axes of its inputs and outputs; the walker applies it. An op without a rule (``None``) is refused where it
  makes a tensor. The rule ``derived`` (``derived_rules.py``) is read from the op's own meta kernel by the
  distinct-prime probe (``probe.py``); the walker uses it for any aten op with no row too, as kind ``other``.
- the **traits** say what the growth passes ask about values: is the output the input's values rearranged (a
  view, a transpose, a cast)? Is it zero when an operand is zero? Is it a contraction, a norm, a sum of terms?

A new op joins a family in one line, and with it every named set below (``LAYOUT``, ``ZERO_WITH_FIRST`` ...),
since each is a union of kinds or a test on traits. No other module compares op names (tests/analysis/test_op_table.py).
Ops whose values growir follows no further have a kind no walk follows (``pointwise``, ``reduce``, ``other``...):
a choice made in their row, not a default.

>>> TRAITS["aten.transpose"].kind, TRAITS["aten.linear"].kind, TRAITS["aten.add"].zero
('permute', 'contraction', 'all')
>>> "aten.view" in LAYOUT and "aten.slice" not in LAYOUT and "aten.slice" in PART
True
>>> TRAITS["aten.linear"].rule.__name__, TRAITS["aten.relu"].kind
('linear', 'pointwise')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .nodes import op_name
from .derived_rules import derived
from .routing_rules import flip, grouped_mm, histc, index_add, index_put, one_hot, roll, scatter, sort, topk
from .norm_rules import batch_norm, group_norm, layer_norm
from .rules import (addmm, along_dim, baddbmm, conv, einsum, elementwise, embedding, fresh_sized, gather, getitem,
                    index_select, index_tensor, like, linear, min_max, mm, native_dropout, new_sized, reduction, sdpa,
                    unary)
from .shape_rules import (cat, chunk, col2im, expand, im2col, narrow, pad, permute, pool, repeat, repeat_interleave,
                          reshape, select, slice_, split, stack, unbind)

# Kinds whose output holds (some of) the first operand's values, moved but not combined: zero when it is zero.
# (A pad adds values of its own, so it is not one of them.)
MOVES = ("cast", "copy", "dropout", "view", "permute", "slice", "split", "item", "expand", "gather", "reorder")
LAYOUT_KINDS = ("cast", "copy", "view", "permute")  # the same elements, rearranged: a parameter stays itself
KINDS = MOVES + ("pad", "sum", "scale", "contraction", "lookup", "norm", "attention", "softmax", "along", "reduce",
                 "pool", "sort", "scatter", "pointwise", "creation", "assert", "other")  # every row's kind is one


@dataclass(frozen=True)
class Op:
    """One op's row: its axis rule and its value traits.

    kind: cast | copy | dropout (identity in eval) | view (same elements, new shape) | permute | slice | split |
        item (one part of a tuple) | expand (broadcast or repeat) | gather | reorder (roll, flip) | pad |
        sum (a sum of terms) | scale (elementwise mul/div) | contraction | lookup (embedding) | norm |
        attention | softmax | along (mixes values along one dim) | reduce | pool | sort | scatter |
        pointwise (elementwise, no value trait claimed) | creation | assert | other
    rule: the axis rule ``rule(walker, node)``; None: no rule (the walker refuses the op where it makes a tensor)
    zero: when the output is zero: "first" (its data operand is), "one" (any factor is), "all" (every tensor
        operand is), "always", "affine" (a norm's weight and bias are); "" when none of these holds
    linear: the output is a linear function of all its tensor operands together (a sum of terms)
    weight_at / bias_at: the operand position of the weight it applies / of the bias it adds
    weight_out: the weight's output axis (linear's weight is (out, in), addmm's (in, out))
    value_at: the operand position of a constant it fills with (a pad's value): zero-with-first only where it is 0
    random: its value is not a function of its operands (random draws, uninitialised memory, dropout)
    variance_at: the operand position of a variance it divides by the root of (batch norm's running variance):
        a new unit there must hold a variance (a copy, a mean of old ones), never a draw around zero (NaN)
    entry_at: the operand position of the literal index of the one entry it takes along an axis (``select``: a
        parameter's entry is that parameter, its other axes kept)
    label: how reports name it
    """
    kind: str
    rule: Callable | None = None
    zero: str = ""
    linear: bool = False
    weight_at: int | None = None
    bias_at: int | None = None
    weight_out: int | None = None
    value_at: int | None = None
    random: bool = False
    variance_at: int | None = None
    entry_at: int | None = None
    label: str = ""

    @property
    def zero_with_first(self) -> bool:
        """Whether the output is zero when the first (data) operand is."""
        return self.zero == "first" or self.kind in MOVES

    @property
    def layout(self) -> bool:
        """Whether the output is the first operand's elements rearranged (a parameter stays itself)."""
        return self.kind in LAYOUT_KINDS


TRAITS: dict[str, Op] = {}


def _add(kind: str, names: str, rule, namespace: str = "aten", **traits) -> None:
    for name in names.split():
        key = f"{namespace}.{name}" if namespace else name
        assert key not in TRAITS, f"{key} has two rows in the op table"
        assert kind in KINDS, f"{key}: unknown kind {kind}"
        TRAITS[key] = Op(kind, rule, **traits)


# --- values moved, not combined -------------------------------------------------------------------------------
_add("cast", "to _to_copy type_as", unary)
_add("copy", "contiguous clone alias detach detach_ lift_fresh_copy", unary)
_add("dropout", "dropout feature_dropout", unary, random=True)
_add("view", "view reshape _unsafe_view flatten unflatten squeeze unsqueeze", reshape)
_add("permute", "t numpy_T transpose permute swapaxes", permute)
_add("slice", "slice", slice_)
_add("slice", "select", select, entry_at=2)
_add("slice", "narrow", narrow)
_add("split", "split split_with_sizes unsafe_split", split)
_add("split", "chunk", chunk)
_add("split", "unbind", unbind)
_add("item", "getitem", getitem, namespace="")
_add("expand", "expand expand_as broadcast_to", expand)
_add("expand", "repeat", repeat)
_add("expand", "repeat_interleave", repeat_interleave)
_add("gather", "index", index_tensor)
_add("gather", "index_select", index_select)
_add("gather", "gather", gather)
_add("reorder", "roll", roll)
_add("reorder", "flip", flip)
_add("pad", "constant_pad_nd", pad, zero="first", value_at=2)  # pads with its value argument: 0 unless given
_add("pad", "pad", pad)
# --- sums, products, contractions, norms ------------------------------------------------------------------------
_add("sum", "add add_ sub", elementwise, zero="all", linear=True)
_add("sum", "cat", cat, zero="all", linear=True)
_add("sum", "where", elementwise, zero="all")
_add("sum", "stack", stack, zero="all")
_add("sum", "index_add index_add_", index_add, zero="all")
_add("sum", "index_put index_put_", index_put, zero="all")
_add("sum", "scatter_add scatter_add_", scatter, zero="all")
_add("scale", "neg", unary, zero="first", linear=True)
_add("scale", "mul", elementwise, zero="one")
_add("scale", "div", elementwise, zero="first")
_add("contraction", "mm matmul", mm, zero="one", weight_at=1)
_add("contraction", "bmm", mm, zero="one")
_add("contraction", "einsum", einsum, zero="one")
_add("contraction", "_grouped_mm", grouped_mm, zero="one")
_add("contraction", "grouped_mm_fallback", grouped_mm, namespace="transformers", zero="one")
_add("contraction", "linear", linear, zero="one", weight_at=1, bias_at=2, weight_out=0)
_add("contraction", "addmm", addmm, zero="one", weight_at=2, bias_at=0, weight_out=1)
_add("contraction", "baddbmm", baddbmm, zero="one", bias_at=0)
_add("contraction", "conv1d conv2d conv3d", conv, zero="one", bias_at=2)
_add("lookup", "embedding", embedding, zero="first", weight_at=0)
_add("norm", "layer_norm native_layer_norm", layer_norm, zero="affine", label="LayerNorm")
_add("norm", "rms_norm", layer_norm, zero="first", label="RMSNorm")
# per group of channels (x - mean) / std * weight + bias: not a "norm" row (the fills rewrite LayerNorm and RMSNorm
# over one axis; this one also normalises over the spatial axes), so no trait claimed
_add("other", "group_norm", group_norm)
# per channel in eval (x - mean) / std * weight + bias: no trait claimed (not zero with x; a norm over the
# batch, not the channels, in training); every form takes (x, weight, bias, running_mean, running_var, ...)
_add("pointwise", "batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training",
     batch_norm, variance_at=4)
_add("attention", "scaled_dot_product_attention", sdpa)  # zero when its values are (residual.py asks)
_add("reduce", "sum", reduction("sum"), zero="first")
_add("reduce", "mean", reduction("norm"), zero="first")
_add("other", "native_dropout", native_dropout, zero="first", random=True)
# --- values growir does not follow: each a choice, so an op here claims no trait by accident ---------------------
_add("pointwise", "abs relu gelu silu sigmoid tanh exp log sqrt rsqrt sin cos erf clamp clamp_min clamp_max "
                  "hardtanh leaky_relu logical_not bitwise_not reciprocal square sign floor ceil round isnan isinf "
                  "softplus mish elu relu_ gelu_ silu_ tril triu log1p expm1 erfinv hardswish hardsigmoid relu6 fill "
                  "trunc sgn", unary)
_add("pointwise", "rsub masked_fill eq ne lt le gt ge __and__ __or__ __xor__ bitwise_and bitwise_or bitwise_xor "
                  "logical_and logical_or maximum minimum fmod remainder floor_divide lerp addcmul addcdiv mul_ sub_ "
                  "div_ masked_fill_ copy_ copy atan2 hypot pow", elementwise)
_add("softmax", "softmax _softmax", along_dim("softmax"))
_add("along", "log_softmax _log_softmax", along_dim("softmax"))
_add("along", "cumsum cumprod", along_dim("cumsum"))
_add("reduce", "var std var_mean", reduction("norm"))
_add("reduce", "prod logsumexp norm linalg_vector_norm", reduction("sum"))
_add("reduce", "amax amin argmax argmin any all", reduction("max"))
_add("reduce", "min max", min_max)  # elementwise with a tensor second operand
# unfold / fold: each channel's blocks, moved (and summed where they overlap); values not followed
_add("other", "im2col", im2col)
_add("other", "col2im", col2im)
_add("pool", "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d avg_pool1d avg_pool2d "
             "avg_pool3d max_pool1d max_pool2d max_pool3d adaptive_max_pool1d adaptive_max_pool2d "
             "max_pool2d_with_indices", pool)
_add("sort", "topk", topk)
_add("sort", "sort argsort msort", sort)
_add("scatter", "scatter scatter_ scatter_reduce scatter_reduce_", scatter)
_add("other", "histc", histc)
_add("other", "one_hot", one_hot)
_add("other", "view_as reshape_as", reshape)  # not followed as views: a walk through them needs a test first
_add("other", "concat", cat)  # cat's alias, not followed as a sum (same reason)
# --- axis rules derived from the op's own meta kernel (derived_rules.py): no hand rule, the kind still a choice ------
# (an aten op with no row gets the derived rule too, as kind "other"; a row says what its values are)
_add("pointwise", "xlogy logaddexp logaddexp2 copysign nan_to_num frac digamma lgamma sinh cosh tan asin acos atan "
                  "asinh acosh atanh exp2 log2 log10 logit heaviside nextafter i0 sinc deg2rad rad2deg fmax fmin "
                  "float_power true_divide positive polar", derived)
_add("other", "tensor_split diff narrow_copy tile kron outer rot90 logcumsumexp cummax cummin linalg_cross take "
              "view_as_real", derived)
# --- made, not computed from operands -----------------------------------------------------------------------------
_add("creation", "zeros", fresh_sized, zero="always")
_add("creation", "zeros_like", like, zero="always")
_add("creation", "new_zeros", new_sized, zero="always")
_add("creation", "ones full arange scalar_tensor tensor linspace", fresh_sized)
_add("creation", "new_ones new_full new_empty", new_sized)
_add("creation", "ones_like full_like", like)
_add("creation", "empty rand randn randint", fresh_sized, random=True)
_add("creation", "empty_like rand_like randn_like", like, random=True)
_add("creation", "bernoulli normal uniform", None, random=True)  # no axis rule: refused where it makes a tensor
_add("assert", "_assert_tensor_metadata _assert_scalar", None)  # they make no tensor, so need no rule
_add("assert", "_assert_scalar", None, namespace="")

OTHER = Op("other")


class OpSet(frozenset):
    """A set of op names that is also a predicate on nodes: ``LAYOUT(node)``."""

    def __call__(self, node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and op_name(node) in self

    def __or__(self, other) -> OpSet:
        return OpSet(frozenset.__or__(self, other))


def kinds(*names: str) -> OpSet:
    """The ops of the given kinds.

    >>> sorted(kinds("reorder"))
    ['aten.flip', 'aten.roll']
    """
    return OpSet(op for op, t in TRAITS.items() if t.kind in names)


def where_trait(test) -> OpSet:
    """The ops whose traits pass ``test`` (an ``Op -> bool``)."""
    return OpSet(op for op, t in TRAITS.items() if test(t))


def aten(*names: str) -> OpSet:
    """The aten ops of these names, each checked to have a row: for the few single ops the analyses recognise by
    what they compute (a mean of squares is an RMSNorm written out)."""
    ops = OpSet(f"aten.{n}" for n in names)
    assert ops <= TRAITS.keys(), sorted(ops - TRAITS.keys())
    return ops


# Named sets the walks use; each is a union of kinds, so a new op joins all of them by its kind.
LAYOUT = where_trait(lambda t: t.layout)  # the same elements, rearranged: a parameter stays itself
SAME_VALUES = kinds("cast", "copy", "dropout", "view")  # the same values in the same order (a residual stream)
PART = kinds("cast", "copy", "dropout", "view", "permute", "slice")  # some of the input's values, rearranged
SPLITS = PART | kinds("expand", "split", "item")  # ... also replicated, or split into parts (fused projections)
# Output linear in the data operand(s), the other operands (indices) fixed: parts, copies, rearrangements (a split
# of a fused projection, a gather, a roll), sums or means over an axis. LINEAR_IN_FIRST through ``args[0]`` alone
# (a walk back that follows one operand: a norm reading one reads a value linear in the parameters behind it,
# norms.py); LINEAR_IN_DATA also sums over all operands (a walk forward through every user: a scatter-add of the
# experts' outputs back to their tokens, residual.py).
LINEAR_IN_FIRST = SPLITS | kinds("gather", "reorder") | where_trait(lambda t: t.kind == "reduce" and t.zero == "first")
LINEAR_IN_DATA = LINEAR_IN_FIRST | where_trait(lambda t: t.kind == "sum" and t.zero == "all")
CONTRACTIONS = kinds("contraction")
NORMS = kinds("norm")
CASTS = kinds("cast")
ASSERTS = kinds("assert")
WEIGHTED = where_trait(lambda t: t.weight_at is not None)  # ops that apply a weight operand: linear, mm, embedding
PROJECTIONS = where_trait(lambda t: t.weight_at is not None and t.bias_at is not None)  # x W + b: linear, addmm
SCALES = where_trait(lambda t: t.kind == "scale" and not t.linear)  # x * c, x / c: linear in x for a constant c
LINEAR = where_trait(lambda t: t.linear)  # sums of terms: add, sub, neg, cat
INDEXES = aten("index", "index_select")  # x[idx]: whole slices of x along indexed axes
ADDS = aten("add", "add_")  # a + b: a residual stream plus a term
# pools that average (linear in the values: they commute with a mean over channels) and reductions or pools that
# keep the largest or smallest value (not linear: passes/fill.py's mean fill asks)
AVERAGES = aten("avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                "adaptive_avg_pool3d", "_adaptive_avg_pool2d")
MAXIMA = aten("max", "min", "amax", "amin", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "max_pool2d_with_indices")
# Single ops recognised by what they compute: a written-out RMSNorm (mean, pow, add, rsqrt, mul), a weight
# parametrised as c + w, a product or a quotient, and the ops a row-label trace runs by hand (sources.py).
ADD, MUL, DIV, NEG, POW, RSQRT, MEAN = (aten(n) for n in ("add", "mul", "div", "neg", "pow", "rsqrt", "mean"))
INDEX, EXPAND, SELECT, CAT = (aten(n) for n in ("index", "expand", "select", "cat"))


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


def traits(node) -> Op:
    """The row of the op a node calls (``OTHER`` for ops outside the table, placeholders, parameters).

    >>> g = fx.Graph(); x = g.placeholder("x")
    >>> traits(x).kind
    'other'
    """
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return OTHER
    return TRAITS.get(op_name(node), OTHER)


def indexes_leading(node: fx.Node) -> bool:
    """An index on leading axes only (tokens routed to experts): the last axis passes intact."""
    if not INDEXES(node):
        return False
    ndim = len(node.args[0].meta["val"].shape)
    if INDEX(node):
        return len(node.args[1]) < ndim
    return node.args[1] % ndim != ndim - 1


# --- the walks --------------------------------------------------------------------------------------------------


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
