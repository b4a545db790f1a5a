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
Kinds that never repeat (first-k-dense ``[d, m, m]``) have no period to keep: each maximal run of one kind grows
(``Blocks.layout`` ``"runs"``: ``[d, d', m, m', m, m']``), or every run but the first (``"first"``:
``[d, m, m', m, m', m]``), each added block after its source as in ``identity``; the config rebuild picks the layout
its fields can state (``Blocks.layouts``, ``depth_layouts``). A stage's list whose first block changes the
stream's shape (its downsample, ``Blocks.shaping``) grows only by ``"first"``: no copy of that block could follow
it, so it stays first and alone, and the stage's other blocks grow (``[down, b, c]`` x2 is
``[down, b, b', b'', c, c']``).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

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
    runs: list = field(default_factory=list)  # by runs: (first old block, old length, new length) per run
    layout: str = "period"

    def describe(self) -> str:
        """The method, and by runs which runs grew (the record's ``layers``).

        >>> Schedule(None, [0, 1, 1, 2, 2], [False] * 5, "identity", [(0, 1, 1), (1, 2, 4)], "first").describe()
        'identity; the first run kept, the others grown: blocks 0 (1 -> 1), 1-2 (2 -> 4)'
        """
        if self.layout == "period":
            return self.method
        what = "each run of one kind grown" if self.layout == "runs" else "the first run kept, the others grown"
        runs = ", ".join(f"{s}{f'-{s + n - 1}' if n > 1 else ''} ({n} -> {m})" for s, n, m in self.runs)
        return f"{self.method}; {what}: blocks {runs}"

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
        whole = ", ".join(f"{k / count:g}" for k in range(count + 1, count + 4))
        raise SpecError(f"depth={depth} gives {n:g} blocks from {count}; use layers=N or a depth that "
                        f"gives a whole number (e.g. {whole})")
    return int(round(n))


def schedule(blocks: Blocks, new: int, method: str) -> Schedule:
    """Where each of ``new`` blocks comes from: ``"stack"`` repeats the list (then its last blocks),
    ``"interpolate"`` and ``"identity"`` put each copy after its source; ``"auto"`` picks identity for
    pre-norm blocks, stack otherwise (see ``Schedule``'s example). Mixed blocks move by whole periods, or
    by runs of one kind where ``blocks.layout`` says so:

    >>> from types import SimpleNamespace
    >>> schedule(SimpleNamespace(count=4, pre_norm=True, period=2, prefix="layers"), 8, "auto").sources
    [0, 1, 0, 1, 2, 3, 2, 3]
    >>> schedule(SimpleNamespace(count=3, pre_norm=True, period=3, prefix="layers", layout="runs",
    ...                          kinds=[0, 1, 1], runs=[(0, 1), (1, 2)]), 6, "auto").sources
    [0, 0, 1, 1, 2, 2]
    """
    if method == "auto":
        method = "identity" if blocks.pre_norm else "stack"
    if method not in DEPTH_METHODS:
        raise SpecError(f"unknown depth_method {method!r}: choose one of {', '.join(DEPTH_METHODS)}")
    layout = getattr(blocks, "layout", "period")
    if layout != "period" and len(getattr(blocks, "kinds", [])) == blocks.count:
        return _by_runs(blocks, new, method, layout)
    p = getattr(blocks, "period", 1)
    if blocks.count % p:  # kinds read on a two-block proxy (alike blocks reading other masks): alike parameters
        p = 1             # make any order exact, and the full list's own pattern is not known there
    if new % p:
        raise SpecError(f"`{blocks.prefix}` repeats a pattern of {p} kinds of blocks, so depth growth adds whole "
                        f"periods: {new} blocks is not a multiple of {p}; ask for "
                        f"{', '.join(str(k * p) for k in range(blocks.count // p + 1, blocks.count // p + 4))}")
    periods, fresh = _order(blocks.count // p, new // p, method)
    sources = [i * p + j for i in periods for j in range(p)]
    return Schedule(blocks, sources, [f for f in fresh for _ in range(p)], method)


def _order(old: int, new: int, method: str) -> tuple[list, list]:
    """(source per new position, whether it is added) for a plain list of ``old`` units grown to ``new``.

    >>> _order(2, 5, "stack"), _order(2, 5, "identity")
    (([0, 1, 0, 1, 1], [False, False, True, True, True]), ([0, 0, 0, 1, 1], [False, True, True, False, True]))
    """
    if method == "stack":
        order = list(range(old)) * (new // old)
        order += list(range(old - (new - len(order)), old))
        return order, [i >= old for i in range(new)]
    per = [new // old + (1 if i < new % old else 0) for i in range(old)]
    return [i for i in range(old) for _ in range(per[i])], [k > 0 for i in range(old) for k in range(per[i])]


def _by_runs(blocks: Blocks, new: int, method: str, layout: str) -> Schedule:
    """Each run of one kind grown on its own (``"first"``: all but the first run), so the runs stay in order;
    the added blocks are spread over the growing blocks as evenly as whole numbers allow."""
    runs = blocks.runs
    keep = runs[0][1] if layout == "first" else 0
    grow, extra = blocks.count - keep, new - keep
    per = [1] * keep + [extra // grow + (1 if i < extra % grow else 0) for i in range(grow)]
    sources, fresh, grown = [], [], []
    for start, length in runs:
        order, added = _order(length, sum(per[start:start + length]), method)
        sources += [start + i for i in order]
        fresh += added
        grown.append((start, length, len(order)))
    return Schedule(blocks, sources, fresh, method, grown, layout)


def depth_layouts(depth_plan: list) -> list:
    """Every depth plan (``[(Blocks, new count)]``) the block lists' layouts allow, the given one first: what a
    config rebuild tries where the first plan's pattern is one its config cannot state."""
    options = [[b] + [dataclasses.replace(b, layout=x) for x in b.layouts if x != b.layout] for b, _ in depth_plan]
    return [list(zip(bs, (n for _, n in depth_plan))) for bs in itertools.product(*options)]


def count_pairs(depth_plan: list, method: str) -> list:
    """(old, new) block counts of a depth plan: each list's, and by runs each run's (a config field that counts
    the blocks of one kind, such as the dense layers before the MoE ones, grows with its run)."""
    out = []
    for b, new in depth_plan:
        out.append((b.count, new))
        out += [(n, m) for _, n, m in schedule(b, new, method).runs if n != m]
    return out


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


def replace_blocks(sched: Schedule, rules: dict) -> None:
    """``rules`` (in place) with the old block list's tensors replaced by the grown list's: by runs, a new block
    at an old position may be of another kind (``[d, d', m]``: position 1 is dense now), and the old block's
    tensors there must not stay."""
    b, grown = sched.blocks, depth_rules(sched, rules)
    for name in {b.name(i, suffix) for i in range(b.count) for suffix in b.suffixes_of(i)} - set(grown):
        rules.pop(name, None)
    rules.update(grown)
