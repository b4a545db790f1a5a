"""Frontend: a model and example inputs in, an aten-level ``torch.fx.GraphModule`` out (``torch.export``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from .errors import TraceError
from .inputs import example_inputs_for
from .quiet import library_noise_off


@dataclass
class Captured:
    gm: torch.fx.GraphModule  # ep.module(): parameters as get_attr nodes named by their state_dict names
    args: tuple
    kwargs: dict
    is_hf: bool


def is_hf(model: torch.nn.Module) -> bool:
    """Whether the model is a Hugging Face PreTrainedModel (rebuilt from its config after growth)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _dynamic_shapes(args: tuple, kwargs: dict):
    """Batch and sequence axes are dynamic, so no batch or sequence size is baked into the graph."""
    def spec(name, t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        if not t.is_floating_point() and t.dim() >= 2:  # token ids, masks: (batch, seq, ...)
            return {0: Dim.AUTO, 1: Dim.AUTO}
        if name == "pixel_values" or t.dim() == 4:
            return {0: Dim.AUTO}
        return {0: Dim.AUTO, 1: Dim.AUTO} if t.dim() >= 3 else {0: Dim.AUTO}
    return (tuple(spec(None, a) for a in args), {k: spec(k, v) for k, v in kwargs.items()})


def capture(model: torch.nn.Module, example_inputs=None) -> Captured:
    """Export ``model`` (eval mode, source untouched) to an aten graph with dynamic batch and sequence axes.

    >>> import torch, growir.frontend as fe
    >>> cap = fe.capture(torch.nn.Linear(4, 3), (torch.randn(2, 5, 4),))
    >>> sorted(n.target for n in cap.gm.graph.nodes if n.op == "get_attr")
    ['bias', 'weight']
    """
    if not any(True for _ in model.parameters()):
        raise TraceError(f"{type(model).__name__} has no parameters: there is nothing to grow")
    args, kwargs = example_inputs_for(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        with library_noise_off():  # torch.export's own deprecation warnings are not the user's
            gm = _export(model, args, kwargs).module()
    finally:
        model.train(was_training)
    return Captured(gm, args, kwargs, is_hf(model))


def _export(model: torch.nn.Module, args: tuple, kwargs: dict):
    """``torch.export.export`` with dynamic batch and sequence axes, else static shapes, else a TraceError."""
    ds_args, ds_kwargs = _dynamic_shapes(args, kwargs)
    ds = None if (args and kwargs) else (ds_args if args else ds_kwargs)
    try:
        return torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=ds, strict=False)
    except Exception as first:  # noqa: BLE001 - retried with static shapes, then reported
        try:
            return torch.export.export(model, args, kwargs=kwargs, strict=False)
        except Exception as exc:
            raise TraceError(f"torch.export could not trace {type(model).__name__}: "
                             f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}. growir needs a model "
                             f"that torch.export.export(..., strict=False) accepts; check that the "
                             f"example inputs match forward()'s signature") from first
