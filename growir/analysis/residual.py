"""The residual stream through a block, and which parameters make the block an identity when zeroed.

A block is *identity-ready* when its output is its input plus terms (``y = x + t1 + t2 ...``: only additions
and layout ops on the way from input to output, so no norm acts on the stream in place) and every term is
zero once some of the block's parameters are zero. Whether a term can be zeroed follows from the op that
produced it, whatever that op is: a contraction with a parameter (linear, einsum, matmul, grouped matmul,
convolution) is zero when its parameter operands are; an op linear in one operand (a reshape, an index, a
sum, an RMS normalization ``x * rsqrt(mean(x^2) + eps)``) is zero when that operand is; a product when one
factor is; a sum, a concatenation or a scatter when all its tensor operands are; a LayerNorm inside the branch
when its weight and bias are. Then ``x + 0 = x``: a new
block with those *writers* zeroed preserves the function (pre-norm blocks; see docs/preservation.md).

Example: in ``y = x + W2 relu(W1 ln(x))`` the stream is ``x -> add`` with one term, zeroed by ``W2`` and its bias.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx

from ..ir.index_maps import GroupMap, tree_map
from .groups import Group, contractions_over
from .nodes import back, chain, is_tensor
from .ops import ADDS, ASSERTS, CONTRACTIONS, LAYOUT, LINEAR, LINEAR_IN_DATA, PART, SAME_VALUES, SCALES, SPLITS
from .ops import ZERO_WITH_ALL, ZERO_WITH_FIRST, ZERO_WITH_ONE, ZEROS, Blocked, forward, reach, traits
from .walker import Facts


def stream_terms(chain_in: fx.Node, chain_out: fx.Node) -> list | None:
    """The terms added to the stream between ``chain_in`` and ``chain_out``, or None where the stream is
    changed in place (a norm or a scale on it, as in post-norm blocks).

    >>> import torch, torch.fx as fx
    >>> g = fx.symbolic_trace(lambda x: x + torch.relu(x)).graph
    >>> x, add = [n for n in g.nodes if n.op == "placeholder"][0], list(g.nodes)[-2]
    >>> add.target = torch.ops.aten.add.Tensor; [t.name for t in stream_terms(x, add)]
    ['relu']
    """
    n, terms = chain_out, []
    stream = lambda m: m is not chain_in and SAME_VALUES(m)  # noqa: E731 - the value, up to a view or a cast
    while (n := back(n, stream)) is not chain_in:
        if not (ADDS(n) and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1):
            return None
        a, b = n.args
        if _on_stream(b, chain_in) and not _on_stream(a, chain_in):
            a, b = b, a
        if not isinstance(b, fx.Node) or not isinstance(a, fx.Node):
            return None
        terms.append(b)
        n = a
    return terms


def _on_stream(n, chain_in: fx.Node) -> bool:
    """Whether ``n`` is ``chain_in`` plus terms (a value of the stream)."""
    n = back(n, lambda m: m is not chain_in and SAME_VALUES(m))
    if n is chain_in:
        return True
    return ADDS(n) and len(n.args) == 2 and any(_on_stream(a, chain_in) for a in n.args)


def zeroing_params(n, facts: Facts, owns, memo: dict) -> frozenset | None:
    """Graph names of parameters (all accepted by ``owns``) whose zeroing makes ``n`` zero; None if none do."""
    if not isinstance(n, fx.Node):
        return frozenset() if n == 0 else None
    if n not in memo:  # its ancestors first, in graph order: each answer reads its inputs' from the memo
        for m in sorted(reach([n], lambda x: [a for a in x.all_input_nodes if a not in memo])):
            memo[m] = None  # answered below before any later node asks: a DAG in order has no cycles
            memo[m] = _zeroing(m, facts, owns, memo)
    return memo[n]


def _zeroing(n: fx.Node, facts: Facts, owns, memo: dict) -> frozenset | None:
    if n.op == "get_attr":
        state = facts.params.get(n.name)
        return frozenset([n.name]) if state is not None and owns(state) else None
    if n.op != "call_function":
        return None
    tensors = [a for a in n.all_input_nodes if _is_tensor(a)]
    if ZEROS(n):
        return frozenset()
    if ZERO_WITH_FIRST(n):
        return zeroing_params(n.args[0], facts, owns, memo)
    if ZERO_WITH_ONE(n):  # one factor zero (a parameter first: a contraction's writer), and any bias added
        factors, added = _factors_and_bias(n)
        biases = [zeroing_params(a, facts, owns, memo) for a in added]
        if None in biases:
            return None
        for a in sorted(factors, key=lambda a: _param_behind(a, facts) is None):
            z = zeroing_params(a, facts, owns, memo)
            if z is not None:
                return z.union(*biases)
        return None
    if ZERO_WITH_ALL(n):
        zs = [zeroing_params(a, facts, owns, memo) for a in tensors if not _is_index(a)]
        return None if any(z is None for z in zs) else frozenset().union(*zs)
    if traits(n).kind == "attention":  # zero values give zero outputs
        return zeroing_params(n.args[2], facts, owns, memo)
    if traits(n).zero == "affine":  # a LayerNorm inside the branch: zero weight and bias
        affine = [zeroing_params(a, facts, owns, memo) for a in n.args[2:4] if isinstance(a, fx.Node)]
        return frozenset().union(*affine) if len(affine) == 2 and None not in affine else None
    return None


def _factors_and_bias(n: fx.Node) -> tuple[list, list]:
    """A product's float operands, split into factors and the bias it adds (``linear(x, W, b)``: [x, W], [b])."""
    pos = traits(n).bias_at
    added = [n.args[pos]] if pos is not None and len(n.args) > pos else []
    added += [n.kwargs.get("bias")]
    added = [a for a in added if isinstance(a, fx.Node)]
    factors = [a for a in n.all_input_nodes if _is_tensor(a) and not _is_index(a) and a not in added]
    return factors, added


