"""The residual chain of a block list: the value each block hands the next (its stream output) and reads (its
stream input), found from the graph. A block may hand later blocks other values too (a position bias made by the
first block only): the stream is the one shaped like the value that leaves the list.
"""

from __future__ import annotations

import torch.fx as fx

from .nodes import is_tensor


def changes_shape(b, i: int) -> bool:
    """Whether block ``i``'s stream output is shaped other than its input."""
    return tuple(b.chain_in[i].meta["val"].shape) != tuple(b.chain_out[i].meta["val"].shape)


def outside_users(ns: list) -> list:
    """The tensor nodes of ``ns`` that a node outside ``ns`` reads (what a block hands on)."""
    inside = set(ns)
    return [n for n in ns if is_tensor(n) and any(u not in inside for u in n.users)]


def chain_blocks(b, kinds: list) -> None:
    """Find each block's residual input and output (the value one block hands to the next)."""
    b.chain_in, b.chain_out = [], []
    outs = [outside_users(ns) for ns in b.nodes]
    for i, ns in enumerate(b.nodes):
        stream = stream_out(b, outs, i)
        if stream is None:
            raise ValueError(f"block `{b.paths[i]}` hands {len(outs[i])} values to the rest of the graph; "
                             f"depth growth needs exactly one (the residual stream)")
        b.chain_out.append(stream)
    b.chain_in.append(first_input(b, kinds))
    b.chain_in += b.chain_out[:-1]


def stream_out(b, outs: list, i: int) -> fx.Node | None:
    """Block ``i``'s stream output: its one value read after it, or, where it also hands later blocks of the list
    values of their own (a position bias made by the first block and read by every block), the one shaped like
    the stream (the value that leaves the last block); None where that does not single one out."""
    if len(outs[i]) == 1:
        return outs[i][0]
    later = {n for ns in b.nodes[i:] for n in ns}
    last = outs[-1][0].meta["val"].shape if len(outs[-1]) == 1 else None
    like = [o for o in outs[i] if o.meta["val"].shape == last]
    handed = [o for o in outs[i] if o not in like]
    if len(like) != 1 or any(u not in later for o in handed for u in o.users):
        return None
    return like[0]


def first_input(b, kinds: list) -> fx.Node:
    """Block 0's stream input: where a later block of its kind reads its predecessor's output, block 0 reads
    its input; with no such block, its one outside input shaped like its output."""
    later = next((m for m in range(1, len(kinds)) if kinds[m] == kinds[0]), None)
    if later is None:
        inside, val = set(b.nodes[0]), b.chain_out[0].meta.get("val")
        like = {a for n in b.nodes[0] for a in n.all_input_nodes if a not in inside and is_tensor(a)
                and a.op != "get_attr" and a.meta["val"].shape == val.shape}
        others = {a for ns in b.nodes[1:] for n in ns for a in n.all_input_nodes}
        like = {a for a in like if a not in others} if len(like) > 1 else like  # values every block reads
        if not like:  # block 0 changes the stream's shape (a downsample): its one input no other block reads
            like = {a for n in b.nodes[0] for a in n.all_input_nodes if a not in inside and is_tensor(a)
                    and a.op != "get_attr" and a not in others}
        if len(like) != 1:
            raise ValueError(f"block `{b.paths[0]}` reads {len(like)} values shaped like its output; depth growth "
                             f"needs one (the residual stream)")
        return like.pop()
    prev = b.chain_out[later - 1]
    for k, n in enumerate(b.nodes[later]):
        pos = _arg_positions(fx.node.map_arg((n.args, n.kwargs), lambda a: a), prev)
        if pos:
            return _at(fx.node.map_arg((b.nodes[0][k].args, b.nodes[0][k].kwargs), lambda a: a), pos[0])
    inside = {n for ns in b.nodes for n in ns}
    glue = [u.name for u in prev.users if u not in inside]
    between = f" but `{glue[0]}`, made from it between the blocks (depth growth cannot place that)" if glue else ""
    raise ValueError(f"block `{b.paths[later]}` does not read the output of `{b.paths[later - 1]}`{between}")


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
