"""Exactness is judged in float32: a bfloat16 or float16 model is measured through a float32 twin.

Why not the model's own dtype: a wider bfloat16 matmul rounds differently from a narrower one, so two models
with the same function differ by about bfloat16's epsilon (2^-8) in their outputs, and a tolerance that loose
would also pass a real bug of that size. Upcasting is exact (every bfloat16/float16 value is a float32 value),
so the twins compute, in float32, the functions the stored weights define; an exact growth then measures
~1e-6 and a wrong weight shows at its own size.

>>> import torch
>>> net = torch.nn.Linear(4, 3).to(torch.bfloat16)
>>> twin = float32_twin(net)
>>> twin.weight.dtype, net.weight.dtype, bool((twin.weight == net.weight.float()).all())
(torch.float32, torch.bfloat16, True)
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..analysis.nodes import attr_value
from ..frontend.folder import named_tensors

LOW_PRECISION = (torch.bfloat16, torch.float16)


def needs_upcast(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds a bfloat16 or float16 parameter or buffer."""
    return any(t.dtype in LOW_PRECISION for t in _tensors(model))


def float32_twin(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` itself if it holds no low-precision tensor, else a copy whose bfloat16/float16 parameters and
    buffers are float32 (other tensors are shared, not copied: the twin is for measuring under no_grad).
    A GraphModule's graph has the dtype it was traced in written into its casts (``x.to(bfloat16)``): the
    twin's graph has those literals rewritten to float32, so the whole forward runs in float32.
    The source is not modified; the extra memory is one float32 copy of its low-precision tensors."""
    if not needs_upcast(model):
        return model
    memo = {}
    for t in _tensors(model):
        if id(t) not in memo:
            wide = t.detach().float() if t.dtype in LOW_PRECISION else t
            memo[id(t)] = torch.nn.Parameter(wide, requires_grad=False) if isinstance(t, torch.nn.Parameter) \
                else wide
    twin = copy.deepcopy(model, memo)
    if isinstance(twin, fx.GraphModule):
        _upcast_graph(twin)
    return twin


@contextlib.contextmanager
def float32_modules(model: torch.nn.Module):
    """``model`` computing in float32 while the block runs, without a float32 copy of all of it: each module's
    own bfloat16/float16 parameters and buffers are float32 copies only while its forward runs, so the extra
    memory is one module's tensors, and everything is put back after (also on an error). Type promotion
    upcasts exactly wherever a forward reads a tensor it does not own; a forward that mixes dtypes in a
    matmul fails instead, and the caller falls back to :func:`float32_twin`. A GraphModule (its casts are
    in its graph) is given as a copy sharing its tensors whose graph upcasts each one where it is read.

    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    >>> with float32_modules(net) as m:
    ...     m(torch.ones(1, 4)).dtype
    torch.float32
    >>> net[0].weight.dtype
    torch.bfloat16
    """
    if not needs_upcast(model):
        yield model
        return
    if isinstance(model, fx.GraphModule):
        yield _reading_in_float32(model)
        return
    saved, depth, handles = {}, {}, []

    def swap_in(module, *_):
        depth[module] = depth.get(module, 0) + 1
        if depth[module] == 1:
            saved[module] = _upcast_own(module)

    def swap_out(module, *_):
        depth[module] -= 1
        if depth[module] == 0:
            _restore(module, saved.pop(module))
    for module in model.modules():
        if any(t is not None and t.dtype in LOW_PRECISION
               for t in list(module._parameters.values()) + list(module._buffers.values())):
            handles += [module.register_forward_pre_hook(swap_in), module.register_forward_hook(swap_out)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, originals in saved.items():
            _restore(module, originals)


def _reading_in_float32(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` sharing its tensors, its dtype literals float32 and each low-precision tensor upcast
    right after its ``get_attr`` (the float32 value is freed after its last use, like any intermediate)."""
    twin = copy.deepcopy(gm, {id(t): t for t in _tensors(gm)})
    _upcast_graph(twin)
    graph = twin.graph
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = attr_value(node)
        if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
            with graph.inserting_after(node):
                wide = graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.float32})
            node.replace_all_uses_with(wide, delete_user_cb=lambda user: user is not wide)
    twin.recompile()
    return twin


def _upcast_own(module: torch.nn.Module) -> dict:
    originals = {}
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            if t is not None and t.dtype in LOW_PRECISION:
                originals[name] = t
                wide = t.detach().float()
                table[name] = torch.nn.Parameter(wide, requires_grad=False) if table is module._parameters else wide
    return originals


def _restore(module: torch.nn.Module, originals: dict) -> None:
    for name, t in originals.items():
        (module._parameters if name in module._parameters else module._buffers)[name] = t


def upcast_inputs(inputs):
    """``inputs`` (any pytree) with bfloat16/float16 tensors as float32; everything else as is."""
    return pytree.tree_map(lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype in LOW_PRECISION
                           else v, inputs)


def _upcast_graph(gm: fx.GraphModule) -> None:
    """Every low-precision dtype literal in the graph's calls (casts, factory ops) becomes float32."""
    swap = lambda v: torch.float32 if isinstance(v, torch.dtype) and v in LOW_PRECISION else v
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        args, kwargs = fx.node.map_aggregate(node.args, swap), fx.node.map_aggregate(node.kwargs, swap)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def _tensors(model: torch.nn.Module) -> list:
    return [t for _, t in named_tensors(model)]
