"""Exact growth of a normalized group by any ratio: repeat and fill (LEMON, ICLR 2024).

For a group of size d grown to d' = n·d + r (r > 0), the residual stream becomes
``x' = [x, ..., x (n times), m·1 (r times)]`` with m = mean(x) for LayerNorm, 0 for RMSNorm. Then

    mean(x') = m,   var(x') = (n·d/d')·var(x)    (mean of squares likewise, for RMSNorm)

so a norm with eps' = (n·d/d')·eps and weight' = weight·sqrt(n·d/d') on the copies (0 on the fill) outputs
exactly [LN(x) n times, 0]. Producers of the group write the same map (fill rows = the mean of the old
rows, or 0); consumers split by n and read zeros at the fill positions. This requires every LayerNorm over the
group to be pre-norm (its output only feeds contractions or the model output): when a LayerNorm's output is the
residual itself (post-norm), no elementwise-weighted norm can be exact (docs/methods.md). An RMSNorm's fill is
zero, and zero in gives zero out wherever the norm stands (post-norm, a branch's output norm, after a GELU or an
attention, over a product of axes of which only this group grows): it needs no such condition. There
``width_method="fill"`` fills anyway where the model does not return the stream (``plan_fill(post_norm=True)``):
the fill then differs from the stream's mean by the norm output's mean, ``mean((γ - mean γ) ⊙ x̂) + mean(β)``
(small where γ is near uniform), which the record reports with the measured deviation. ``auto`` (the default) fills it
too where each such norm normalizes a residual sum (not a sandwich norm), but does not compensate the norms
(``keep_norms``: eps kept, weights x sqrt(d'/d) instead of x sqrt(d/d')): the norms see the fill's lower variance,
which alone grows the stream's old units by sqrt(d'/d) (DirectCopy's stream), and the raised weights grow them by
sqrt(d'/d) again, to d'/d; measured on the post-norm encoder, the norms kept trained far better than copies, level
with DirectCopy, and raised better still at x1.5 and x2 (docs/savings.md). Otherwise, and with ``strict=True``,
or where the model returns the stream, the group is copied (exact at a whole ratio, balanced copies and a reported
deviation else).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.groups import contractions_over
from ..analysis.nodes import back, chain, op_name
from ..analysis.norms import NormSite, is_param, norm_sites
from ..analysis.ops import ADDS, AVERAGES, CONTRACTIONS, LAYOUT, LINEAR_IN_DATA, MAXIMA, PART, SCALES, forward
from ..analysis.ops import indexes_leading, traits
from ..analysis.plan import Plan
from ..ir.axes import PROD, tree_leaves
from .bare_norms import bare_norm_readers, fold_scale
from .layer_scale import cancelled_scales, scaled_writers, weigh_fill_rows


@dataclass
class FillPlan:
    """Which grown groups repeat and fill (and with what), the norm sites that decide it, and why the others
    do not."""
    fills: dict = field(default_factory=dict)  # group root -> "mean" | "zero"
    sites: dict = field(default_factory=dict)  # group root -> [NormSite]
    reasons: dict = field(default_factory=dict)  # group root -> why repeat-and-fill does not apply
    copied: dict = field(default_factory=dict)  # whole-ratio group root -> why it is copied instead (exact)
    kept_norms: set = field(default_factory=set)  # post-norm roots filled with eps kept, the weights x sqrt(d'/d)
    folds: dict = field(default_factory=dict)  # root -> parameters reading its weightless norms (bare_norms.py)
    weighted: dict = field(default_factory=dict)  # root -> {(writer, axis): layer scale} (layer_scale.py)


def plan_fill(plan: Plan, sizes: dict, every: bool = False, post_norm: bool = False,
              keep_norms: bool = False) -> FillPlan:
    """Which grown groups repeat and fill: a normalized group whose new size is not a whole multiple, or with
    ``every`` each grown normalized group (the fresh width method fills whole ratios too). With ``post_norm``
    a group that a post-norm LayerNorm/RMSNorm writes is filled too, though no fill (and at a ratio that is
    not whole, no growth) is exact there: its reason stays in ``reasons`` and the deviation is measured
    (``width_method="fill"``: copies there train as one); with ``keep_norms`` its norms keep eps and their
    weights grow by sqrt(d'/d) (``width_method="auto"``: ``kept_norms``, see the module docstring). Not where the
    model returns the normalized stream (its hidden states are the caller's features: copies keep them exactly,
    see ``output_maps``)."""
    ag, out = plan.facts.ag, FillPlan()
    sites = norm_sites(plan.captured.gm, plan.facts)
    for g in plan.groups:
        new = sizes.get(g.id, g.size)
        if g.size is None or new == g.size or (new % g.size == 0 and not every) or not any(
                r.kind == "norm" for r in g.reads):
            continue
        mine = [s for s in sites if g.root in ag.leaf_roots(s.axis)]
        why, weighted, folds = _why_not(plan, g, mine, sizes)
        cancelling = {} if why else cancelled_scales(plan, weighted)  # layer scales whose weighted fill has no value
        cancelled = next(iter(cancelling.values()), "")
        why = cancelled if cancelled and new % g.size == 0 else why  # copies are exact at a whole ratio, no fill is
        inexact = (post_norm and why and not _cannot_fill(plan, g, mine, sizes)
                   and not all(s.pre_norm(plan.facts) for s in mine) and not _returned(mine)
                   and (not keep_norms or _normalizes_stream(plan, mine)))
        if why and not inexact:
            (out.copied if new % g.size == 0 else out.reasons)[g.root] = why
            continue
        if inexact and keep_norms:
            out.kept_norms.add(g.root)
            out.reasons[g.root] = (f"{why}; it is filled anyway (post-norm: copies there train as one) and its "
                                   f"norms' weights grow by sqrt(d'/d), so the stream's old units grow by d'/d (it "
                                   f"trains better than copies: docs/savings.md); measured. For the exact copies pass "
                                   f"strict=True or width_method='fpi'")
        elif inexact:
            out.reasons[g.root] = (f"{why}; it is filled anyway (post-norm: copies there train as one), the "
                                   f"deviation is the post-norm output's mean at the fill, measured")
        elif cancelled:  # those writers keep the plain mean fill (no weights, no note claiming exactness)
            out.reasons[g.root] = f"{cancelled}; it is filled with the plain mean instead, measured"
            weighted = {k: lam for k, lam in weighted.items() if lam not in cancelling}
        out.fills[g.root] = "mean" if mine[0].kind == "layer" else "zero"
        out.sites[g.root] = mine
        out.folds[g.root], out.weighted[g.root] = folds, weighted
    return out


def _why_not(plan: Plan, g, mine: list[NormSite], sizes: dict) -> tuple[str, dict, set]:
    """(why repeat-and-fill is not exact for the group ``g``, the writers' weighted fill rows, the parameters that
    take a weightless norm's factor); the reason is "" when it is exact, and only then are the other two filled
    (``layer_scale.scaled_writers``, ``bare_norms.bare_norm_readers``). The reason lists every one that holds, the
    theorem first where it applies (a LayerNorm over a block's residual sum whose output is the stream: no exact
    construction exists, docs/methods.md), so the record never gives a lesser reason in its place."""
    unfit = _unfit_norms(plan, g, mine, sizes)
    if unfit:
        return unfit, {}, set()
    # a zero fill: zero in, zero out of every RMSNorm (weight 0 or not), so a post-norm one is exact as a pre-norm
    # (methods.md); not a head_dim's (q/k norms per head): a filled head_dim changes the attention's 1/sqrt(head_dim)
    zero = mine[0].kind == "rms" and g.role != "head_dim"
    post = [s for s in mine if not s.pre_norm(plan.facts) and not zero]
    theorem = [s.node for s in post if s.kind == "layer" and _sums_stream(s, mine)]
    reasons = [f"the norm at `{theorem[0]}` feeds the residual stream (post-norm): no exact construction exists"
               ] if theorem else []
    reasons += [f"the norm at `{s.node}` reads the output of {op}, which is not linear in the parameters that write "
                f"the group: a fill (or a rescale) before it is not what the norm sees"
                for s in mine if (op := s.nonlinear_source(zero_fill=zero))]
    if post and not reasons:  # an embedding norm, or an RMSNorm: the theorem is not proven there
        reasons.append(f"the norm at `{post[0].node}` writes the residual stream itself (post-norm, not over a "
                       f"block's residual sum, or an RMSNorm): growir fills only pre-norm groups there")
    scales = {}  # (per-channel parameter, node) -> its writers' weighted fill rows, None where none can be weighted
    if mine[0].kind == "layer":  # zero fill rows are zero in any fused axis, and times any channel scale
        reasons.append(_fused(plan, g))
        reasons.append(_not_averaged(plan, g, mine))
        reasons.append(_tied_reader(plan, g, mine))
        scales = {(p, at): scaled_writers(plan, g, p, at) for p, at in _diagonal_producers(plan, g, mine)}
        diagonal = next((pa for pa, writers in scales.items() if writers is None), None)  # a layer scale weighs it
        if diagonal:
            reasons.append(f"`{diagonal[0]}` multiplies the group channel by channel at `{diagonal[1]}` (a "
                           f"depthwise convolution, a per-channel scale): a LayerNorm's mean fill would need the mean "
                           f"of a product")
    reasons = [r for r in reasons if r]
    if reasons:
        return "; ".join(reasons), {}, set()
    folds, why = bare_norm_readers(plan, g, mine)
    if why:
        return why, {}, set()
    return "", {k: v for writers in scales.values() for k, v in writers.items()}, folds


def _tied_reader(plan: Plan, g, mine: list[NormSite]) -> str:
    """Why a tied embedding breaks the mean fill, or "": it writes the group (its fill columns are the mean of its
    columns, as any writer's) and, as the head, reads it where no norm stands between (no final norm): there it
    reads the stream's fill, the mean, through those same nonzero columns. A norm's output is 0 at the fill, and
    an RMSNorm's zero fill is zero everywhere: neither has this problem."""
    outputs = {m for s in mine for m in chain(s.output, PART)}
    for p, _, source in group_reads(plan, g.root):
        if p in plan.facts.produced and back(source, PART) not in outputs:
            return (f"`{p}` is tied (an embedding and a head) and reads the group where no norm stands before it: "
                    f"its fill columns are its mean columns as a writer, and it reads the stream's mean fill there")
    return ""


def _not_averaged(plan: Plan, g, mine: list[NormSite]) -> str:
    """Why the stream's fill is not the mean of its channels where a LayerNorm reads it, or "": an op on the way
    from the writers to the norm that is not linear in the values (a max pool of the stream, Hiera's query
    pooling; an activation of it) maps the mean of the channels to something other than the mean of its outputs.
    Followed back from each norm's input through sums, layout ops, linear reductions and scales; writers
    (contractions, lookups, parameters) and the norms' own outputs end the walk, as does any other op (a product
    with a mask, a select): those are the other checks' (``_diagonal_producers``, ``nonlinear_source``)."""
    f, outputs, seen = plan.facts, {s.output for s in mine}, set()
    on_group = lambda a: any(g.root in f.ag.leaf_roots(ax) for ax in f.axes.get(a.name, []))  # noqa: E731
    stack = [(s.input, s) for s in mine]
    while stack:
        n, site = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or n in outputs or n.op != "call_function":
            continue
        seen.add(n)
        if op_name(n) == "getitem":  # one output of an op with several (max.dim: values and indices)
            stack.append((n.args[0], site))
        elif LINEAR_IN_DATA(n) or SCALES(n) or AVERAGES(n):
            stack.extend((a, site) for a in n.all_input_nodes if on_group(a))  # the stream, not a mask
        elif MAXIMA(n) or (traits(n).kind == "pointwise" and len(n.all_input_nodes) == 1):
            return (f"`{n.name}` ({op_name(n)}) acts on the stream before the norm at `{site.node}`, not linearly: "
                    f"the mean of the channels it is given is not the mean of what it gives")
    return ""


def _sums_stream(site: NormSite, mine: list[NormSite]) -> bool:
    """Whether ``site`` normalizes a residual sum ``x + f(x)`` whose ``x`` is another norm's output over the group
    (a post-norm block), not a sum of embeddings: there the norm's input and output are the same stream."""
    outs, stack, seen = {s.output for s in mine if s is not site}, [site.input], set()
    while stack:
        n = back(stack.pop(), PART)
        if n in outs:
            return True
        if ADDS(n) and n not in seen:
            seen.add(n)
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return False


def _returned(mine: list[NormSite]) -> bool:
    """Whether a norm's output over the group is one of the model's outputs (the hidden states it returns)."""
    return any(u.op == "output" for s in mine for u in forward(s.output, lambda u: PART(u) or indexes_leading(u)))


def _normalizes_stream(plan: Plan, mine: list[NormSite]) -> bool:
    """Whether the model is post-norm: its blocks are (as in the original transformer encoder), and each norm
    over the group that is not pre-norm reads a residual sum and feeds the next one, its output the stream itself.
    Not a pre-norm model with one such norm (an embedding norm before pre-norm blocks), a sandwich norm (a term
    added to the stream) or a pre-norm
    whose readers the analysis does not follow: ``auto`` keeps the exact copies of those."""
    return bool(plan.blocks) and not any(b.pre_norm for b in plan.blocks) and all(
        s.pre_norm(plan.facts) or (ADDS(back(s.input, PART)) and any(ADDS(u) for u in forward(s.output, PART)))
        for s in mine)


def _cannot_fill(plan: Plan, g, mine: list[NormSite], sizes: dict) -> str:
    """Why the group cannot be filled at all, exact or not: its norms or axes are not the plain kind a fill
    rewrites. (A nonlinear or channel-by-channel writer makes a fill inexact, not impossible: measured.)"""
    return _unfit_norms(plan, g, mine, sizes) or _fused(plan, g)


def _unfit_norms(plan: Plan, g, mine: list[NormSite], sizes: dict) -> str:
    ag = plan.facts.ag
    norm_reads = {r.node for r in g.reads if r.kind == "norm"}
    unknown = sorted(norm_reads - {n for s in mine for n in s.reads})
    if unknown:
        return (f"`{unknown[0]}` averages over it and is no LayerNorm/RMSNorm growir recognises (a mean of x or of "
                f"x², eps, a root: analysis/norms.py)")
    wider = [s.node for s in mine if ag.expand(s.axis) != g.root and not _one_grown_factor(plan, g, s, sizes)]
    if wider:
        return (f"the norm at `{wider[0]}` normalizes it together with other axes (a norm over a whole projection, "
                f"or over parts concatenated): repeat-and-fill of one part of a norm's axis is not implemented")
    if len({s.kind for s in mine}) != 1:
        return "LayerNorm and RMSNorm both read it (their fills differ: the mean vs zero)"
    return ""


def _one_grown_factor(plan: Plan, g, site: NormSite, sizes: dict) -> bool:
    """Whether an RMSNorm over a product of axes (a norm over a whole projection: heads x head_dim) grows only in
    the factor ``g``: its zero fill is then whole zero blocks of the product (new heads), the mean of squares
    shrinks by the same ρ = n·d/d' as over ``g`` alone, and a zero in gives a zero out, as over one axis."""
    tree = plan.facts.ag.expand(site.axis)
    if site.kind != "rms" or not isinstance(tree, tuple) or tree[0] != PROD:
        return False
    leaves = tree_leaves(tree)
    if g.root not in _factors(tree) or leaves.count(g.root) != 1:
        return False
    others = [plan.group_of(t) for t in leaves if t != g.root]
    return all(o is None or sizes.get(o.id, o.size) == o.size for o in others)  # None: no parameter grows it


def _factors(tree) -> list:
    """The factors of an axis tree's product, nested products flattened (a concatenation is one factor)."""
    return [f for t in tree[1] for f in _factors(t)] if isinstance(tree, tuple) and tree[0] == PROD else [tree]


def _fused(plan: Plan, g) -> str:
    ag, f = plan.facts.ag, plan.facts
    for pa in g.producers + g.consumers:
        node = next(n for n, s in f.params.items() if s == pa.param)
        if ag.expand(f.axes[node][pa.axis]) != g.root:
            return f"`{pa.param}` holds it inside a fused axis"
    return ""


def _diagonal_producers(plan: Plan, g, mine: list[NormSite]) -> list[tuple]:
    """(parameter, node) of each producer that multiplies an activation over this group without summing over it.

    A mean fill is exact when each term of the normalized input is linear in one parameter whose rows write the
    group (its fill rows, the mean of its rows, then write the mean of its outputs). A channel-by-channel
    product (depthwise conv, layer scale) writes fill = mean(w)·mean(x), not mean(w·x), unless x is linear in
    parameters too (``layer_scale.py``). A zero fill (RMSNorm) is not affected: zero times anything is zero."""
    f, ag, root = plan.facts, plan.facts.ag, g.root
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    node_of = {s: n for n, s in f.params.items()}
    norm_params = {p for s in mine for p in (s.weight, s.bias) if p is not None}
    summed = {(p, at) for p, i, at in f.consumed if root in ag.leaf_roots(f.axes[node_of[p]][i])}
    found = []
    for pa in g.producers:
        if pa.param in norm_params or pa.param not in node_of:
            continue
        for u in forward(nodes[node_of[pa.param]], LAYOUT):
            if _bias_of(u, node_of[pa.param]):
                continue  # added to the contraction's output, not multiplied
            if (CONTRACTIONS(u) or traits(u).kind == "scale") and (pa.param, u.name) not in summed and any(
                    root in ag.leaf_roots(ax) for a in u.all_input_nodes if not is_param(a, f)
                    for ax in f.axes.get(a.name, [])):
                found.append((pa.param, u.name))
    return found


def _bias_of(u: fx.Node, param_node: str) -> bool:
    """Whether the parameter at graph node ``param_node`` is the bias ``u`` adds (``linear(x, W, b)``)."""
    at = traits(u).bias_at
    bias = u.args[at] if at is not None and len(u.args) > at else u.kwargs.get("bias")
    return isinstance(bias, fx.Node) and back(bias, LAYOUT).name == param_node


def adjust_norms(fp: FillPlan, maps: dict, rules: dict, rescaled: set = frozenset()) -> tuple[dict, dict]:
    """Norm weights x sqrt(n·d/d') on the copies and 0 on the fill. Groups whose residual stream is rescaled
    (``rescale.py``) keep their eps; the others need eps x n·d/d'. Returns those eps rewrites in the graph
    ({node: (arg position, eps')}) and the same as values ({eps: eps'}) for a rebuilt config. The groups in
    ``fp.kept_norms`` keep eps and their weights grow by 1/sqrt(ρ) = sqrt(d'/d) instead: their fill is not
    compensated (inexact by choice)."""
    eps, values, scaled = {}, {}, set()
    for root, sites in fp.sites.items():
        m = maps[root]
        ratio = 1.0 if root in fp.kept_norms else kept_fraction(m)
        # auto's post-norm fill: raised, not compensated (the stream d'/d larger trains best: docs/savings.md)
        weight = 1 / math.sqrt(kept_fraction(m)) if root in fp.kept_norms else math.sqrt(ratio)
        for s in sites:  # a bias with no weight before it carries the factor too (bare_norms.py)
            for p, scale in ((s.weight, weight), (s.bias, 1.0 if s.weight else 1 / math.sqrt(ratio))):
                if p is not None and p not in scaled:  # one module called at two places: one tensor, scaled once
                    scaled.add(p)
                    rules[p].scale *= scale
                    axis = rules[p].axes[-1]
                    if axis.index is not None and len(axis.index) != m.new:  # a product: zero in, any weight
                        axis.fill, axis.source = "zero", None  # (``_one_grown_factor``)
                    else:
                        _fill_from_copies(axis, m.new, m.old, p == s.weight)
                    rules[p].notes.append(f"repeat-and-fill: x{scale:.4g}" + (", fill 0" if p == s.bias else ""))
            if s.eps_at is not None and s.eps is not None and root not in rescaled and ratio != 1.0:
                eps[s.eps_at[0]] = (s.eps_at[1], s.eps * ratio)
                values[s.eps] = s.eps * ratio
        if ratio != 1.0:
            fold_scale(rules, fp.folds.get(root, set()), math.sqrt(ratio))
        weigh_fill_rows(fp.weighted.get(root, {}), rules)
    return eps, values


def kept_fraction(m) -> float:
    """ρ = n·d/d': the share of the filled axis that holds copies (the norms' statistics shrink by it)."""
    return float(m.counts.sum()) / m.new


def open_fill_columns(plan: Plan, fp: FillPlan, maps: dict, rules: dict, kind: str = "copy") -> None:
    """Give the fill dimensions something to learn from. The norm's output is 0 there whatever its weight, and
    a contraction that reads only norm outputs may hold any column there: with copies (or ``kind="random"``
    draws) in both instead of zeros, the fill dimensions of the residual receive gradients; with zeros in
    both they never would."""
    for root, sites in fp.sites.items():
        m, outputs = maps[root], {s.output for s in sites}
        for p, i, source in group_reads(plan, root):
            axis = rules[p].axes[i]
            if axis.divide is not None and source in outputs:
                if kind == "random":
                    axis.fill, axis.source = "random", None
                else:
                    _fill_from_copies(axis, m.new, m.old, True)


def group_reads(plan: Plan, root) -> list[tuple[str, int, fx.Node]]:
    """(parameter, axis, the activation it contracts) for every contraction over the group ``root``."""
    return contractions_over(plan.captured.gm, plan.facts, plan.group_of(root))


def _fill_from_copies(axis, new: int, old: int, copy: bool) -> None:
    axis.fill = "copy" if copy else "zero"
    axis.source = torch.arange(new) % old if copy else None


def rewrite_eps(gm: fx.GraphModule, eps: dict) -> None:
    """Set each norm node's eps argument in ``gm`` to its grown value (``eps``: node name -> (position, value))."""
    for n in gm.graph.nodes:
        if n.name in eps:
            pos, value = eps[n.name]
            args = list(n.args)
            args[pos] = value
            n.args = tuple(args)
