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

import torch.fx as fx

from ..analysis.ops import ASSERTS, CONTRACTIONS, LINEAR, PART, SCALES
from ..plan import Plan
from .fill import FillPlan, group_reads, kept_fraction


def rescale_residuals(plan: Plan, fp: FillPlan, maps: dict, rules: dict) -> set:
    """Rescale every filled group whose residual allows it; return the roots rescaled (the rest keep eps
    rewrites)."""
    done = set()
    for root, sites in fp.sites.items():
        found = _terms_and_readers(plan, root, sites)
        if found is None:
            continue
        terms, readers = found
        c = stream_scale(maps[root])
        for p, factor in [(t, c) for t in terms] + [(r, 1 / c) for r in readers]:
            rules[p].scale *= factor
            rules[p].notes.append(f"x{factor:.4g}: the residual stream is rescaled so that its norms keep eps")
        done.add(root)
    return done


def stream_scale(m) -> float:
    """c = 1/sqrt(ρ): the factor a rescaled residual stream carries (grown stream = c × the repeated source's)."""
    return 1 / math.sqrt(kept_fraction(m))


def _terms_and_readers(plan: Plan, root, sites) -> tuple[set, set] | None:
    """(parameters that write a term of the residual, parameters that contract it directly), or None when
    the residual reaches something else (the model's output, a nonlinear op) or a term is not linear in
    one parameter."""
    f, g = plan.facts, plan.group_of(root)
    gm = plan.captured.gm
    state_of = {**f.params, **f.buffers}
    norm_params = {p for s in sites for p in (s.weight, s.bias) if p is not None}
    writers = {pa.param for pa in g.producers + g.consumers} - norm_params  # consumers: a tied embedding
    norm_ends = {}  # a norm's input -> the norm's own ops that read it
    for s in sites:
        norm_ends.setdefault(s.input, set()).update(s.internals)
    on_group = {(pa.param, pa.axis) for pa in g.consumers}
    contracting = {(p, node) for p, i, node in f.consumed if (p, i) in on_group}
    residual, terms = set(), set()
    for n in gm.graph.nodes:
        if n.op != "get_attr" or state_of.get(n.name) not in writers:
            continue
        for use in n.users:
            if (state_of[n.name], use.name) in contracting:
                continue  # a tied tensor's other use (the head): a reader, compensated with the tie
            reached = _forward(use, f, norm_ends, residual)
            if reached is None:
                return None
            if reached:
                terms.add(state_of[n.name])
    readers = set()
    for p, _, source in group_reads(plan, root):
        if source in residual:
            readers.add(p)
        elif not any(source is s.output for s in sites):
            return None
    if readers & terms:
        return None  # a tied tensor that also reads the residual directly: one scale cannot do both
    return terms, readers


def _by_constant(n: fx.Node, stack_from: set) -> bool:
    """A multiply or divide whose other operands are numbers or tensors the walk did not come through."""
    nodes = [a for a in n.args if isinstance(a, fx.Node)]
    return sum(a in stack_from for a in nodes) == 1 and all(a in stack_from or a.op == "get_attr" for a in nodes)


def _forward(use: fx.Node, facts, norm_ends: set, residual: set) -> bool | None:
    """Follow ``use`` through linear ops to the norms' inputs. True: it is a term of the residual (the nodes
    on the way are recorded in ``residual``); False: a parameter multiplies it later (another term's factor);
    None: it reaches an output or an op that is neither a norm nor a contraction."""
    stack, seen, on_path = [use], set(), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not use and SCALES(n):
            if any(isinstance(a, fx.Node) and a.name in facts.params for a in n.args):
                return False  # a parameter multiplies this term (a layer scale): that parameter is the term
            if not _by_constant(n, stack_from=seen):
                return None  # a product of two activations is not linear in the residual
        if n is use or PART(n) or LINEAR(n) or SCALES(n):
            on_path.add(n)
            for u in [u for u in n.users if not ASSERTS(u)]:
                if u.op == "output":
                    return None
                if u in norm_ends.get(n, ()):
                    continue
                if CONTRACTIONS(u) and any(isinstance(a, fx.Node) and a.name in facts.params
                                           for a in u.args if a is not n):
                    continue  # a direct reader: checked on the consumer side
                stack.append(u)
        else:
            return None  # a nonlinear op, even one that feeds a norm: its output is not linear in the term
    residual |= on_path
    return True

