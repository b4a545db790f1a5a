"""Inline the grad-mode and autocast regions that ``torch.export`` wraps as higher-order ops.

A ``with torch.no_grad():`` (or ``@torch.no_grad()``) inside ``forward`` exports as one call of
``higher_order.wrap_with_set_grad_enabled`` on a submodule holding the region's ops, and
``torch.autocast(..., enabled=False)`` as ``wrap_with_autocast``; transformers 5.17's rotary embeddings
use both. Neither changes what the region computes when it runs outside any autocast: grad mode never
changes a forward value, and a disabled autocast runs the ops in their tensors' own dtypes, which is what
they do outside autocast. So the region's ops are copied into the parent graph, where the axis analysis
and the rules see them like any other op. An autocast region that is *enabled* changes dtypes: it is left
wrapped, and the analysis stops on it with an UnsupportedOpError that names it and its module.

>>> import torch
>>> class M(torch.nn.Module):
...     def forward(self, x):
...         with torch.no_grad():
...             y = x.sin()
...         return y * 2
>>> gm = torch.export.export(M(), (torch.randn(2, 3),), strict=False).module()
>>> inline_context_regions(gm)
1
>>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
['aten.sin.default', 'aten.mul.Tensor']
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from ..errors import TraceError


def _regions() -> dict:
    """higher-order op -> (index of its submodule argument, index of its ``enabled`` flag where inlining it
    depends on that flag), for the ops that are safe to inline."""
    hop = torch.ops.higher_order
    found = {}
    if hasattr(hop, "wrap_with_set_grad_enabled"):  # (enabled, submodule, *operands): any grad mode
        found[hop.wrap_with_set_grad_enabled] = (1, None)
    if hasattr(hop, "wrap_with_autocast"):  # (device, dtype, enabled, cache_enabled, submodule, *operands)
        found[hop.wrap_with_autocast] = (4, 2)  # only disabled: an enabled autocast changes dtypes
    return found


def _inlinable(node: torch.fx.Node, regions: dict) -> bool:
    if node.op != "call_function" or node.target not in regions:
        return False
    flag = regions[node.target][1]
    return flag is None or node.args[flag] is False


def _copy_attr(gm: torch.fx.GraphModule, sub: torch.fx.GraphModule, name: str) -> str:
    """``sub``'s attribute ``name`` (a nested region's submodule) set on ``gm`` under a fresh name."""
    fresh, i = name, 0
    while hasattr(gm, fresh):
        i += 1
        fresh = f"{name}_inlined_{i}"
    setattr(gm, fresh, getattr(sub, name))
    return fresh


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, at: int) -> None:
    """Copy the region's ops before ``node``, route its ``getitem`` users to them and drop ``node``."""
    sub = getattr(gm, node.args[at].target)
    operands = list(node.args[at + 1:])
    env: dict = {}
    outputs = None
    with gm.graph.inserting_before(node):
        for inner in sub.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = operands.pop(0)
            elif inner.op == "output":
                outputs = torch.fx.map_arg(inner.args[0], env.__getitem__)
            else:
                copied = gm.graph.node_copy(inner, env.__getitem__)
                if inner.op == "get_attr":
                    copied.target = _copy_attr(gm, sub, inner.target)
                env[inner] = copied
    for user in list(node.users):
        if user.op != "call_function" or user.target is not operator.getitem:
            raise TraceError(f"torch.export wrapped a region in `{node.target}` whose result `{node.name}` is "
                             f"read by `{user.name}`, not by indexing; growir cannot unwrap it. This is a growir "
                             f"bug: please report it with the model")
        user.replace_all_uses_with(outputs[user.args[1]])
        gm.graph.erase_node(user)
    wrapped = node.args[at]
    gm.graph.erase_node(node)
    if not wrapped.users:
        gm.graph.erase_node(wrapped)


def inline_context_regions(gm: torch.fx.GraphModule) -> int:
    """Inline every grad-mode region and every disabled autocast region of ``gm`` in place (nested regions
    too); the number inlined. Enabled autocast regions stay wrapped (see the module docstring)."""
    regions, count = _regions(), 0
    while True:
        todo = [n for n in gm.graph.nodes if _inlinable(n, regions)]
        if not todo:
            break
        for node in todo:
            _inline(gm, node, regions[node.target][0])
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
