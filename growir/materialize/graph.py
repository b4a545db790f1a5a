"""Materialize: the grown tensors as a rewritten GraphModule, or as the model's own class rebuilt from an
updated config. Config field names are used only here, to rebuild; every rebuilt shape is checked
against the grown tensors before anything is loaded, and a mismatch loads nothing.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from ..errors import MaterializeError
from ..frontend.folder import named_tensors
from ..passes.depth import Schedule
from ..quiet import library_noise_off


# --- the rewritten GraphModule ----------------------------------------------------------------------------------
def set_tensor(root: torch.nn.Module, dotted: str, value: torch.Tensor, as_param: bool) -> None:
    """Put ``value`` at the dotted name under ``root`` as a parameter or a buffer, creating the empty modules on
    the way and replacing what was there."""
    *path, leaf = dotted.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if leaf in mod._parameters:
        del mod._parameters[leaf]
    if leaf in mod._buffers:
        del mod._buffers[leaf]
    if as_param:
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        mod.register_buffer(leaf, value)


def release_weights(gm: torch.nn.Module) -> None:
    """Replace ``gm``'s tensors by meta tensors of the same shape and dtype (its graph stays readable), so a
    growth record that keeps the traced graph does not keep the source's weights alive. The tensors are
    swapped in ``gm``'s own modules: whoever else holds them (the source model) keeps them."""
    for name, t in named_tensors(gm):
        if not t.is_meta:
            set_tensor(gm, name, t.detach().to("meta"), isinstance(t, torch.nn.Parameter))


def build_graph_module(gm: fx.GraphModule, state: dict, params: set, schedules: list[Schedule],
                       rewrite=None, aliases: dict | None = None) -> fx.GraphModule:
    """A copy of ``gm`` holding the grown tensors, its size literals rewritten, blocks copied per schedule.
    Tied tensors (``aliases``: name -> the name the graph reads) stay one tensor."""
    shared = [t for _, t in named_tensors(gm)]
    with library_noise_off():  # copying the GraphModule's pytree specs warns inside torch
        new = copy.deepcopy(gm, {id(t): t for t in shared})  # the graph and modules, not the weights it replaces
    if rewrite is not None:
        rewrite(new)
    aliases = aliases or {}
    for name, tensor in state.items():
        if name not in aliases:
            set_tensor(new, name, tensor, name in params)
    for name, canonical in aliases.items():
        *path, leaf = name.split(".")
        owner = new.get_submodule(".".join(path)) if path else new
        target = new.get_parameter(canonical) if canonical in params else new.get_buffer(canonical)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        setattr(owner, leaf, target) if canonical in params else owner.register_buffer(leaf, target)
    _unshare(new, shared)
    stale, renamed = set(), {}
    for sched in schedules:
        stale |= _copy_blocks(new, sched, renamed)
    new.graph.eliminate_dead_code()
    _drop_tensors(new, stale)
    new.graph.lint()
    new.recompile()
    return new


def _unshare(new: fx.GraphModule, shared: list) -> None:
    """A source tensor no grown one replaced (none, normally) is copied: the grown model shares nothing."""
    ids = {id(t) for t in shared}
    for name, t in named_tensors(new):
        if id(t) in ids:
            set_tensor(new, name, t.detach().clone(), isinstance(t, torch.nn.Parameter))


