"""Repeat-and-fill without touching eps: rescale the residual stream instead.

Repeat-and-fill (``fill.py``) shrinks the statistics a norm sees: over ``x' = [x × n, fill]`` the variance
(LayerNorm) or mean of squares (RMSNorm) is ``ρ = n·d/d'`` times the old one. Rewriting eps to ``ρ·eps``
restores the norm exactly, but a rebuilt config often cannot hold that eps (one field shared with norms of
other groups, or no field at all). Multiplying the whole residual stream by ``c = 1/sqrt(ρ)`` restores the
statistics instead, with the old eps:

    LN(c·x') = c·(x' - m) / sqrt(var(x) + eps)        RMS(c·x') = c·x' / sqrt(ms(x) + eps)

and the norm weight ``× sqrt(ρ) = 1/c`` (which ``fill.py`` already applies) takes the c back out. So every
*term* of the residual (the parameters whose output is added into it: embeddings, output projections,
their biases) is multiplied by c, and every parameter that contracts the residual directly (not through a
norm) is divided by c. This needs the residual to be read only by its norms and by such contractions: when
the model returns the residual itself, its output would be c times larger, and growir rewrites eps instead.
"""

from __future__ import annotations

import math

from ..analysis.residual import group_rows, terms_and_readers
from ..analysis.plan import Plan
from .fill import FillPlan, kept_fraction


def rescale_residuals(plan: Plan, fp: FillPlan, maps: dict, rules: dict) -> set:
    """Rescale every filled group whose residual allows it; return the roots rescaled (the rest keep eps
    rewrites)."""
    done = set()
    for root, sites in fp.sites.items():
        found = terms_and_readers(plan.captured.gm, plan.facts, plan.group_of(root), sites)
        if found is None:
            continue
        terms, readers = found
        c = stream_scale(maps[root])
        for p, factor in [(t, c) for t in terms] + [(r, 1 / c) for r in readers]:
            rows = group_rows(plan.facts, plan.group_of(root), p)  # a fused projection: the group's rows only
            if rows is None:
                rules[p].scale *= factor
            else:
                rules[p].axes[rows[0]].scale_rows(rows[1], factor, rows[2])
            rules[p].notes.append(f"x{factor:.4g}: the residual stream is rescaled so that its norms keep eps")
        done.add(root)
    return done


def stream_scale(m) -> float:
    """c = 1/sqrt(ρ): the factor a rescaled residual stream carries (grown stream = c × the repeated source's)."""
    return 1 / math.sqrt(kept_fraction(m))


def can_rescale(plan: Plan, root, sites) -> bool:
    """Whether the filled group ``root`` can keep its norms' eps by a rescaled residual stream."""
    return terms_and_readers(plan.captured.gm, plan.facts, plan.group_of(root), sites) is not None
