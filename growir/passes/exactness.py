"""When is a width growth exact? The theorem, checked op by op (see docs/preservation.md).

Copying is exact through producers, consumers and elementwise ops. What can break it is an op that reads a
grown group as a whole: a mean (exact only when every index has the same copy count), a sum, a softmax or a
contraction between two activations (never exact by copying alone), and a parameter that is both copied and
contracted (tied embeddings: the logits scale by the copy count unless a norm before the head is rescaled).
"""

from __future__ import annotations

import torch

from ..analysis.norms import reaches_output, scaling_params
from ..analysis.plan import Plan
from .width import WidthResult

HARMLESS = {"max", "select", "batch", "value"}


def deviations(plan: Plan, maps: dict, compensated: set = frozenset()) -> list[str]:
    """Reasons the growth is not exact (empty: exact by the rules above), one per group and kind of read."""
    reasons = []
    for g in plan.groups:
        m = maps.get(g.root)
        if m is None:
            continue
        by_kind = {}
        for r in g.reads:
            if r.kind in HARMLESS or (g.root, r.kind) in compensated or (r.kind == "norm" and m.uniform):
                continue
            by_kind.setdefault(r.kind, []).append(r.where)
        for kind, places in sorted(by_kind.items()):
            where = places[0] + (f" and {len(places) - 1} more" if len(places) > 1 else "")
            if kind == "norm":
                lo, hi = int(m.counts.min()), int(m.counts.max())
                reasons.append(f"{len(places)} norm(s) average over {g.label} ({g.size} -> {m.new}), whose copies "
                               f"are uneven ({lo} to {hi} per unit), so their statistics change (e.g. {where})")
            else:
                reasons.append(f"the {kind} over {g.label} at {where} is not preserved by copying")
    return reasons


def compensate_tied(plan: Plan, maps: dict, width: WidthResult) -> list[str]:
    """Rescale the norm before a tied head by 1/n (uniform n copies); return reasons where impossible."""
    f, reasons, divided = plan.facts, [], {}  # divided: norm parameter -> its factor (one tensor, divided once)
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    for state, axis in width.tied:
        counts = _counts_on(width, state, axis)
        if counts is not None and bool((counts == 1).all()) and width.rules[state].scale == 1.0:
            continue  # one copy of each unit (the rest filled or fresh units): the logits are the old ones
        sites = [nodes[n] for p, a, n in f.consumed if p == state]
        for site in sites:
            scaled = scaling_params(site.args[0], f)
            if counts is None or not bool((counts == counts[0]).all()):
                reasons.append(f"`{state}` is tied (an embedding and the head at {site.name}) and its group "
                               f"is copied unevenly: the head's logits change")
            elif not scaled:
                reasons.append(f"`{state}` is tied (an embedding and the head at {site.name}) and no norm "
                               f"feeds the head, so the n-fold logits cannot be rescaled")
            else:
                if reaches_output(site.args[0]):
                    reasons.append(f"the norm before the tied head `{state}` (at {site.name}) is rescaled to keep "
                                   f"the logits, and its output is also a model output (hidden states), which "
                                   f"is therefore rescaled too")
                factor = float(counts[0]) * width.rules[state].scale  # the copies, and a rescaled residual
                for p in scaled:
                    if p in divided:  # one norm before the head at two places (two streams): divided once
                        if divided[p] != factor:
                            reasons.append(f"`{p}` feeds tied heads that need different factors "
                                           f"({divided[p]:.4g} and {factor:.4g}): one tensor cannot take both")
                        continue
                    divided[p] = factor
                    width.rules[p].scale /= factor
                    width.rules[p].notes.append(f"divided by {factor:.4g}: it feeds the tied head "
                                                f"`{state}`")
    return reasons


def _counts_on(width: WidthResult, state: str, axis: int):
    rule = width.rules[state]
    m = rule.axes[axis]
    if m.index is None:
        return None
    return torch.bincount(m.index[m.index >= 0])
