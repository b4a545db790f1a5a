"""Frontend: a model and example inputs in, an aten-level ``torch.fx.GraphModule`` out (``torch.export``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch.export import Dim

from .errors import TraceError


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


def hf_example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Inputs made from a Hugging Face model's config: token ids and a mask, or pixels; decoder ids if needed."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        inputs = {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=gen)}
    else:
        vocab = getattr(cfg, "vocab_size", None) or cfg.get_text_config().vocab_size
        inputs = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
        if getattr(cfg, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq - 2), generator=gen)
    params = inspect.signature(model.forward).parameters
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def normalize_inputs(model: torch.nn.Module, example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        if is_hf(model):
            return (), hf_example_inputs(model)
        raise TraceError(f"{type(model).__name__} is not a Hugging Face model, so growir cannot make inputs for "
                         f"it: pass example_inputs=(tensor, ...) or example_inputs={{'name': tensor}}")
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


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
    args, kwargs = normalize_inputs(model, example_inputs)
    was_training = model.training
    model.eval()
    try:
        ds_args, ds_kwargs = _dynamic_shapes(args, kwargs)
        ds = ds_kwargs if not args else (ds_args if not kwargs else None)
        if args and kwargs:
            ds = None
        try:
            ep = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=ds, strict=False)
        except Exception as first:  # noqa: BLE001 - retried with static shapes, then reported
            try:
                ep = torch.export.export(model, args, kwargs=kwargs, strict=False)
            except Exception as exc:
                raise TraceError(f"torch.export could not trace {type(model).__name__}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}. growir needs a model "
                                 f"that torch.export.export(..., strict=False) accepts; check that the "
                                 f"example inputs match forward()'s signature") from first
    finally:
        model.train(was_training)
    return Captured(ep.module(), args, kwargs, is_hf(model))
