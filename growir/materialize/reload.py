"""A grown Hugging Face model that is the same model after ``save_pretrained`` / ``from_pretrained``.

At load a class rebuilds some tensors itself instead of reading them: those it drops on save
(``_keys_to_ignore_on_save``, e.g. a sinusoidal position table) are recomputed from the config, non-persistent
buffers (rotary ``inv_freq``) are computed by the constructor, and tied weights are tied again. A grown tensor
the class rebuilds differently is silently replaced. The check saves the grown model into a temporary folder,
loads it back and compares every tensor and the outputs.

Where the replaced tensors are ones the class drops on save, the grown model keeps them in its own save (its
instance's ``_keys_to_ignore_on_save`` no longer lists them), and the reload is exact. The class's own table
cannot be made exact instead: a sinusoidal table of width d has sin columns ``sin(p / 10000^(2k/d))``; at width
2d the class's table holds each of them (at column 2k) but also columns of frequencies no old column has, and a
post-norm block's LayerNorm statistics read every hidden column, so no map of the hidden axis hides them.
"""

from __future__ import annotations

import dataclasses
import tempfile

import torch

from ..frontend.folder import parameters_on_meta
from ..quiet import hf_quiet
from ..verify.compare import TOLERANCE
from ..verify.measure import measurable, measure

RELOAD_CHECK_MAX = 200_000_000  # elements: a larger model is not saved and loaded again (disk, a second copy)


@dataclasses.dataclass
class Reload:
    """What ``save_pretrained`` / ``from_pretrained`` does to a grown model.

    ``changed``: tensors the reloaded model holds other values in; ``deviation``: the outputs' deviation after
    reload (None: not measured; ``moved``: beyond TOLERANCE); ``kept``: tensors the class drops on save that the
    grown model saves anyway.

    >>> print(Reload(0.0, [], ["model.encoder.embed_positions.weight"]).note()[:72])
    save_pretrained keeps 1 tensor the class drops on save and recomputes at
    >>> Reload(0.3, ["lm_head.weight"], []).moved, Reload(1e-7, ["inv_freq"], []).moved
    (True, False)
    """
    deviation: float | None
    changed: list
    kept: list

    @property
    def moved(self) -> bool:
        """Whether the reloaded model computes something else (beyond TOLERANCE: a buffer rounded to the
        model's dtype, say, may differ by less)."""
        return bool(self.changed) and (self.deviation or 0.0) > TOLERANCE

    def note(self) -> str:
        """One sentence for ``record.notes`` ('' where there is nothing to say)."""
        if self.moved:
            return (f"after save_pretrained / from_pretrained the grown model's outputs move by "
                    f"{self.deviation:.3g}: the class rebuilds {len(self.changed)} tensor(s) at load from its config "
                    f"({', '.join(self.changed[:4])}) with other values than the grown ones")
        if self.kept:
            why = ("the grown values differ from what the class computes at the grown size" if self.deviation is not
                   None else "the model was not saved and loaded again to compare (meta device, or too large)")
            return (f"save_pretrained keeps {len(self.kept)} tensor{'s' * (len(self.kept) > 1)} the class drops on "
                    f"save and recomputes at load ({', '.join(self.kept[:4])}): {why}")
        return ""


def dropped_on_save(model) -> list:
    """Names of ``model``'s state the class leaves out of ``save_pretrained`` (rebuilt at load).

    >>> dropped_on_save(torch.nn.Linear(2, 2))
    []
    """
    names = set(model.state_dict())
    return sorted(k for k in (getattr(model, "_keys_to_ignore_on_save", None) or ()) if k in names)


def keep_on_save(model, names) -> None:
    """Make ``model.save_pretrained`` write ``names`` although its class drops them (this instance only)."""
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) - set(names)


