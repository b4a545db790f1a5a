"""Frontend: a model and example inputs in, an aten-level ``torch.fx.GraphModule`` out (``torch.export``)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import sympy
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from ..errors import TraceError, first_line, warn
from .inline import inline_context_regions
from .inputs import example_inputs_for
from ..quiet import library_noise_off


@dataclass
class Captured:
    """A model exported by ``capture``: its aten graph, the example inputs it was traced with, and the input
    dimensions and symbol ranges that the export left dynamic."""
    gm: torch.fx.GraphModule  # ep.module(): parameters as get_attr nodes named by their state_dict names
    args: tuple
    kwargs: dict
    is_hf: bool
    dims: list = field(default_factory=list)  # per flat input: its shape (ints and sympy symbols), or None
    ranges: dict = field(default_factory=dict)  # symbol -> (lowest, highest or None) the export allows
    static: str | None = None  # why the export fell back to the example's fixed shapes (None: it did not)


def is_hf(model: torch.nn.Module) -> bool:
    """Whether the model is a Hugging Face PreTrainedModel (rebuilt from its config after growth)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _spec(t, batch=None):
    """Batch and sequence axes are dynamic, so no batch or sequence size is baked into the graph. ``batch``:
    (a named Dim, its size) that every input whose first axis has that size shares (see ``_shared_batch``)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    first = batch[0] if batch is not None and t.shape[0] == batch[1] else Dim.AUTO
    if not t.is_floating_point() and t.dim() >= 2:  # token ids, masks: (batch, seq, ...)
        return {0: first, 1: Dim.AUTO}
    if t.dim() == 4:  # images: (batch, channels, height, width)
        return {0: first}
    return {0: first, 1: Dim.AUTO} if t.dim() >= 3 else {0: first}


def _shared_batch(args: tuple, kwargs: dict):
    """One named batch Dim for inputs that arrive together: a model may build a tensor from one input's batch
    and reshape it by another's (an ALiBi bias from the mask, regrouped by the ids' batch), which the export
    leaves as two symbols unless told they are one. None with fewer than two such inputs; if the model
    needs them apart, that export fails and ``_export`` retries with one Dim.AUTO per input."""
    firsts = [t.shape[0] for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if len(firsts) < 2 or len(set(firsts)) != 1 or firsts[0] < 2:
        return None
    return Dim("batch"), firsts[0]


def dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict, share: bool = True):
    """``dynamic_shapes`` keyed by forward()'s parameter names, so positional, keyword and ``*args``
    inputs can be mixed (torch.export wants a ``*args`` parameter's specs as one tuple)."""
    batch = _shared_batch(args, kwargs) if share else None
    spec = functools.partial(_spec, batch=batch)
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return tuple(spec(a) for a in args) if not kwargs else {k: spec(v) for k, v in kwargs.items()}
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(spec(v) for v in value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


def capture(model: torch.nn.Module, example_inputs=None) -> Captured:
    """Export ``model`` (eval mode, source untouched) to an aten graph with dynamic batch and sequence axes.

    Where torch.export cannot keep those axes dynamic, the graph is exported at the example's shapes, with
    a warning that says what failed; ``Captured.static`` records it.

    >>> import torch, growir.frontend as fe
    >>> cap = fe.capture(torch.nn.Linear(4, 3), (torch.randn(2, 5, 4),))
    >>> sorted(n.target for n in cap.gm.graph.nodes if n.op == "get_attr"), cap.static
    (['bias', 'weight'], None)
    """
    if not any(True for _ in model.parameters()):
        raise TraceError(f"{type(model).__name__} has no parameters: there is nothing to grow")
    args, kwargs = example_inputs_for(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with library_noise_off(), fake_cache_off():  # torch.export's deprecation warnings are not the user's
            ep, static = _export(model, args, kwargs)
            gm = ep.module()
            inline_context_regions(gm)  # no_grad / disabled-autocast regions: the same ops, unwrapped
            constants_as_buffers(gm)
    finally:
        model.train(was_training)
    if static is not None:
        warn(f"growir: torch.export could not keep the batch and sequence axes of {type(model).__name__} "
             f"dynamic ({static}); the graph was exported at the example inputs' fixed shapes, so a rewritten "
             f"GraphModule accepts only those shapes and growir measures the growth at them only")
    dims, ranges = _input_dims(gm, args, kwargs, ep.range_constraints)
    return Captured(gm, args, kwargs, is_hf(model), dims, ranges, static)


def constants_as_buffers(gm: torch.fx.GraphModule) -> list:
    """Register the tensors torch.export lifted as graph constants (``lifted_tensor_N``: a ``torch.tensor(...)``
    or a Python scalar made into a tensor inside ``forward``) as non-persistent buffers of their module, and
    return their new names. ``ep.module()`` sets them as plain attributes, which no ``named_buffers`` lists; as
    buffers, the analysis, the rules and the rewritten graph treat them like any other tensor the graph holds,
    and a state dict (hence a rebuilt class, which computes them again in ``forward``) never sees them. They are
    numbered per module in graph order, so that repeated blocks hold them under the same names (torch numbers
    them across the whole model), as depth growth needs.

    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.lin = torch.nn.Linear(3, 3)
    ...     def forward(self, x):
    ...         return self.lin(x) / torch.tensor(2.0)
    >>> gm = torch.export.export(torch.nn.Sequential(M(), M()), (torch.randn(2, 3),), strict=False).module()
    >>> constants_as_buffers(gm), [n for n, _ in gm.named_buffers()], "0.lifted_tensor_0" in gm.state_dict()
    (['0.lifted_tensor_0', '1.lifted_tensor_0'], ['0.lifted_tensor_0', '1.lifted_tensor_0'], False)
    """
    held = {id(t) for t in gm.parameters()} | {id(t) for t in gm.buffers()}
    renamed, counts = {}, {}
    for node in gm.graph.find_nodes(op="get_attr"):
        *path, leaf = node.target.split(".")
        owner = gm.get_submodule(".".join(path))
        value = owner.__dict__.get(leaf)
        if node.target not in renamed and isinstance(value, torch.Tensor) and id(value) not in held:
            delattr(owner, leaf)
            k = counts[id(owner)] = counts.get(id(owner), -1) + 1
            renamed[node.target] = ".".join([*path, f"lifted_tensor_{k}"])
            owner.register_buffer(f"_growir_constant_{k}", value, persistent=False)  # no clash while renaming
        if node.target in renamed:
            node.target = renamed[node.target]
    for target in renamed.values():
        *path, leaf = target.split(".")
        owner = gm.get_submodule(".".join(path))
        owner.__dict__.pop(leaf, None)  # a lifted constant no node reads, under the name now taken
        owner.register_buffer(leaf, owner._buffers.pop(f"_growir_constant_{leaf.rsplit('_', 1)[1]}"),
                              persistent=False)
    if renamed:
        gm.recompile()
    return list(renamed.values())


def fake_cache_off():
    """torch.export with its fake-tensor dispatch cache off: under symbolic shapes a cache hit rebuilds its
    output (``empty_strided`` + ``set_`` with symbolic sizes) at more cost than running the fake kernel
    again; measured on tiny transformers, one export took 1.4 s of CPU with the cache and 0.9 s without
    (a 2-layer Hugging Face decoder: 2.1 s and 1.1 s), and the graph's code is the same.

    >>> import torch
    >>> with fake_cache_off():
    ...     torch._dynamo.config.fake_tensor_cache_enabled
    False
    """
    import torch._dynamo.config  # noqa: PLC0415 - torch.export imports it anyway; kept out of module import
    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def _export(model: torch.nn.Module, args: tuple, kwargs: dict):
    """(exported program, None) with dynamic batch and sequence axes (one batch for all inputs where the
    model allows it); else (the static export, what the dynamic one failed on); else a TraceError."""
    try:
        return _export_dynamic(model, args, kwargs), None
    except Exception as first:  # noqa: BLE001 - retried with static shapes, reported by the caller
        try:
            static = torch.export.export(model, args, kwargs=kwargs, strict=False)
        except Exception as exc:
            raise TraceError(f"torch.export could not trace {type(model).__name__}: "
                             f"{type(exc).__name__}: {first_line(exc)}. growir needs a model "
                             f"that torch.export.export(..., strict=False) accepts; check that the "
                             f"example inputs match forward()'s signature") from first
        return static, f"{type(first).__name__}: {first_line(first)}"


def _export_dynamic(model: torch.nn.Module, args: tuple, kwargs: dict):
    """The dynamic export: one shared batch Dim first; if the model refuses it, one Dim.AUTO per input."""
    shared = dynamic_shapes(model, args, kwargs)
    auto = dynamic_shapes(model, args, kwargs, share=False)
    if shared != auto:
        try:
            return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=shared, strict=False)
        except Exception:  # noqa: BLE001 - a model whose inputs' batches differ: each its own Dim.AUTO
            pass
    return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=auto, strict=False)


def _input_dims(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, range_constraints: dict):
    """Each flat input's shape as the export sees it (a sympy symbol where the axis is dynamic), and the
    range each symbol may take. Empty when the placeholders do not line up with the inputs."""
    leaves = pytree.tree_leaves((args, kwargs))
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    if len(vals) != len(leaves):
        return [], {}
    dims = []
    for leaf, val in zip(leaves, vals):
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor) or leaf.dim() != val.dim():
            dims.append(None)
            continue
        dims.append(tuple(int(d) if isinstance(d, int) else d.node.expr for d in val.shape))
    ranges = {}
    for sym, vr in range_constraints.items():
        if isinstance(sym, sympy.Symbol):
            lo, hi = vr.lower, vr.upper  # an unbounded end is torch's int_oo, not a sympy Integer
            ranges[sym] = (int(lo) if lo.is_Integer else 0, int(hi) if hi.is_Integer else None)
    return dims, ranges