def _param_behind(a: fx.Node, facts: Facts) -> str | None:
    a = back(a, ZERO_WITH_FIRST)
    return a.name if isinstance(a, fx.Node) and a.name in facts.params else None


def _is_index(a: fx.Node) -> bool:
    """Integer operands (positions, masks of a where) are not data."""
    val = a.meta.get("val")
    return val is not None and not val.is_floating_point()


def _is_tensor(a: fx.Node) -> bool:
    return hasattr(a.meta.get("val"), "shape")


# --- a residual stream's terms and direct readers (for rescaling the stream: passes/rescale.py) ---------------


def terms_and_readers(gm: fx.GraphModule, facts: Facts, group: Group, sites: list) -> tuple[set, set] | None:
    """(parameters that write a term of the residual stream ``group``, parameters that contract it directly),
    given the norms over it (``sites``); None when the stream reaches something else (the model's output, a
    nonlinear op) or a term is not linear in one parameter."""
    state_of = {**facts.params, **facts.buffers}
    norm_params = {p for s in sites for p in (s.weight, s.bias) if p is not None}
    writers = {pa.param for pa in group.producers + group.consumers} - norm_params  # consumers: a tied embedding
    # a norm whose output reaches the stream (a post-norm, a branch's output norm: an RMSNorm's zero fill allows
    # them, fill.py) writes a term: its weight carries c as any other writer's rows do, its output is no bound
    post = [s for s in sites if s.kind == "rms" and not s.pre_norm(facts)]  # (a LayerNorm's is filled inexactly)
    post += [s for s in sites if s not in post and s.weight in {t.weight for t in post}]  # one module, one weight
    if any(s.weight is None for s in post):
        return None  # nothing to carry c
    writers |= {state for node, state in facts.buffers.items()  # a table added to the stream (sinusoidal positions)
                if any(group.root in facts.ag.leaf_roots(a) for a in facts.axes.get(node, []))}
    norm_ends = {}  # a norm's input -> the norm's own ops that read it
    for s in sites:
        norm_ends.setdefault(s.input, set()).update(s.internals)
    stream = {back(s.input, PART) for s in sites}  # the values the norms read: the stream itself
    on_group = {(pa.param, pa.axis) for pa in group.consumers}
    contracting = {(p, node) for p, i, node in facts.consumed if (p, i) in on_group}
    residual, terms = set(), set()
    producing = {pa.param for pa in group.producers}  # a reader that also writes a term: its output carries c
    read = {node for p, node in contracting if p not in producing}
    fixed = _Fixed(facts, writers | {s.weight for s in post},
                   {s.output for s in sites if s not in post} | {n for n in gm.graph.nodes if n.name in read})
    for s in post:
        reached = _term_path(s.output, facts, norm_ends, fixed, stream)
        if not reached:
            return None
        terms.add(s.weight)
        residual |= reached | {s.output}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or state_of.get(n.name) not in writers:
            continue
        for use in forward(n, LAYOUT):  # past a transpose: a stacked experts' weight is read transposed
            if (state_of[n.name], use.name) in contracting:
                continue  # a tied tensor's other use (the head): a reader, compensated with the tie
            if gain_on_stream(use, facts, stream):
                continue  # it multiplies the stream, which carries c already: a gain, not a term
            reached = _term_path(use, facts, norm_ends, fixed, stream, lambda u: other_part(u, facts, group.root))
            if reached is None:
                return None
            if reached:
                terms.add(state_of[n.name])
                residual |= reached
    readers = set()
    for p, _, source in contractions_over(gm, facts, group):
        if source in residual:
            readers.add(p)
        elif not norm_output(source, {m for s in sites if s not in post for m in chain(s.output, PART)},
                             fixed):  # or before a cast
            return None
    if readers & terms:
        return None  # a tied tensor that also reads the residual directly: one scale cannot do both
    on_axes = Counter(pa.param for pa in group.producers + group.consumers if pa.param in terms | readers)
    if any(n > 1 and group_rows(facts, group, p) is not None for p, n in on_axes.items()):
        return None  # a fused tensor holding the group on two axes: its rows on one are not enough
    return terms, readers