def reload_check(grown, captured, outputs: int) -> Reload:
    """Save ``grown`` and load it back; where the class replaced tensors it drops on save, save them and check
    again. ``outputs``: how many flat outputs the model has. A model on the meta device, or above
    RELOAD_CHECK_MAX elements, is not reloaded: every tensor its class drops on save is kept."""
    if not measurable(grown) or sum(t.numel() for t in grown.state_dict().values()) > RELOAD_CHECK_MAX:
        kept = dropped_on_save(grown)
        keep_on_save(grown, kept)
        return Reload(None, [], kept)
    rounded = recomputed_rounded(grown)
    if rounded is not None:
        return Reload(None if rounded else 0.0, rounded, [])
    changed, deviation = reloaded_difference(grown, captured, outputs)
    kept = [k for k in dropped_on_save(grown) if k in changed]
    if kept:
        keep_on_save(grown, kept)
        changed, deviation = reloaded_difference(grown, captured, outputs)
    return Reload(deviation, changed, kept)


def recomputed_rounded(grown) -> list | None:
    """What ``from_pretrained`` computes instead of reading, decided without a save: the class drops nothing on
    save, and every non-persistent buffer it computes at construction (its parameters on the meta device, so no
    weights are made) equals the grown one, or is the grown one before rounding to the model's dtype. Returns
    the names of those held rounded ([]: the reload is exact, as the saved state is read back bit for bit), or
    None where a save and load must decide.

    A model cast with ``.to(bfloat16)`` holds its rotary ``inv_freq`` rounded, while the class computes it in
    float32 at load: for the source as for the grown model, whose buffers follow the source's dtype. Not a
    change the growth makes, so it is listed (``Reload.changed``), not measured.

    >>> m = torch.nn.Linear(2, 2); m.config = None
    >>> recomputed_rounded(m) is None  # not a Hugging Face class: it cannot be rebuilt from its config
    True
    """
    if dropped_on_save(grown) or getattr(grown, "config", None) is None:
        return None
    persistent = set(grown.state_dict())
    ours = {k: v for k, v in grown.named_buffers() if k not in persistent}
    if not ours:
        return []
    try:
        with parameters_on_meta(), hf_quiet():
            fresh = dict(type(grown)(grown.config).named_buffers())
    except Exception:  # noqa: BLE001 - a class that does not build this way: the save and load decide
        return None
    if any(k not in fresh or fresh[k].is_meta for k in ours):
        return None
    rounded = [k for k, v in ours.items() if not _same(v, fresh[k])]
    return rounded if all(_rounded(ours[k], fresh[k]) for k in rounded) else None


def reloaded_difference(grown, captured, outputs: int) -> tuple[list, float]:
    """(names whose reloaded values differ, the outputs' deviation after reload) of one save and load."""
    configs = [c for c in (grown.config, getattr(grown, "generation_config", None)) if c is not None]
    kept = [dict(vars(c)) for c in configs]  # save_pretrained writes into them (architectures, dtype)
    try:
        with tempfile.TemporaryDirectory() as folder, hf_quiet():
            grown.save_pretrained(folder)
            back = type(grown).from_pretrained(folder)
    finally:
        for c, fields in zip(configs, kept):
            vars(c).clear()
            vars(c).update(fields)
    device = next(iter(grown.state_dict().values())).device
    back = back.to(device).train(grown.training)
    before = dict(grown.state_dict())
    before.update(dict(grown.named_buffers()))  # non-persistent buffers too
    after = dict(back.state_dict())
    after.update(dict(back.named_buffers()))
    changed = sorted(k for k, v in before.items() if k not in after or not _same(v, after[k]))
    if not changed:
        return [], 0.0
    return changed, measure(grown, back, captured, [None] * outputs, quick=True)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.detach().to(b.dtype), b.detach())


def _rounded(held: torch.Tensor, computed: torch.Tensor) -> bool:
    """Whether ``held`` is ``computed`` rounded to a narrower floating dtype (bfloat16 from float32)."""
    return (held.is_floating_point() and computed.is_floating_point()
            and torch.finfo(held.dtype).eps > torch.finfo(computed.dtype).eps and _same(computed, held))
