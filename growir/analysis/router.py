"""Read a mixture-of-experts region against the dense FFN it replaces: which chains compute one expert (or a shared
expert) the way the FFN does, where each FFN weight sits in the expert tensors, and what the router does.

A chain is matched by walking the two subgraphs back from their outputs together. Every op that multiplies by a
weight is read as a *linear view*: ``linear(x, W)``, a grouped matmul over expert weights ``P`` (E, out, in) stored
transposed or not, and a ``chunk``/``split``/``slice`` of such an output along its last axis (rows of the weight).
Ops that only move tokens (a view keeping the last axis, a cast, a gather of rows) are walked through. So a fused
``gate_up_proj`` read as ``grouped_mm(x, P.transpose(-2, -1)).chunk(2, -1)`` gives two views, rows ``[0, I)``
and ``[I, 2I)`` of expert ``e``, matched to the FFN's two projections by what the graph does with each half:
the split is read from the graph, never assumed.

>>> import torch
>>> LinearView("experts.gate_up", expert=True, rows=(0, 8)).weight(torch.ones(4, 16, 3), 1).shape
torch.Size([8, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .nodes import floats
from .ops import INDEXES, SAME_VALUES, kinds, traits

TRANSPOSES = kinds("permute")
SORTS = kinds("sort")  # a choice of experts (topk) is one


@dataclass(frozen=True)
class LinearView:
    """A weight as a linear layer reads it: ``param`` (a state_dict name), expert ``e``'s slice of it where it is an
    expert tensor, transposed or not, then ``rows`` of the (out, in) result."""
    param: str
    expert: bool = False
    transposed: bool = False
    rows: tuple | None = None  # [start, stop) of the output features

    def weight(self, tensor: torch.Tensor, e: int = 0) -> torch.Tensor:
        """The (out, in) weight this view reads from ``tensor`` (a view: writing it writes the tensor)."""
        w = tensor[e] if self.expert else tensor
        w = w.transpose(-2, -1) if self.transposed else w
        return w[self.rows[0]:self.rows[1]] if self.rows else w


@dataclass
class Chain:
    """One expert (or shared expert) matched to the dense FFN: (source view, target view) per weight, the last
    pair the output projection."""
    pairs: list
    end: fx.Node
    expert: bool = field(init=False)

    def __post_init__(self):
        self.expert = any(t.expert for _, t in self.pairs)

    @property
    def params(self) -> set:
        """The target parameters the chain's weights live in."""
        return {t.param for _, t in self.pairs}


def _skip(node):
    while isinstance(node, fx.Node) and _moves_tokens(node):
        node = node.args[0]
    return node


def _moves_tokens(node: fx.Node) -> bool:
    """A cast, copy or view that keeps the last axis, or a gather of rows by one index (tokens to experts)."""
    if INDEXES(node):
        return isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 1
    if not SAME_VALUES(node):
        return False
    a, b = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None, node.meta.get("val")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[-1:] == b.shape[-1:]


def _param(node, want_dim: int):
    """(state_dict name, transposed) behind casts and transposes of a get_attr of ``want_dim`` axes, or None."""
    flipped = False
    while TRANSPOSES(node) or SAME_VALUES(node):
        if TRANSPOSES(node):
            if not _swaps_last_two(node):
                return None
            flipped = not flipped
        node = node.args[0]
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.meta["val"].dim() == want_dim:
        return node.target, flipped
    return None


def _swaps_last_two(node: fx.Node) -> bool:
    """Whether a permute-kind op swaps the last two axes and keeps the others (read from its output shape and
    arguments: ``t``, ``transpose(-2, -1)``, ``permute([..., n-1, n-2])``)."""
    ndim = node.meta["val"].dim()
    ints = [a % ndim for a in node.args[1:] if isinstance(a, int)]
    lists = [list(a) for a in node.args[1:] if isinstance(a, (list, tuple))]
    order = [d % ndim for d in lists[0]] if lists else list(range(ndim))
    if len(ints) == 2:
        order[ints[0]], order[ints[1]] = order[ints[1]], order[ints[0]]
    elif not lists:
        order = order[::-1]
    return order == list(range(ndim - 2)) + [ndim - 1, ndim - 2]


def linear_view(node: fx.Node):
    """(input, LinearView) where ``node`` multiplies its input by a weight (see the module docstring), else None."""
    t = traits(node)
    if t.kind == "contraction" and t.weight_at is not None and t.bias_at is not None:
        if len(node.args) > t.bias_at and node.args[t.bias_at] is not None:
            return None  # a bias is not one expert's weight: an FFN with biases is matched by no chain yet
        found = _param(node.args[t.weight_at], 2)
        data = next(a for i, a in enumerate(node.args) if i not in (t.weight_at, t.bias_at))
        return (data, LinearView(found[0], transposed=found[1] != (t.weight_out == 1))) if found else None
    if t.kind == "contraction" and t.weight_at is None and len(node.args) >= 2 and _dims(node.args[0]) == 2:
        found = _param(node.args[1], 3)  # a grouped matmul: x @ T[e] = linear(x, T[e].T), T = P.transpose(-2, -1)
        return (node.args[0], LinearView(found[0], expert=True, transposed=not found[1])) if found else None
    if t.kind == "item" and isinstance(node.args[0], fx.Node):
        return _piece(node.args[0], node.args[1])
    if t.kind == "slice" and _dims(node) == _dims(node.args[0]) and _last(node, node.args[1]) \
            and (len(node.args) < 5 or node.args[4] == 1):
        size = node.args[0].meta["val"].shape[-1]
        start = (node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0) % size
        return _rows(linear_view(node.args[0]), start, start + node.meta["val"].shape[-1])
    return None