def _copy_blocks(gm: fx.GraphModule, sched: Schedule, renamed: dict) -> set:
    """Re-emit the block region of ``gm``'s graph as the schedule's sequence of block copies; the names of the old
    blocks' tensors that no copy has now. ``renamed``: a list's old output -> its copy's (the input of a list
    that follows it directly, as the stages' lists of a hierarchical model), kept up to date."""
    b = sched.blocks
    names = [[n.name for n in ns] for ns in b.nodes]
    by_name = {n.name: n for n in gm.graph.nodes}
    blocks = [[by_name[x] for x in ns] for ns in names]
    inside = {n for ns in blocks for n in ns}
    chain_in = by_name[renamed.get(b.chain_in[0].name, b.chain_in[0].name)]
    last_out = by_name[b.chain_out[-1].name]
    order = list(gm.graph.nodes)
    first = min(order.index(ns[0]) for ns in blocks)
    last = max(order.index(ns[-1]) for ns in blocks)
    between = [n for n in order[first:last + 1] if n not in inside]
    if any(a in inside for n in between for a in n.all_input_nodes):
        raise MaterializeError(f"nodes between the blocks of `{b.prefix}` read block outputs; growir cannot "
                               f"reorder them to copy blocks")
    for n in between:  # they only read earlier values: move them before the block region
        order[first].prepend(n)
    current = chain_in
    cursor = blocks[0][0]
    latest = {}  # original node -> its newest copy: size arithmetic one block shares with the next
    for pos, src in enumerate(sched.sources):
        env = dict(latest)
        env[by_name[b.chain_in[src].name] if src else chain_in] = current
        for n in blocks[src]:
            for a in n.all_input_nodes:
                suffix = b.suffix_of(src, a.target) if a.op == "get_attr" and a not in env else None
                if suffix is not None:
                    with gm.graph.inserting_before(cursor):
                        env[a] = gm.graph.get_attr(b.name(pos, suffix))
            with gm.graph.inserting_before(cursor):
                copied = gm.graph.node_copy(n, lambda a: env.get(a, a))
            env[n] = copied
            latest[n] = copied
        current = env[by_name[b.chain_out[src].name]]
    last_out.replace_all_uses_with(current, delete_user_cb=lambda u: u not in inside)
    renamed[last_out.name] = current.name
    for ns in reversed(blocks):
        for n in reversed(ns):
            gm.graph.erase_node(n)
    kept = {b.name(pos, sfx) for pos, src in enumerate(sched.sources) for sfx in b.suffixes_of(src)}
    return {b.name(i, sfx) for i in range(b.count) for sfx in b.suffixes_of(i)} - kept


def _drop_tensors(gm: fx.GraphModule, names: set) -> None:
    """Tensors no block reads any more (by runs, a block of another kind stands where theirs was)."""
    for name in names:
        *path, leaf = name.split(".")
        owner = gm.get_submodule(".".join(path))
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)


def proxy_schedules(blocks: list, schedules: list[Schedule], counts: dict) -> list[Schedule] | str:
    """The block copies that make a two-block proxy's graph the full grown one (``frontend/proxy.py``: proxy block 0
    stands for blocks 0..n-2 of the full list, block 1 for block n-1): per cut list, its depth schedule's sources
    mapped to the proxy's blocks, or the full list itself where its depth does not grow. A string says why the
    proxy's graph cannot stand for the full one (blocks of several kinds, whose order the proxy does not hold).

    >>> from types import SimpleNamespace
    >>> b = SimpleNamespace(prefix="h", mixed=False, homogeneous=True)
    >>> [s.sources for s in proxy_schedules([b], [], {"h": 4})]
    [[0, 0, 0, 1]]
    """
    by_prefix = {s.blocks.prefix: s for s in schedules}
    out = []
    for b in blocks:
        n = counts.get(b.prefix)
        if n is None:
            out += [by_prefix[b.prefix]] if b.prefix in by_prefix else []
            continue
        if b.mixed or not b.homogeneous:
            return f"the blocks of `{b.prefix}` are of several kinds, and the proxy holds two of them"
        sched = by_prefix.get(b.prefix)
        sources = sched.sources if sched is not None else list(range(n))
        out.append(Schedule(b, [0 if s < n - 1 else 1 for s in sources], sched.fresh if sched else [False] * n,
                            sched.method if sched else "identity"))
    return out


def off_meta(gm: fx.GraphModule, device: torch.device) -> None:
    """The devices a graph traced on the meta device names (a proxy's: ``arange(..., device=meta)``, ``to(meta)``)
    made ``device``, so it runs on the real tensors."""
    meta = torch.device("meta")

    def swap(a):
        return device if isinstance(a, torch.device) and a == meta else a
    for node in gm.graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)

