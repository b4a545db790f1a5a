"""Align two exported graphs op for op, and find the regions where they differ (a dense FFN and an MoE layer).

Two models that compute the same thing outside some regions export to graphs whose nodes correspond one to one
there. ``align`` pairs them in topological order: a source node pairs with the first unpaired target node that
has the same op, the same constant arguments, the same output shape, and whose tensor arguments are the images
of the source node's (a parameter pairs with the target parameter consumed at the same position). Where a node
cannot pair, the graphs diverge: the unpaired nodes downstream form a region, and the first paired node that
reads a region on both sides closes it, pairing the two regions' outputs (a residual add reading the dense FFN
in one graph, the MoE layer in the other). No name decides: parameters correspond by where they are consumed.

>>> import torch
>>> nn = torch.nn
>>> f = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # the second layer becomes a small MLP
>>> g = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
>>> ep = lambda m: torch.export.export(m, (torch.randn(2, 4),)).module()
>>> a = align(ep(f), ep(g))
>>> sorted(a.params.items()), [len(r.source) for r in a.regions], [len(r.target) for r in a.regions]
([('0.bias', '0.bias'), ('0.weight', '0.weight')], [3], [7])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import SpecError
from .nodes import floats, is_tensor
from .walker import where


@dataclass
class Region:
    """Where the graphs differ: the unpaired nodes of each (topological order), the paired (source, target)
    nodes they read, and the (source, target) pair of values they give to the rest of the graph."""
    source: list
    target: list
    inputs: list  # (source node, target node), paired
    output: tuple  # (source node, target node)


@dataclass
class Alignment:
    """The node pairs of two graphs, the parameters they imply and the regions where the graphs differ."""
    pairs: dict = field(default_factory=dict)  # source node -> target node
    params: dict = field(default_factory=dict)  # target state_dict name -> source state_dict name
    regions: list = field(default_factory=list)


def _key(node: fx.Node):
    """What two corresponding nodes share: the op, the constant arguments, the output's shape and dtype."""
    consts = [a for a in _flat((node.args, node.kwargs)) if not isinstance(a, fx.Node)]
    val = node.meta.get("val")
    shape = (str(tuple(val.shape)), val.dtype) if isinstance(val, torch.Tensor) else None
    return node.op, str(node.target) if node.op != "get_attr" else "", repr(consts), shape


def _flat(x) -> list:
    if isinstance(x, (list, tuple)):
        return [y for item in x for y in _flat(item)]
    if isinstance(x, dict):
        return [y for k in sorted(x) for y in [k] + _flat(x[k])]
    return [x]


class _Aligner:
    def __init__(self, src: fx.GraphModule, tgt: fx.GraphModule):
        self.src, self.tgt = src, tgt
        self.pairs, self.taken, self.ends = {}, set(), {}  # ends: region output pairs (source -> target)
        self.order = {n: i for i, n in enumerate(tgt.graph.nodes)}
        self.by_key = {}
        for n in tgt.graph.nodes:
            self.by_key.setdefault(_key(n), []).append(n)

    def run(self) -> None:
        src_inputs = [n for n in self.src.graph.nodes if n.op == "placeholder"]
        tgt_inputs = [n for n in self.tgt.graph.nodes if n.op == "placeholder"]
        for a, b in zip(src_inputs, tgt_inputs):
            self._pair(a, b)
        for node in self.src.graph.nodes:
            if node.op not in ("placeholder", "get_attr") and node not in self.pairs:
                self._match(node)

    def _pair(self, a: fx.Node, b: fx.Node) -> None:
        self.pairs[a] = b
        self.taken.add(b)

    def _candidates(self, node: fx.Node) -> list:
        anchor = next((a for a in _flat((node.args, node.kwargs)) if isinstance(a, fx.Node)
                       and (a in self.pairs or a in self.ends)), None)
        if anchor is None:
            return self.by_key.get(_key(node), [])
        image = self.pairs.get(anchor, self.ends.get(anchor))
        return sorted(image.users, key=self.order.get)

    def _match(self, node: fx.Node) -> None:
        # a second try may reopen a value paired too early: a dense FFN pairs op for op with an MoE layer's
        # shared expert of its size, and only the residual add that reads the whole layer shows it is one part
        for reopen in (False, True):
            for cand in self._candidates(node):
                if cand in self.taken or _key(cand) != _key(node):
                    continue
                found = self._args_match(_flat((node.args, node.kwargs)), _flat((cand.args, cand.kwargs)), reopen,
                                         node.op == "output")
                if found is not None:
                    attrs, ends = found
                    for x in ends:
                        if x in self.pairs:
                            self._unpair_cone(x)
                    for a, b in attrs + [(node, cand)]:
                        self._pair(a, b)
                    self.ends.update(ends)
                    return

    def _unpair_cone(self, end: fx.Node) -> None:
        """Unpair ``end`` and the paired nodes that only it reads, in both graphs (they become a region)."""
        cone, images = {end}, {self.pairs[end]}
        for n in reversed(list(self.src.graph.nodes)):
            if n in self.pairs and n.op != "placeholder" and n.users and all(u in cone for u in n.users) \
                    and all(u in images for u in self.pairs[n].users):
                cone.add(n)
                images.add(self.pairs[n])
        for n in cone:
            self.taken.discard(self.pairs.pop(n))

    def _args_match(self, xs: list, ys: list, reopen: bool = False, last: bool = False):
        """(get_attr pairs, region output pairs) that make the arguments correspond, or None."""
        if len(xs) != len(ys):
            return None
        attrs, ends = [], []
        for x, y in zip(xs, ys):
            if not isinstance(x, fx.Node) or not isinstance(y, fx.Node):
                if isinstance(x, fx.Node) or isinstance(y, fx.Node) or repr(x) != repr(y):
                    return None
            elif reopen and x in self.pairs and self.pairs[x] is not y and x.op == y.op == "call_function" \
                    and y not in self.taken and y not in self.ends.values():
                ends.append((x, y))
            elif x in self.pairs or x in self.ends:
                if self.pairs.get(x, self.ends.get(x)) is not y:
                    return None
            elif x.op == "get_attr" and y.op == "get_attr" and y not in self.taken and _key(x) == _key(y):
                attrs.append((x, y))
            elif x.op != "get_attr" and y.op != "get_attr" and y not in self.taken and y not in self.ends.values():
                ends.append((x, y))  # both unpaired: the outputs of a region that differs
            else:
                return None
        if ends and not last and len(ends) == len([x for x in xs if isinstance(x, fx.Node) and x.op != "get_attr"]):
            # a node that reads only unpaired values (and weights) is inside a region, not its end (but the
            # output): a dense FFN's down_proj must not pair with a later dense layer's while its own is an MoE
            return None
        return attrs, dict(ends)


