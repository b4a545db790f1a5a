"""Depth growth: which old block each new block copies, and which new blocks start as identities.

- ``stack`` (StackBERT, bert2BERT): blocks 1..L, then 1..L again; a remainder comes from the top.
- ``interpolate``: each block followed by its copies (MSLT-style, LiGO's "interlace").
- ``identity``: the ``interpolate`` order, but each added block has its residual writers (the parameters
  that write the residual stream: attention output and FFN down projections) zeroed, so it adds nothing.
  Exact for pre-norm blocks: x + 0 = x. Post-norm blocks apply a norm to the residual: never exact.
Neither ``stack`` nor ``interpolate`` preserves the function.

Blocks that differ by design (``Blocks.period`` > 1: SSM and attention layers, sliding and full attention) are
copied by whole periods, so the kinds keep their pattern: ``[ssm, attn]`` x2 is ``[ssm, attn, ssm', attn']``, and
a config that states the pattern by a period (or a per-layer list, reordered by the sources) still describes it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..analysis.blocks import Blocks
from ..errors import AnalysisError, SpecError

DEPTH_METHODS = ("auto", "stack", "interpolate", "identity")


@dataclass
class Schedule:
    """The grown block list of one depth growth: the source block of each new position, and which positions
    are added blocks.

    >>> from types import SimpleNamespace
    >>> s = schedule(SimpleNamespace(count=2, pre_norm=True), 4, "auto")
    >>> s.sources, s.fresh, s.exact
    ([0, 0, 1, 1], [False, True, False, True], True)
    """
    blocks: Blocks
    sources: list  # per new position: the old block index it copies
    fresh: list  # per new position: True where the block is added (not one of the originals in place)
    method: str

    @property
    def exact(self) -> bool:
        """Whether the depth growth preserves the function: identity blocks added to a pre-norm model."""
        return self.method == "identity" and self.blocks.pre_norm


def target_layers(count: int, depth, layers) -> int:
    """The grown block count: ``layers`` where given, else ``count * depth``; a SpecError where that is fewer
    than ``count`` or not whole.

    >>> target_layers(4, 1.5, None), target_layers(4, 1, 6)
    (6, 6)
    """
    if layers is not None:
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < count:
            raise SpecError(f"layers={layers!r} must be a whole number >= the model's {count} blocks")
        return layers
    try:
        d = float(depth)
    except (TypeError, ValueError):
        raise SpecError(f"depth must be a number >= 1, got {depth!r}") from None
    if d < 1:
        raise SpecError(f"depth={depth} would remove blocks: growir only grows (depth >= 1)")
    n = count * d
    if abs(n - round(n)) > 1e-9:
        raise SpecError(f"depth={depth} gives {n:g} blocks from {count}; use layers=N or a depth that "
                        f"gives a whole number (e.g. {', '.join(f'{k / count:g}' for k in range(count + 1, count + 4))})")
    return int(round(n))


def schedule(blocks: Blocks, new: int, method: str) -> Schedule:
    """Where each of ``new`` blocks comes from: ``"stack"`` repeats the list (then its last blocks),
    ``"interpolate"`` and ``"identity"`` put each copy after its source; ``"auto"`` picks identity for
    pre-norm blocks, stack otherwise (see ``Schedule``'s example). Mixed blocks move by whole periods:

    >>> from types import SimpleNamespace
    >>> schedule(SimpleNamespace(count=4, pre_norm=True, period=2, prefix="layers"), 8, "auto").sources
    [0, 1, 0, 1, 2, 3, 2, 3]
    """
    p = getattr(blocks, "period", 1)
    if blocks.count % p:  # kinds read on a two-block proxy (alike blocks reading other masks): alike parameters
        p = 1             # make any order exact, and the full list's own pattern is not known there
    if new % p:
        raise SpecError(f"`{blocks.prefix}` repeats a pattern of {p} kinds of blocks, so depth growth adds whole "
                        f"periods: {new} blocks is not a multiple of {p}; ask for "
                        f"{', '.join(str(k * p) for k in range(blocks.count // p + 1, blocks.count // p + 4))}")
    old, new = blocks.count // p, new // p  # in periods
    if method == "auto":
        method = "identity" if blocks.pre_norm else "stack"
    if method == "stack":
        periods = list(range(old)) * (new // old)
        rem = new - len(periods)
        periods += list(range(old - rem, old))
        fresh = [i >= old for i in range(new)]
    elif method in ("interpolate", "identity"):
        per = [new // old + (1 if i < new % old else 0) for i in range(old)]
        periods = [i for i in range(old) for _ in range(per[i])]
        fresh = [k > 0 for i in range(old) for k in range(per[i])]
    else:
        raise SpecError(f"unknown depth_method {method!r}: choose one of {', '.join(DEPTH_METHODS)}")
    sources = [i * p + j for i in periods for j in range(p)]
    return Schedule(blocks, sources, [f for f in fresh for _ in range(p)], method)


def depth_rules(sched: Schedule, width_rules: dict) -> dict:
    """Rules for every parameter of the new block list, renamed from the block it copies."""
    b, out = sched.blocks, {}
    if not b.homogeneous:
        raise AnalysisError(f"cannot grow the depth of `{b.prefix}`: {b.why_not}")
    for pos, (src, fresh) in enumerate(zip(sched.sources, sched.fresh)):
        for suffix in b.suffixes_of(src):
            old_name, new_name = b.name(src, suffix), b.name(pos, suffix)
            base = width_rules[old_name]
            zero = fresh and sched.method == "identity" and suffix in b.writers_of(src)
            out[new_name] = dataclasses.replace(base, zero=zero, notes=list(base.notes))
    return out