def norm_output(n: fx.Node, outputs: set, fixed) -> bool:
    """Whether ``n`` is one of the norms' ``outputs``, through views and products with values the rescale leaves
    unchanged (``fixed``: a padding mask): a contraction reading it reads what the norm gives, unscaled."""
    if n in outputs or (PART(n) and norm_output(n.args[0], outputs, fixed)):
        return True
    if not SCALES(n):
        return False
    tensors = [a for a in n.args[:2] if isinstance(a, fx.Node)]
    divided = traits(n).zero == "first"  # a quotient: only its dividend is the value
    walk = ([n.args[0]] if isinstance(n.args[0], fx.Node) else []) if divided else tensors
    return any(norm_output(a, outputs, fixed) and all(fixed.fixed(b) for b in tensors if b is not a) for a in walk)


def group_rows(facts: Facts, group: Group, state: str) -> tuple | None:
    """(axis, old positions, axis size) of the tensor ``state`` that hold ``group`` where that axis holds other
    groups beside it (a projection whose output is split into parts): a rescale of the group scales those rows
    only. None where every position of the axis holds the group (the axis is the group, or a product with it)."""
    node_of = {s: n for n, s in {**facts.params, **facts.buffers}.items()}
    for pa in group.producers + group.consumers:
        if pa.param != state or state not in node_of:
            continue
        tree = facts.ag.expand(facts.axes[node_of[state]][pa.axis])
        if tree == group.root:
            return None
        marker = GroupMap(group.size, group.size, torch.arange(group.size), torch.full((group.size,), 2))
        _, counts, size, _ = tree_map(tree, facts.ag, {group.root: marker})  # 2 where a position holds the group
        rows = (counts == 2).nonzero().flatten()
        return None if len(rows) == int(size) else (pa.axis, rows, int(size))
    return None


def other_part(u: fx.Node, facts: Facts, root) -> bool:
    """Whether ``u`` takes a part of its input that holds none of the group ``root`` (the other parts of a fused
    projection's output, split or sliced off at the same rank): its rows are not the group's, and a rescale of the
    group's rows (``group_rows``) leaves it unchanged."""
    if not (SPLITS(u) and is_tensor(u)) or not isinstance(u.args[0], fx.Node):
        return False
    src = u.args[0] if is_tensor(u.args[0]) else u.args[0].args[0]  # a part of a split's tuple: the split's input
    carries = lambda n: any(root in facts.ag.leaf_roots(a) for a in facts.axes.get(n.name, []))  # noqa: E731
    return isinstance(src, fx.Node) and is_tensor(src) and u.meta["val"].dim() == src.meta["val"].dim() \
        and carries(src) and not carries(u)


