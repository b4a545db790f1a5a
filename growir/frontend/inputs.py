"""Example inputs: the caller's, or inputs built from a Hugging Face model's config (shared by the
frontend, the checker and the exporter)."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import TraceError

# (args, kwargs) of one forward call
Inputs = tuple[tuple, dict]

# The traced example: batch and sequence both above 1, so torch.export keeps them symbolic instead of
# specialising them (it specialises sizes 0 and 1).
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8


def is_hf_model(model: torch.nn.Module) -> bool:
    """A Hugging Face model, for growir's purposes: a module with a ``.config``."""
    return getattr(model, "config", None) is not None


def hf_example_inputs(model: torch.nn.Module, batch: int = EXAMPLE_BATCH, seq: int = EXAMPLE_SEQ, *,
                      seed: int = 0) -> dict[str, Any]:
    """Keyword inputs for a Hugging Face model, built from its config and seeded.

    Text models get random ``input_ids`` below ``vocab_size`` and an ``attention_mask`` in which every row
    but the first ends in padding (zeros); vision models get ``pixel_values`` of shape
    (batch, num_channels, image_size, image_size); encoder-decoders also get ``decoder_input_ids``; models
    whose forward takes ``use_cache`` get ``use_cache=False`` (a cache is not a traceable output). The
    tensors are drawn on the CPU (the same values everywhere) and put on the model's device.

    >>> from transformers import BertConfig, BertModel
    >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                          intermediate_size=64, vocab_size=100))
    >>> x = hf_example_inputs(m, 3, 6)
    >>> tuple(x["input_ids"].shape), x["attention_mask"].tolist()[2]
    ((3, 6), [1, 1, 0, 0, 0, 0])
    """
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(seed)
    if main == "pixel_values":
        inputs = {"pixel_values": _pixel_values(config, batch, gen, _float_dtype(model))}
    elif main == "input_ids":
        seq = min(seq, max_positions(config, seq))
        inputs = {"input_ids": _token_ids(config, batch, seq, gen), "attention_mask": _padded_mask(batch, seq)}
    else:
        raise TraceError(f"{type(model).__name__}.main_input_name is {main!r}: growir builds example inputs only "
                         "for 'input_ids' and 'pixel_values' models; pass example_inputs=(...) or {...} yourself")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = _token_ids(config, batch, max(2, seq // 2), gen)
    if "use_cache" in _forward_parameters(model):
        inputs["use_cache"] = False
    device = model_device(model)
    if device.type != "meta":  # a meta model is traced with CPU inputs (tracing fakes them anyway)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return inputs


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s first parameter lives (the CPU for a model without parameters).

    >>> model_device(torch.nn.Linear(2, 2).to("meta"))
    device(type='meta')
    """
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _vocab_size(config) -> int:
    vocab = getattr(config, "vocab_size", None)
    if vocab is None and hasattr(config, "get_text_config"):
        vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is None:
        raise TraceError(f"{type(config).__name__} has no vocab_size to draw input_ids from; "
                         "pass example_inputs yourself")
    return int(vocab)


def max_positions(config, default: int) -> int:
    """The longest sequence the config allows (its position table), else ``default``.

    >>> from types import SimpleNamespace
    >>> max_positions(SimpleNamespace(n_positions=1024), 512), max_positions(SimpleNamespace(), 512)
    (1024, 512)
    """
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _token_ids(config, batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, _vocab_size(config), (batch, seq), generator=gen)


def _padded_mask(batch: int, seq: int) -> torch.Tensor:
    """Row 0 is all ones; row i keeps a shrinking prefix of tokens (at least one) followed by padding."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        mask[row, max(1, seq - row * max(1, seq // batch)):] = 0
    return mask


def _pixel_values(config, batch: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    channels = getattr(config, "num_channels", 3)
    return torch.randn(batch, channels, height, width, generator=gen).to(dtype)


def _float_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # builtins and some wrapped forwards have no signature
        return set()


def normalize_inputs(example_inputs) -> Inputs:
    """``(args, kwargs)`` from a tuple of positional arguments, a dict of keyword arguments, or one tensor."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
                     f"not {type(example_inputs).__name__}")


def example_inputs_for(model: torch.nn.Module, example_inputs=None) -> Inputs:
    """The traced example: the caller's inputs, or inputs built from a Hugging Face config."""
    if example_inputs is not None:
        return normalize_inputs(example_inputs)
    if is_hf_model(model):
        return (), hf_example_inputs(model)
    raise TraceError(f"{type(model).__name__} is not a Hugging Face model (it has no .config), so growir cannot "
                     "build inputs for it: pass example_inputs=(tensor, ...) or {'name': tensor, ...}")
