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

from .walker import Facts, op_name

# ops the stream passes through unchanged in value (the identity needs x itself, not a function of it)
STREAM_OPS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.to", "aten._to_copy", "aten.clone",
              "aten.contiguous", "aten.dropout", "aten.alias", "aten.type_as", "aten.detach", "aten.lift_fresh_copy"}
# ops whose output is zero when their first (data) operand is zero
LINEAR_IN_FIRST = STREAM_OPS | {
    "aten.permute", "aten.transpose", "aten.t", "aten.numpy_T", "aten.unsqueeze", "aten.squeeze", "aten.flatten",
    "aten.unflatten", "aten.expand", "aten.expand_as", "aten.repeat", "aten.repeat_interleave", "aten.slice",
    "aten.select", "aten.narrow", "aten.index", "aten.index_select", "aten.gather", "aten.sum", "aten.mean",
    "aten.neg", "aten.div", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.roll",
    "aten.flip", "aten.constant_pad_nd", "aten.native_dropout", "aten.rms_norm", "getitem",
    "aten.feature_dropout", "aten.contiguous"}
# ops whose output is zero when one tensor operand is
PRODUCTS = {"aten.mul", "aten.matmul", "aten.mm", "aten.bmm", "aten.einsum", "aten.linear", "aten.addmm",
            "aten._grouped_mm", "transformers.grouped_mm_fallback", "aten.conv1d", "aten.conv2d", "aten.conv3d",
            "aten.baddbmm"}
# ops whose output is zero when every tensor operand is
SUMS = {"aten.add", "aten.sub", "aten.cat", "aten.stack", "aten.index_add", "aten.index_put", "aten.scatter_add",
        "aten.where", "aten.add_", "aten.index_add_", "aten.index_put_", "aten.scatter_add_"}
ZEROS = {"aten.zeros", "aten.zeros_like", "aten.new_zeros"}


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
        name = op_name(n) if n.op == "call_function" else n.op
        if name in STREAM_OPS:
            n = n.args[0]
        elif name in ("aten.add", "aten.add_") and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1:
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
        name = op_name(n) if n.op == "call_function" else n.op
        if name in STREAM_OPS:
            n = n.args[0]
        elif name in ("aten.add", "aten.add_") and len(n.args) == 2:
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
    if name in ZEROS:
        return frozenset()
    if name in LINEAR_IN_FIRST:
        return zeroing_params(n.args[0], facts, owns, memo)
    if name in PRODUCTS:  # one factor zero (a parameter first: a contraction's writer), and any bias added
        factors, added = _factors_and_bias(n, name)
        biases = [zeroing_params(a, facts, owns, memo) for a in added]
        if None in biases:
            return None
        for a in sorted(factors, key=lambda a: _param_behind(a, facts) is None):
            z = zeroing_params(a, facts, owns, memo)
            if z is not None:
                return z.union(*biases)
        return None
    if name in SUMS:
        zs = [zeroing_params(a, facts, owns, memo) for a in tensors if not _is_index(a)]
        return None if any(z is None for z in zs) else frozenset().union(*zs)
    if name == "aten.scaled_dot_product_attention":  # zero values give zero outputs
        return zeroing_params(n.args[2], facts, owns, memo)
    if name in ("aten.layer_norm", "aten.native_layer_norm"):  # a norm inside the branch: zero weight and bias
        affine = [zeroing_params(a, facts, owns, memo) for a in n.args[2:4] if isinstance(a, fx.Node)]
        return frozenset().union(*affine) if len(affine) == 2 and None not in affine else None
    return None


BIAS_AT = {"aten.linear": 2, "aten.conv1d": 2, "aten.conv2d": 2, "aten.conv3d": 2, "aten.addmm": 0, "aten.baddbmm": 0}


def _factors_and_bias(n: fx.Node, name: str) -> tuple[list, list]:
    """A product's float operands, split into factors and the bias it adds (``linear(x, W, b)``: [x, W], [b])."""
    pos = BIAS_AT.get(name)
    added = [n.args[pos]] if pos is not None and len(n.args) > pos else []
    added += [n.kwargs.get("bias")]
    added = [a for a in added if isinstance(a, fx.Node)]
    factors = [a for a in n.all_input_nodes if _is_tensor(a) and not _is_index(a) and a not in added]
    return factors, added


def _param_behind(a: fx.Node, facts: Facts) -> str | None:
    while isinstance(a, fx.Node) and a.op == "call_function" and op_name(a) in LINEAR_IN_FIRST:
        a = a.args[0]
    return a.name if isinstance(a, fx.Node) and a.name in facts.params else None


def _is_index(a: fx.Node) -> bool:
    """Integer operands (positions, masks of a where) are not data."""
    val = a.meta.get("val")
    return val is not None and not val.is_floating_point()


def _is_tensor(a: fx.Node) -> bool:
    return hasattr(a.meta.get("val"), "shape")
