"""Does a rebuilt candidate compute the grown function? The checks ``hf.py`` runs on each config candidate: the
rebuilt model against the rewritten graph at the example inputs, and at a sequence longer than every integer
field the candidate changed that shapes no parameter (a sliding window, a chunk size: ``check_length``), where
the source is the reference if the graph cannot run that long; and the generation settings each config derives
(``config_diff``, ``keep_generation_config``).
"""

from __future__ import annotations

import copy

import torch
import torch.utils._pytree as pytree

from ..verify.compare import TOLERANCE
from ..verify.measure import long_sizes, measurable, measure

MAX_CHECK_LEN = 512  # the longest sequence the config check runs (it runs on the full grown model)


def differs(model, candidate, grown, captured, fields=None) -> str | None:
    """Why the rebuilt ``grown`` is not the rewritten graph (None: it is): outputs at the example, outputs
    at a long sequence (past the integer ``fields``), or the generation settings its config derives. Without
    a rewritten graph (a growth planned on a two-block proxy) an exact growth is judged against the source."""
    outputs = len(candidate.record.plan.facts.outputs)
    if candidate.grown is None:
        if not candidate.record.exact or not measurable(grown):
            return "not exact, or not measurable, and no rewritten graph to compare with"
        return _differs_from_source(model, candidate, grown, captured, fields)
    deviation = measure(candidate.grown, grown, captured, [None] * outputs, quick=True)
    if deviation is not None and deviation > TOLERANCE:  # None: a meta-device model, shapes only
        return f"differs from the rewritten graph by {deviation:.2g}"
    # where exact, the source is the reference (the graph's literals are checked too); values rounded into a
    # low-precision dtype make the graph the only reference, as for any inexact growth
    exact = candidate.record.exact and not candidate.record.rounding
    ref, maps = (model, candidate.record.output_maps) if exact else (candidate.grown, [None] * outputs)
    length = check_length(model.config.to_dict(), captured, fields) if deviation is not None else 0
    deviation, length = _long_deviation(ref, grown, captured, maps, length)
    if deviation is not None and deviation > TOLERANCE:
        return f"differs from the {'source' if exact else 'rewritten graph'} by {deviation:.2g} at {length} tokens"
    gen = _generation_diff(model.config, grown.config)
    return f"derives other generation settings: {gen}" if gen else None


def _differs_from_source(model, candidate, grown, captured, fields) -> str | None:
    """The check of a growth planned on a proxy (no rewritten graph): the real source against the rebuilt model
    at the example inputs (their padded rows), and at one row of the check length where the candidate changed
    an integer field that shapes no parameter (``fields``: a window, a head count). It is also the growth's
    self-measure (``record.deviation``, ``record.measured``); values rounded into a low-precision dtype pass
    only within the tolerance (else the full graph is the reference)."""
    maps = candidate.record.output_maps
    deviation = measure(model, grown, captured, maps, quick=True)
    long, length = None, 0  # a longer row only past a changed field that may be a length (a window)
    if fields:
        long, length = _long_deviation(model, grown, captured, maps,
                                       check_length(model.config.to_dict(), captured, fields), batch=1)
    deviation = max(deviation, long or 0.0)
    if deviation > TOLERANCE:
        return f"differs from the source by {deviation:.2g} (at most {max(length, _example_length(captured))} tokens)"
    gen = _generation_diff(model.config, grown.config)
    if gen:
        return f"derives other generation settings: {gen}"
    leaves = [t for t in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(t, torch.Tensor)]
    batch = leaves[0].shape[0] if leaves and leaves[0].dim() else 1
    candidate.record.deviation = deviation
    candidate.record.measured = (f"the real source and grown models in float32 at the example inputs (batch {batch}, "
                                 f"{_example_length(captured)} tokens)" + (f" and at batch 1, {length} tokens"
                                                                           if long is not None else ""))
    return None


