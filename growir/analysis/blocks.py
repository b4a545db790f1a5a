"""Blocks: repeated, identical subgraphs that depth growth can copy.

A block list is a module container whose integer-indexed children have the same class, the same parameter
shapes and the same sequence of aten ops, and that run one after another with each block's residual input
being the previous block's output. Names decide nothing here; indices and the graph do.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .walker import Facts, op_name

CONTRACTIONS = {"aten.linear", "aten.addmm", "aten.mm", "aten.matmul", "aten.bmm", "aten.conv1d", "aten.conv2d",
                "aten.einsum", "aten.baddbmm"}


@dataclass
class Blocks:
    prefix: str  # module path of the container, e.g. "model.layers"
    paths: list  # block module paths in order
    nodes: list  # per block: fx nodes in graph order
    suffixes: list  # parameter names relative to a block, shared by all blocks
    homogeneous: bool = True
    why_not: str = ""
    chain_in: list = field(default_factory=list)  # per block: the node carrying the residual input
    chain_out: list = field(default_factory=list)  # per block: the node carrying the residual output
    pre_norm: bool = False
    writers: list = field(default_factory=list)  # parameter suffixes whose zeroing makes a block an identity

    @property
    def count(self) -> int:
        return len(self.paths)


def _stack_paths(node: fx.Node) -> list:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def _classes(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            out[path] = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return out


def find_blocks(gm: fx.GraphModule, facts: Facts) -> list[Blocks]:
    classes = _classes(gm)
    children = defaultdict(dict)
    for path in classes:
        m = re.fullmatch(r"(.+)\.(\d+)", path)
        if m:
            children[m.group(1)][int(m.group(2))] = path
    members = defaultdict(list)
    for n in gm.graph.nodes:
        for path in set(_stack_paths(n)):
            members[path].append(n)
    state = {**{k: v for k, v in facts.params.items()}}
    found = []
    for prefix, kids in children.items():
        idx = sorted(kids)
        if len(idx) < 2 or idx != list(range(len(idx))) or len({classes[kids[i]] for i in idx}) != 1:
            continue
        if any(prefix.startswith(b.prefix + ".") for b in found):
            continue
        paths = [kids[i] for i in idx]
        found.append(_describe(gm, facts, prefix, paths, [members[p] for p in paths], state))
    return found


def _param_suffixes(gm: fx.GraphModule, path: str) -> dict:
    tensors = list(gm.named_parameters()) + list(gm.named_buffers())
    return {name[len(path) + 1:]: tuple(p.shape) for name, p in tensors if name.startswith(path + ".")}


def _describe(gm, facts, prefix, paths, nodes, state) -> Blocks:
    shapes = [_param_suffixes(gm, p) for p in paths]
    sigs = [tuple(op_name(n) for n in ns if _is_tensor(n)) for ns in nodes]
    b = Blocks(prefix, paths, nodes, sorted(shapes[0]))
    if any(s != shapes[0] for s in shapes):
        odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
        extra = sorted(set(shapes[odd]) ^ set(shapes[0]))
        b.homogeneous, b.why_not = False, (f"block `{paths[odd]}` has other parameters than `{paths[0]}` "
                                           f"({', '.join(extra[:3]) or 'different shapes'})")
        return b
    if any(s != sigs[0] for s in sigs):
        odd = next(i for i, s in enumerate(sigs) if s != sigs[0])
        b.homogeneous, b.why_not = False, f"block `{paths[odd]}` runs other ops than `{paths[0]}`"
        return b
    try:
        _chain(b)
    except ValueError as exc:
        b.homogeneous, b.why_not = False, str(exc)
        return b
    b.pre_norm, b.writers = _residual_structure(gm, facts, b)
    return b


def _is_tensor(n: fx.Node) -> bool:
    """Tensor-valued nodes make up a block; size arithmetic (SymInts) may be shared between blocks."""
    return isinstance(n.meta.get("val"), torch.Tensor)


def _outside_users(ns: list) -> list:
    inside = set(ns)
    return [n for n in ns if _is_tensor(n) and any(u not in inside for u in n.users)]


def _chain(b: Blocks) -> None:
    """Find each block's residual input and output (the value one block hands to the next)."""
    for i, ns in enumerate(b.nodes):
        outs = _outside_users(ns)
        if len(outs) != 1:
            raise ValueError(f"block `{b.paths[i]}` hands {len(outs)} values to the rest of the graph; "
                             f"depth growth needs exactly one (the residual stream)")
        b.chain_out.append(outs[0])
    for i, ns in enumerate(b.nodes):
        if i > 0:
            b.chain_in.append(b.chain_out[i - 1])
            continue
        # block 0's input sits where block 1 reads block 0's output
        prev = b.chain_out[0]
        for k, n in enumerate(b.nodes[1]):
            flat = fx.node.map_arg((n.args, n.kwargs), lambda a: a)
            pos = _arg_positions(flat, prev)
            if pos:
                src = _at(fx.node.map_arg((ns[k].args, ns[k].kwargs), lambda a: a), pos[0])
                b.chain_in.append(src)
                break
        else:
            raise ValueError(f"block `{b.paths[1]}` does not read the output of `{b.paths[0]}`")


def _arg_positions(tree, target, path=()) -> list:
    if tree is target:
        return [path]
    if isinstance(tree, (list, tuple)):
        return [p for i, t in enumerate(tree) for p in _arg_positions(t, target, path + (i,))]
    if isinstance(tree, dict):
        return [p for k, t in tree.items() for p in _arg_positions(t, target, path + (k,))]
    return []


def _at(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _is_contraction(n: fx.Node, facts: Facts) -> bool:
    return n.op == "call_function" and op_name(n) in CONTRACTIONS and any(
        isinstance(a, fx.Node) and a.name in facts.params for a in n.args)


def _residual_structure(gm, facts, b: Blocks):
    """(pre_norm, writer suffixes) of block 0: the residual path from input to output must hold no norm."""
    inside = set(b.nodes[0])
    norm_nodes = {name for name, _ in facts.norms} | {r.node for r in facts.reads if r.kind == "norm"}
    forward, stack = set(), [b.chain_in[0]]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u in inside and u not in forward and not _is_contraction(u, facts):
                forward.add(u)
                stack.append(u)
    backward, stack, writers = set(), [b.chain_out[0]], set()
    while stack:
        n = stack.pop()
        if n in backward:
            continue
        backward.add(n)
        for a in n.all_input_nodes:
            if a not in inside:
                continue
            if _is_contraction(a, facts):
                writers.add(a)
            else:
                stack.append(a)
    on_path = forward & backward
    pre_norm = not any(n.name in norm_nodes for n in on_path)
    path = b.paths[0] + "."
    suffixes = sorted({facts.params[a.name][len(path):] for w in writers for a in w.all_input_nodes
                       if a.name in facts.params and facts.params[a.name].startswith(path)})
    return pre_norm, suffixes
