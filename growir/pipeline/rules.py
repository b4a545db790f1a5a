"""The rules stage as a declared list of passes: index maps, per-tensor width rules and every compensation,
then the rules of a two-block proxy expanded to the full block lists, then depth. No weights are read.

Each pass declares the fields of ``pipeline.context.Context`` it reads, writes and mutates (``@declare``, right
above it; most mutate ``width_result``, the per-tensor rules they compensate); ``RULES`` is the order. The
order matters where one compensation reads another's output: size values are absorbed before the tied
head is compensated (it reads the scale they leave), and the exactness verdict comes after every rule is
final.
"""

from __future__ import annotations

import dataclasses

import torch

from .manager import declare
from ..passes.aki import aki_rules
from ..passes.attention import compensate_head_dim, rewrite_scales, rotary_fills
from ..passes.constants import rewrite_constants
from ..passes.depth import replace_blocks, schedule
from ..passes.exactness import compensate_tied, deviations
from ..passes.fill import FillPlan, adjust_norms, open_fill_columns, plan_fill, rewrite_eps
from ..passes.fresh import copy_where_exact, fresh_units, seed_random_fills, split_copies
from ..passes.offsets import mark_offsets
from ..passes.per_unit import find_unit_constants, freeze_constants, grown_value, unit_maps
from ..passes.rescale import rescale_residuals, stream_scale
from ..passes.size_values import absorb_size_values
from ..ir.index_maps import fpi_index, random_index
from ..passes.width import group_maps, width_rules


FRESH = ("fresh", "auto", "fill")  # the width methods that build fresh units and fills ("auto": per group)
PER_GROUP = ("auto", "fill")  # decided per group; both fill a post-norm residual (inexact, measured; fill.py)


@declare(reads=("plan", "sizes", "opts", "strict"), writes=("fill", "new_units"))
def _fill_plan(c) -> None:
    fresh = c.opts.width_method in FRESH
    post_norm = c.opts.width_method in PER_GROUP and not c.strict  # a post-norm residual filled, inexact, measured
    c.fill = (plan_fill(c.plan, c.sizes, every=fresh, post_norm=post_norm, keep_norms=c.opts.width_method == "auto")
              if c.opts.width_method in ("fpi", *FRESH) else FillPlan())
    if c.opts.width_method in PER_GROUP:
        copy_where_exact(c.plan, c.sizes, c.fill, _low_precision(c), c.opts.keep_eps)
    c.new_units = fresh_units(c.plan, c.sizes, c.fill) if fresh else {}


def _low_precision(c) -> bool:
    """Options.low_precision where given (streaming knows the stored dtype), else the traced weights' dtype."""
    if c.opts.low_precision is not None:
        return c.opts.low_precision
    eps = torch.finfo(torch.float32).eps
    gm = c.plan.captured.gm
    return any(t.is_floating_point() and torch.finfo(t.dtype).eps > eps
               for t in list(gm.parameters()) + list(gm.buffers()))


@declare(reads=("plan", "sizes", "opts", "fill", "new_units"), writes=("maps",))
def _index_maps(c) -> None:
    index_fn = random_index if c.opts.width_method == "fpi_random" else fpi_index
    fills = {**c.fill.fills, **c.new_units, **rotary_fills(c.plan, c.sizes)}
    c.maps = group_maps(c.plan, c.sizes, c.opts.seed, index_fn, fills, c.opts.width_method in FRESH)


@declare(reads=("plan", "opts"), writes=("units", "unit_reasons", "frozen"), mutates=("maps",))
def _unit_constants(c) -> None:
    """Per-unit constants (ALiBi slopes): old units where the rebuilt model's values match."""
    c.units = find_unit_constants(c.plan, c.maps)
    placed, c.unit_reasons = unit_maps(c.units, c.opts.unit_values)
    c.maps.update(placed)
    c.frozen = {u.node: c.opts.unit_values.get(u.node, grown_value(u, c.maps)) for u in c.units}


@declare(reads=("plan", "maps"), writes=("width_result",))
def _width_rules(c) -> None:
    c.width_result = width_rules(c.plan, c.maps)
    mark_offsets(c.plan, c.width_result.rules)


@declare(reads=("plan", "maps"), writes=("size_literals",), mutates=("width_result",))
def _size_values(c) -> None:
    c.size_literals, _ = absorb_size_values(c.plan, c.maps, c.width_result)


@declare(reads=("plan", "maps"), writes=("head_dim_reasons", "compensated", "scales"), mutates=("width_result",))
def _head_dim(c) -> None:
    c.head_dim_reasons, c.compensated, c.scales = compensate_head_dim(c.plan, c.maps, c.width_result)


@declare(reads=("plan", "maps", "opts"),
         writes=("rescaled", "stream_scales", "eps", "eps_values"),
         mutates=("width_result", "fill"))
def _norms(c) -> None:
    """The residual stream rescaled where its norms keep eps, else eps rescaled; fill columns opened."""
    c.rescaled = rescale_residuals(c.plan, c.fill, c.maps, c.width_result.rules) if c.opts.rescale else set()
    c.stream_scales = {root: stream_scale(c.maps[root]) for root in c.rescaled}
    c.eps, c.eps_values = adjust_norms(c.fill, c.maps, c.width_result.rules, c.rescaled)
    kind = "random" if c.opts.width_method in FRESH else "copy"
    open_fill_columns(c.plan, c.fill, c.maps, c.width_result.rules, kind)