def _term_path(use: fx.Node, facts: Facts, norm_ends: dict, fixed, stream: set, other=None) -> set | bool | None:
    """Follow ``use`` through linear ops to the norms' inputs, past gains on the ``stream`` (the values the norms
    read) and not into ``other`` parts (of a fused output: ``other_part``). A set: it is a term of the residual,
    and these are the nodes on the way; False: a parameter multiplies it later (another term's factor); None: it
    reaches an output or an op that is neither a norm nor a contraction."""
    visited = set()

    def step(n: fx.Node) -> list:
        visited.add(n)
        if n is not use and SCALES(n) and not gain_on_stream(n, facts, stream):
            if any(isinstance(a, fx.Node) and a.name in facts.params for a in n.args):
                raise Blocked(False)  # a parameter multiplies this term (a layer scale): that parameter is the term
            if not (_by_constant(n, visited) or fixed.scales(n, visited)):
                raise Blocked(None)  # a product of two activations is not linear in the residual
        if not (n is use or PART(n) or LINEAR(n) or SCALES(n) or LINEAR_IN_DATA(n)):
            raise Blocked(None)  # a nonlinear op, even one that feeds a norm: its output is not linear in the term
        nxt = []
        for u in [u for u in n.users if not ASSERTS(u)]:
            if u.op == "output":
                raise Blocked(None)
            if u in norm_ends.get(n, ()) or (PART(u) and u.args[0] is not n) or (other and other(u)):
                continue  # the norm itself; a view or cast that reads only its dtype (``type_as(y, x)``); no part
            if CONTRACTIONS(u) and any(isinstance(a, fx.Node) and back(a, LAYOUT).name in facts.params
                                       for a in u.args if a is not n):
                continue  # a direct reader: checked on the consumer side
            nxt.append(u)
        return nxt

    try:
        return reach([use], step)
    except Blocked as found:
        return found.args[0]


def gain_on_stream(n: fx.Node, facts: Facts, stream: set) -> bool:
    """Whether ``n`` multiplies a value of the ``stream`` (one a norm over it reads) by a parameter, channel by
    channel (``x = r ⊙ x + f(x)``: a learned residual gain). Scaling the stream by c scales ``r ⊙ x`` by c with
    ``r`` unchanged, so ``r`` is no term and the stream goes on through it."""
    if not (SCALES(n) and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args)):
        return False
    params = [a for a in n.args if back(a, PART).name in facts.params]
    return len(params) == 1 and back(next(a for a in n.args if a is not params[0]), PART) in stream


def _by_constant(n: fx.Node, came_through: set) -> bool:
    """A multiply or divide whose other operands are numbers or tensors the walk did not come through."""
    nodes = [a for a in n.args if isinstance(a, fx.Node)]
    return sum(a in came_through for a in nodes) == 1 and all(a in came_through or a.op == "get_attr" for a in nodes)


class _Fixed:
    """Which activations the rescale leaves unchanged: those computed from the inputs, from parameters that write
    no term, from the norms' outputs and from the readers' contractions (their outputs are kept: the norms'
    weights and the readers take the factor back out), never from the stream or a term itself.

    A term multiplied by such a value (the routing weight of an expert's output) is still linear in its
    parameter: ``w(x)·(c·W)h = c·(w(x)·W h)``."""

    def __init__(self, facts: Facts, writers: set, bounds: set):
        self.state_of, self.writers, self.bounds, self.memo = {**facts.params, **facts.buffers}, writers, bounds, {}

    def scales(self, n: fx.Node, came_through: set) -> bool:
        """Whether ``n`` multiplies (or, as its dividend, divides) the term it came through by fixed values."""
        nodes = [a for a in n.args if isinstance(a, fx.Node)]
        if sum(a in came_through for a in nodes) != 1 or (traits(n).zero == "first" and n.args[0] not in came_through):
            return False  # a divisor: not linear in the term
        return all(a in came_through or self.fixed(a) for a in nodes)

    def fixed(self, start: fx.Node) -> bool:
        def step(m: fx.Node) -> list:
            if m in self.bounds or self.memo.get(m):
                return []
            if m.op == "get_attr" and self.state_of.get(m.name) in self.writers:
                raise Blocked(False)  # the stream or a term: it carries the factor
            return m.all_input_nodes
        if start not in self.memo:
            try:
                reach([start], step)
                self.memo[start] = True
            except Blocked:
                self.memo[start] = False
        return self.memo[start]
