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

import torch.fx as fx

from .ops import ADDS, SAME_VALUES, ZERO_WITH_ALL, ZERO_WITH_FIRST, ZERO_WITH_ONE, ZEROS, back, op_name, traits
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
    n = chain_out
    terms = []
    while n is not chain_in:
        if SAME_VALUES(n):
            n = n.args[0]
        elif ADDS(n) and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1:
            a, b = n.args
            if _on_stream(b, chain_in) and not _on_stream(a, chain_in):
                a, b = b, a
            if not isinstance(b, fx.Node):
                return None
            terms.append(b)
            n = a
        else:
            return None
        if not isinstance(n, fx.Node):
            return None
    return terms


def _on_stream(n, chain_in: fx.Node) -> bool:
    """Whether ``n`` is ``chain_in`` plus terms (a value of the stream)."""
    while isinstance(n, fx.Node) and n is not chain_in:
        if SAME_VALUES(n):
            n = n.args[0]
        elif ADDS(n) and len(n.args) == 2:
            return any(_on_stream(a, chain_in) for a in n.args)
        else:
            return False
    return n is chain_in


def zeroing_params(n, facts: Facts, owns, memo: dict) -> frozenset | None:
    """Graph names of parameters (all accepted by ``owns``) whose zeroing makes ``n`` zero; None if none do."""
    if not isinstance(n, fx.Node):
        return frozenset() if n == 0 else None
    if n in memo:
        return memo[n]
    memo[n] = None  # cycles cannot happen in a DAG; this guards the recursion anyway
    memo[n] = _zeroing(n, facts, owns, memo)
    return memo[n]


def _zeroing(n: fx.Node, facts: Facts, owns, memo: dict) -> frozenset | None:
    if n.op == "get_attr":
        state = facts.params.get(n.name)
        return frozenset([n.name]) if state is not None and owns(state) else None
    if n.op != "call_function":
        return None
    name = op_name(n)
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
    if name == "aten.scaled_dot_product_attention":  # zero values give zero outputs
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