@declare(reads=("plan", "fill", "opts"), mutates=("width_result",))
def _split_copies(c) -> None:
    """width_method='fresh'/'auto': a copied (post-norm) group's consumers split by random factors, not 1/n
    (not below float32 precision, where the factors would round and a division by 2^j does not)."""
    if c.opts.width_method in FRESH and not _low_precision(c):
        split_copies(c.plan, c.fill.copied, c.width_result.rules)


@declare(reads=("plan", "maps"), writes=("tied_reasons",), mutates=("width_result",))
def _tied_head(c) -> None:
    """The norm before a tied head (an embedding read as the output layer) rescaled by 1/n; why not, where not."""
    c.tied_reasons = compensate_tied(c.plan, c.maps, c.width_result)


@declare(reads=("plan", "maps", "fill", "compensated", "tied_reasons", "head_dim_reasons", "unit_reasons", "eps",
                "opts"),
         writes=("reasons", "eps", "eps_values"))
def _exactness(c) -> None:
    p = c.plan
    c.reasons = (deviations(p, c.maps, c.compensated | {(root, "norm") for root in c.fill.fills})
                 + c.tied_reasons + c.head_dim_reasons
                 + [f"repeat-and-fill cannot make {p.group_of(r).label} exact: {why}"
                    for r, why in c.fill.reasons.items()]
                 + c.unit_reasons)
    if c.opts.keep_eps and c.eps:
        c.eps, c.eps_values = {}, {}
        c.reasons.append("the rebuilt config cannot express the norms' rescaled eps (repeat-and-fill), so eps "
                         "was kept: the error is about eps / var(x), measured below")


@declare(reads=("plan", "maps", "opts"), mutates=("width_result", "reasons"))
def _aki(c) -> None:
    if c.opts.width_method == "aki" and aki_rules(c.plan, c.maps, c.width_result.rules):
        c.reasons.append("AKI gives the new units of each block the next block's weights (bert2BERT): "
                         "not function-preserving by design")


@declare(reads=("opts",), mutates=("width_result",))
def _noise(c) -> None:
    """Symmetry breaking on every consumer axis that has copies (each tensor its own seeded draw)."""
    rules, opts = c.width_result.rules, c.opts
    if not opts.noise:
        return
    for k, (name, rule) in enumerate(sorted(rules.items())):
        if rule.has_copies_to_perturb() and not rule.zero:
            rules[name] = dataclasses.replace(rule, noise=(opts.noise, opts.seed * 100003 + k))


@declare(reads=("plan", "maps", "eps", "size_literals", "scales", "frozen", "fill", "new_units"),
         writes=("graph_edits", "filled"))
def _graph_edits(c) -> None:
    p, maps, eps, literals, scales, frozen = c.plan, c.maps, c.eps, c.size_literals, c.scales, c.frozen
    c.graph_edits = [lambda g: rewrite_constants(p, maps, g), lambda g: rewrite_scales(g, scales),
                     lambda g: rewrite_eps(g, eps), lambda g: rewrite_eps(g, literals),
                     lambda g: freeze_constants(g, frozen)]
    c.filled = {p.group_of(root).label: kind for root, kind in {**c.fill.fills, **c.new_units}.items()}
    c.filled.update({p.group_of(root).label: f"copies ({why})" for root, why in c.fill.copied.items()})


@declare(reads=("width_result", "counts"), writes=("rules",))
def _expand_blocks(c) -> None:
    """A two-block proxy's rules, block for block, for the full block lists (``checkpoint.counts``)."""
    from ..frontend.proxy import expand_block_rules
    c.rules = expand_block_rules(c.width_result.rules, c.counts)


@declare(reads=("depth_plan", "counts", "opts"), writes=("schedules", "layer_info"), mutates=("rules", "reasons"))
def _depth(c) -> None:
    c.schedules, c.layer_info = [], {}
    for b, new in c.depth_plan:
        if b.prefix in c.counts:
            b = dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(c.counts[b.prefix])])
        sched = schedule(b, new, c.opts.depth_method)
        replace_blocks(sched, c.rules)
        c.schedules.append(sched)
        c.layer_info[b.prefix] = (b.count, new, sched.describe())
        if not sched.exact:
            c.reasons.append(f"depth growth of `{b.prefix}` by `{sched.method}` is not function-preserving"
                             + (" (its blocks are post-norm)" if sched.method == "identity" else ""))


@declare(reads=("plan", "opts"), mutates=("rules", "width_result"))  # the rule objects expand_blocks shares
def _seed_fills(c) -> None:
    seed_random_fills(c.rules, c.plan.facts.aliases, c.opts.seed)


RULES = (_fill_plan, _index_maps, _unit_constants, _width_rules, _size_values, _head_dim, _norms, _split_copies,
         _tied_head, _exactness, _aki, _noise, _graph_edits, _expand_blocks, _depth, _seed_fills)