def _dims(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _last(node: fx.Node, dim) -> bool:
    return isinstance(dim, int) and dim % node.args[0].meta["val"].dim() == node.args[0].meta["val"].dim() - 1


def _piece(split: fx.Node, i: int):
    """Piece ``i`` of a split-kind op along the last axis of a linear view's output (its pieces keep the axes)."""
    pieces = split.meta.get("val")
    if traits(split).kind != "split" or not isinstance(pieces, (list, tuple)) or \
            any(p.dim() != _dims(split.args[0]) for p in pieces):
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not _last(split, dim):
        return None
    starts = [0]
    for piece in pieces:
        starts.append(starts[-1] + piece.shape[-1])
    return _rows(linear_view(split.args[0]), starts[i], starts[i + 1])


def _rows(inner, start: int, stop: int):
    if inner is None:
        return None
    x, view = inner
    base = view.rows[0] if view.rows else 0
    return x, LinearView(view.param, view.expert, view.transposed, (base + start, base + stop))


def _consts(node: fx.Node) -> str:
    return repr([a for a in node.args[1:] if not isinstance(a, fx.Node)] + sorted(node.kwargs.items()))


def match_chain(s, t, pairs: dict):
    """The (source view, target view) pairs under which ``t`` computes what ``s`` does, or None. ``pairs`` maps
    the source region's inputs to the target's."""
    s, t = _skip(s), _skip(t)
    if s in pairs:
        return [] if _skip(pairs[s]) is t or pairs[s] is t else None
    ls, lt = linear_view(s), linear_view(t)
    if ls is not None or lt is not None:
        if ls is None or lt is None:
            return None
        inner = match_chain(ls[0], lt[0], pairs)
        return None if inner is None else inner + [(ls[1], lt[1])]
    if not (isinstance(s, fx.Node) and isinstance(t, fx.Node)) or s.op != "call_function" or t.op != s.op:
        return None
    if s.target != t.target or _consts(s) != _consts(t):
        return None
    sa, ta = [a for a in s.args if isinstance(a, fx.Node)], [a for a in t.args if isinstance(a, fx.Node)]
    if len(sa) != len(ta):
        return None
    out = []
    for a, b in zip(sa, ta):
        sub = match_chain(a, b, pairs)
        if sub is None:
            return None
        out += sub
    return out


def chains(region, pairs: dict) -> list:
    """Every chain of the target region that computes the source region's function (one per expert tensor
    group or shared expert), matched from the output projection back to the region's input."""
    end = _skip(region.output[0])
    found = []
    for node in region.target:
        if linear_view(node) is not None:
            got = match_chain(end, node, pairs)
            if got:
                found.append(Chain(got, node))
    return found


def router_ops(region, chain_params: set) -> tuple[set, list]:
    """(the router's parameters: those whose values reach a choice (``topk``), the ops from them to the combine
    weights in graph order), read from the target region: the nodes computed from router parameters, not experts."""
    region_nodes = set(region.target)
    from_experts = _downstream([n for n in region.target if n.op == "get_attr" and n.target in chain_params],
                               region_nodes)
    routers = set()
    for n in region.target:
        if n.op == "get_attr" and n.target not in chain_params:
            down = _downstream([n], region_nodes)
            if any(SORTS(d) for d in down):
                routers.add(n)
    routed = _downstream(list(routers), region_nodes) - from_experts
    weights = [a for u in from_experts for a in u.all_input_nodes if a in routed and floats(a)]  # combine weights
    path = _upstream(weights, routed)
    names = [_label(n) for n in region.target if n in path and n.op == "call_function"
             and traits(n).kind not in ("cast", "copy", "view", "item", "assert")]
    return {n.target for n in routers}, list(dict.fromkeys(names))


def _label(node: fx.Node) -> str:
    target = node.target
    return getattr(getattr(target, "_overloadpacket", target), "__name__", str(target))


def _reach(starts: list, within: set, step) -> set:
    """The nodes of ``within`` reached from ``starts`` by following ``step`` (a node's inputs or its users)."""
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo += [a for a in step(n) if a in within]
    return seen


def _upstream(starts: list, within: set) -> set:
    return _reach(starts, within, lambda n: n.all_input_nodes)


def _downstream(starts: list, within: set) -> set:
    return _reach(starts, within, lambda n: n.users)