def align(src: fx.GraphModule, tgt: fx.GraphModule) -> Alignment:
    """Pair the nodes of ``src`` and ``tgt`` (exported with the same inputs) and collect the regions where they
    differ. SpecError where the graphs do not correspond outside those regions, naming the first node that
    neither pairs nor belongs to a region."""
    al = _Aligner(src, tgt)
    al.run()
    out = Alignment(pairs=al.pairs)
    out.params = {b.target: a.target for a, b in al.pairs.items() if a.op == "get_attr"}
    covered_s, covered_t = set(al.pairs), set(al.pairs.values())
    for s_out, t_out in al.ends.items():
        s_nodes, s_in = _upstream(s_out, al.pairs)
        t_nodes, t_in = _upstream(t_out, set(al.pairs.values()))
        inputs = [(a, al.pairs[a]) for a in s_in if a.op != "get_attr"]
        if {b for _, b in inputs if is_tensor(b)} != {b for b in t_in if b.op != "get_attr" and is_tensor(b)} \
                or not any(n.op == "get_attr" for n in s_nodes) \
                or [_shape(a) for a, _ in inputs if is_tensor(a) and floats(a)] != [_shape(s_out)]:
            # a layer replaced has weights and reads one value of its output's shape the same way in both graphs
            # (an FFN's input): else the graphs compute differently there
            raise SpecError(_divergence(src, tgt, s_nodes, t_nodes))
        out.regions.append(Region(_ordered(src, s_nodes), _ordered(tgt, t_nodes), inputs, (s_out, t_out)))
        covered_s |= s_nodes
        covered_t |= t_nodes
    _check_covered(src, covered_s, "model")
    _check_covered(tgt, covered_t, "target")
    return out


def _upstream(end: fx.Node, paired) -> tuple[set, set]:
    """The unpaired nodes ``end`` is computed from (``end`` included), and the paired nodes they read."""
    nodes, todo = set(), [end]
    while todo:
        n = todo.pop()
        if n in nodes:
            continue
        nodes.add(n)
        todo += [a for a in n.all_input_nodes if a not in paired]
    return nodes, {a for n in nodes for a in n.all_input_nodes if a in paired}


def _divergence(src, tgt, s_nodes: set, t_nodes: set) -> str:
    """Where two graphs stop corresponding: the first node of the source's differing part, against the target's."""
    first, other = _ordered(src, s_nodes)[0], _ordered(tgt, t_nodes)[0]
    if first.op == "get_attr":
        return (f"into: the two graphs diverge at the model's parameter `{first.target}` "
                f"{tuple(first.meta['val'].shape)}: the target consumes none of its shape there")
    return (f"into: the two graphs diverge at the model's {where(first)} (its constants: {_key(first)[2]}), "
            f"against the target's {where(other)} ({_key(other)[2]})")


def _shape(node: fx.Node) -> str:
    return str(tuple(node.meta["val"].shape))


def _ordered(gm: fx.GraphModule, nodes: set) -> list:
    return [n for n in gm.graph.nodes if n in nodes]


def _check_covered(gm: fx.GraphModule, covered: set, which: str) -> None:
    live, todo = set(), [n for n in gm.graph.nodes if n.op == "output"]  # dead code (an unused mask) is no matter
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo += n.all_input_nodes
    for n in gm.graph.nodes:
        if n not in covered and n in live and n.op == "get_attr":
            raise SpecError(f"into: the two graphs diverge at the {which}'s parameter `{n.target}` "
                            f"{tuple(n.meta['val'].shape)}: the other graph consumes none of its shape there")
        if n not in covered and n in live and n.op != "placeholder":
            raise SpecError(f"into: the two graphs diverge at the {which}'s {where(n)}: no node of the other "
                            f"graph computes the same from the same values, and it is in no region that differs "
                            f"(an FFN and its mixture of experts); the target's graph is not the model's upcycled")
