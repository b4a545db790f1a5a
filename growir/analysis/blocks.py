"""Blocks: repeated, identical subgraphs that depth growth can copy.

A block list is a module container whose integer-indexed children have the same class, the same parameter
shapes and the same sequence of aten ops, and that run one after another with each block's residual input
being the previous block's output. Blocks may also be stored as parallel lists (``ln1[i]``, ``attn[i]``,
``mlp[i]``): block i is then the stretch of the graph from the first op of any list's i-th entry to the first
op of the (i+1)-th entries, glue included, and the same tests apply. Names decide nothing here; indices and
the graph do.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .residual import stream_terms, zeroing_params
from .nodes import op_name
from .walker import Facts


@dataclass
class Blocks:
    """A list of repeated blocks: their module paths, graph nodes, shared parameter suffixes, residual chain,
    whether they are pre-norm, and the parameters whose zeroing makes a new block an identity."""
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
    containers: list = field(default_factory=list)  # parallel lists (block i = their i-th entries); [] if nested

    @property
    def count(self) -> int:
        """How many blocks the list holds."""
        return len(self.paths)

    def name(self, i: int, suffix: str) -> str:
        """The state name of a block parameter in block ``i`` (old or new position).

        >>> Blocks("h", ["h.0", "h.1"], [], ["ln.weight"]).name(3, "ln.weight")
        'h.3.ln.weight'
        >>> Blocks("ln1, mlp", ["ln1.0", "ln1.1"], [], [], containers=["ln1", "mlp"]).name(3, "mlp.{}.fc.weight")
        'mlp.3.fc.weight'
        """
        return suffix.format(i) if self.containers else f"{self.prefix}.{i}.{suffix}"

    def suffix_of(self, i: int, state: str) -> str | None:
        """The suffix of ``state`` if it belongs to block ``i``, else None (the inverse of ``name``)."""
        for c in self.containers or [self.prefix]:
            head = f"{c}.{i}."
            if state.startswith(head):
                rest = state[len(head):]
                return f"{c}.{{}}.{rest}" if self.containers else rest
        return None


def _stack_paths(node: fx.Node) -> list:
    return [v[0] for v in (node.meta.get("nn_module_stack") or {}).values()]


def _classes(gm: fx.GraphModule) -> dict:
    out = {}
    for n in gm.graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            out[path] = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
    return out


def find_blocks(gm: fx.GraphModule, facts: Facts) -> list[Blocks]:
    """Every block list of the graph (nested module lists and parallel lists), with whether each is
    homogeneous and pre-norm (why not, in words) and the parameters that make a new block an identity."""
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
    found = []
    for prefix, kids in children.items():
        idx = sorted(kids)
        if len(idx) < 2 or idx != list(range(len(idx))) or len({classes[kids[i]] for i in idx}) != 1:
            continue
        if any(prefix.startswith(b.prefix + ".") and b.homogeneous for b in found):
            continue
        paths = [kids[i] for i in idx]
        found.append(_describe(gm, facts, prefix, [members[p] for p in paths], Blocks(prefix, paths, [], [])))
    # stages that differ (a downsampling layer here and there) are no blocks, but the block lists inside them are
    found = [b for b in found if b.homogeneous or not any(
        c.prefix.startswith(b.prefix + ".") and c.homogeneous for c in found)]
    return _merge_parallel(gm, facts, found, members)


def _merge_parallel(gm, facts, found: list, members: dict) -> list:
    """Lists of equal length whose entries do not chain on their own: try them as one block list, block i
    being the graph from the first op of their i-th entries up to the first op of their (i+1)-th."""
    by_count = defaultdict(list)
    for b in found:
        if not b.homogeneous:
            by_count[b.count].append(b)
    for count, lists in by_count.items():
        lists = [b for b in lists if not any(b.prefix.startswith(f"{o.prefix}.") for o in lists)]  # not nested
        if len(lists) < 2:
            continue
        spans = _spans(gm, [[members[b.paths[i]] for b in lists] for i in range(count)])
        if spans is None:
            continue
        names = [b.prefix for b in lists]
        merged = Blocks(", ".join(names), [f"{names[0]}.{i}" for i in range(count)], [], [], containers=names)
        merged = _describe(gm, facts, merged.prefix, spans, merged)
        if merged.homogeneous:
            found = [b for b in found if b not in lists] + [merged]
    return [b for b in found if b.homogeneous or not _inside_blocks(b, found)]


def _inside_blocks(b: Blocks, found: list) -> bool:
    """Whether ``b`` is a list inside the blocks of a block list (experts inside parallel ``mlp[i]`` lists):
    those blocks are copied whole, so the inner list is no depth of its own."""
    return any(b.prefix.startswith(f"{c}.") for o in found if o.homogeneous and o is not b
               for c in (o.containers or [o.prefix]))


def _spans(gm, entries: list) -> list | None:
    """Per block, the nodes from its first entry op to the next block's (the last block: as many tensor ops
    as the first); None where the entries of different blocks interleave."""
    order = [n for n in gm.graph.nodes if n.op == "call_function"]
    pos = {n: k for k, n in enumerate(order)}
    ranges = [(min(pos[n] for ns in e for n in ns if n in pos), max(pos[n] for ns in e for n in ns if n in pos))
              for e in entries]
    starts = [r[0] for r in ranges] + [len(order)]
    if any(ranges[i][1] >= starts[i + 1] for i in range(len(ranges))) or starts != sorted(starts):
        return None
    spans = [order[starts[i]:starts[i + 1]] for i in range(len(ranges) - 1)]
    want, last = sum(map(_is_tensor, spans[0])), []
    for n in order[starts[-2]:]:
        if sum(map(_is_tensor, last)) == want:
            break
        last.append(n)
    return spans + [last]


def _param_suffixes(gm: fx.GraphModule, b: Blocks, i: int) -> dict:
    tensors = list(gm.named_parameters()) + list(gm.named_buffers())
    return {b.suffix_of(i, name): tuple(p.shape) for name, p in tensors if b.suffix_of(i, name) is not None}


def _describe(gm, facts, prefix, nodes, b: Blocks) -> Blocks:
    paths = b.paths
    shapes = [_param_suffixes(gm, b, i) for i in range(len(paths))]
    sigs = [tuple(op_name(n) for n in ns if _is_tensor(n)) for ns in nodes]
    b.nodes, b.suffixes = nodes, sorted(shapes[0])
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


def _residual_structure(gm, facts, b: Blocks):
    """(identity-ready, writer suffixes) of block 0: the stream from input to output only adds terms, and
    zeroing the writers zeroes every term (see ``residual.py``)."""
    terms = stream_terms(b.chain_in[0], b.chain_out[0])
    if terms is None:
        return False, []
    owns = lambda state: b.suffix_of(0, state) is not None
    memo, writers = {}, set()
    for t in terms:
        z = zeroing_params(t, facts, owns, memo)
        if z is None:
            return False, []
        writers |= z
    return True, sorted(b.suffix_of(0, facts.params[w]) for w in writers)