def _long_deviation(ref, grown, captured, maps: list, length: int, batch: int | None = None):
    """(deviation, length) at the longest sequence up to ``length`` the reference model accepts (a position
    table may stop it earlier than the export's range says), at ``batch`` rows where given; (None, 0) where
    no axis is dynamic."""
    example = _example_length(captured)
    while captured.dims and length > example:
        sizes = long_sizes(captured, length, batch)
        if not sizes:
            break
        try:
            return measure(ref, grown, captured, maps, sizes=sizes), length
        except Exception:  # noqa: BLE001 - too long for the reference itself: halve; else the grown model fails
            try:
                measure(ref, ref, captured, [None] * len(maps), sizes=sizes)
            except Exception:  # noqa: BLE001
                length //= 2
                continue
            raise
    return None, 0


def _example_length(captured) -> int:
    leaves = pytree.tree_leaves((captured.args, captured.kwargs)) if captured is not None else []
    return max((t.shape[1] for t in leaves if isinstance(t, torch.Tensor) and t.dim() >= 2), default=8)


def check_length(cfg: dict, captured, fields=None) -> int:
    """A sequence length beyond every small integer field of the config (a sliding window, a chunk size):
    twice the largest field below the model's position count, at least twice the example's sequence, at
    most the position count and MAX_CHECK_LEN. ``fields``: only these count (None: every field).

    >>> check_length({"sliding_window": 8, "hidden_size": 32, "eos_token_id": 400}, None)
    64
    >>> check_length({"sliding_window": 8, "hidden_size": 32, "eos_token_id": 400}, None, {"sliding_window"})
    16
    """
    from ..frontend.inputs import max_positions
    from .config import is_token_field
    limit = min(MAX_CHECK_LEN, max_positions(_Fields(cfg), MAX_CHECK_LEN))
    ints = [v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and not is_token_field(k)
            and 0 < v < limit and (fields is None or k in fields)]
    return min(limit, 2 * max(ints + [_example_length(captured)]))


def window_fields(model, cfg: dict, shapes: dict) -> set:
    """The integer fields the long check must exceed: those ``cfg`` changed that shape no parameter (reverting
    one rebuilds the same shapes), as a window or a head count would. A field both configs share means the
    same in the source and the grown model, and a size that shapes parameters is checked by the shapes."""
    from .load import config_shapes
    base = model.config.to_dict()
    changed = [k for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and base.get(k) != v
               and 0 < v < MAX_CHECK_LEN]  # check_length reads no other field: no model built for them
    return {k for k in changed if k in base and config_shapes(model, {**cfg, k: base[k]}) == shapes}


class _Fields:
    """A config dict read as attributes."""
    def __init__(self, cfg: dict):
        self.__dict__.update(cfg)


def config_diff(old, new) -> dict:
    """Every field whose value differs between two configs (added or removed fields included).

    >>> from transformers import BertConfig
    >>> config_diff(BertConfig(hidden_size=32), BertConfig(hidden_size=64))
    {'hidden_size': 64}
    """
    a, b = old.to_dict(), new.to_dict()
    skip = {"transformers_version", "_name_or_path"}
    return {k: b.get(k) for k in list(b) + [k for k in a if k not in b] if k not in skip and a.get(k) != b.get(k)}


def _generation_diff(old, new) -> dict:
    """The generation settings (token ids, lengths) the two configs derive, where they differ."""
    try:
        from transformers import GenerationConfig
        a = GenerationConfig.from_model_config(old).to_diff_dict()
        b = GenerationConfig.from_model_config(new).to_diff_dict()
    except (ImportError, AttributeError, TypeError, ValueError):  # a config that derives no generation settings
        return {}
    return {k: b.get(k) for k in set(a) | set(b) if k != "transformers_version" and a.get(k) != b.get(k)}


def keep_generation_config(model, grown) -> None:
    """The source's own generation settings (maybe loaded from its folder, not derived) carry over."""
    source = getattr(model, "generation_config", None)
    if source is not None and hasattr(grown, "generation_config"):
        grown.generation_config = copy.deepcopy(source)
