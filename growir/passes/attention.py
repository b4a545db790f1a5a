"""head_dim growth: keep every attention score, then undo what the new size does to the score scale.

Two constructions, both exact for a whole factor k (docs/methods.md derives them):

- **copies** (no rotary): every query/key dimension copied k times, so q'.k' = k (q.k). A per-head norm
  (q/k norm) sees the same mean and variance over copies and is unchanged.
- **interleave** (rotary, full or partial): old rotary pair j becomes new pair k·j, which has the same
  frequency at head_dim k·d; every other new dimension (pairs between, the non-rotary part's new positions)
  is zero in the query, so q'.k' = q.k whatever the key holds there. The key copies its neighbour's values
  (and the frequency table continues its geometric sequence), so that the new dimensions receive gradients:
  zero in both the query and the key would be a saddle they never leave. A per-head RMS norm on the query
  sees its mean of squares fall by 1/k: the projection behind it is multiplied by sqrt(k) and the norm's
  weight divided by sqrt(k), which restores it exactly with the same eps; the key's norm sees copies and is
  unchanged. A per-head LayerNorm on the query would see its mean move onto zeros, so there the query's
  projection copies too (mean and variance unchanged) and the norm's weight and bias are zero at the new
  dimensions instead.

The score scale 1/sqrt(head_dim) either follows the new size (a default scale, or an explicit 1/sqrt(d) that
a rebuilt config recomputes) or is a constant that does not (a fixed 1.0). The query is multiplied by what
is left, on whatever scales it linearly: the per-head norm's weight and bias, or else the rows of its
projection that write it (a fused QKV weight: the query's rows only; see ``sources.py``). Value dimensions
are copied and the output projection splits them, as for any group.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..analysis.norms import norm_sites
from ..analysis.sources import Rows, Source, param_dependent, trace_source
from ..analysis.rotary import rotary_parts
from ..analysis.plan import Plan
from .width import WidthResult
from ..ir.index_maps import tree_map


def rotary_fills(plan: Plan, sizes: dict) -> dict:
    """Rotary head_dim parts that grow: they interleave (old dimension j at k·j, zeros between)."""
    out = {}
    for site in plan.facts.attention:
        parts = rotary_parts(plan.facts.ag, site)
        for leaf in parts or ():
            g = plan.group_of(leaf) if leaf is not None else None
            if g is not None and sizes.get(g.id, g.size) != g.size:
                out[leaf] = "interleave"
    return out


def compensate_head_dim(plan: Plan, maps: dict, width: WidthResult):
    """Scale what writes each query (and zero its new rotary dimensions); return (reasons it failed,
    compensated (root, kind) pairs, score-scale rewrites {node: scale})."""
    f, ag = plan.facts, plan.facts.ag
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reasons, done, scales, used = [], set(), {}, set()
    dep, norms = param_dependent(plan.captured.gm, f), norm_sites(plan.captured.gm, f)
    for site in f.attention:
        leaves = ag.leaf_roots(site["q"][-1])
        grown = [leaf for leaf in leaves if leaf in maps]
        if not grown:
            continue
        where, node = f"the attention at `{site['node']}`", nodes[site["node"]]
        tree = ag.expand(site["q"][-1])
        old, new = int(ag.size_of(site["q"][-1])), int(tree_map(tree, ag, maps)[3])
        why, k = _construction(leaves, grown, maps, tree)
        if why:
            reasons.append(f"{where}: {why}")
            continue
        interleaved = maps[grown[0]].fill == "interleave"
        scale = node.kwargs.get("scale")
        follows = scale is None or math.isclose(scale, old ** -0.5, rel_tol=1e-9)
        query_factor = (math.sqrt(k) if follows else 1.0) if interleaved else (1 / math.sqrt(k) if follows else 1 / k)
        q = trace_source(node.args[0], f, dep, norms)
        key = trace_source(node.args[1], f, dep, norms)
        why = _why_not_rescalable(q, key, tree, ag)
        if why:
            reasons.append(f"{where}: {why}")
            continue
        layer_norm = interleaved and q.norm is not None and q.norm.kind == "layer"
        if layer_norm:  # copies keep the LayerNorm's mean and variance; its weight and bias zero the new dims
            actions, zeroed = [(r, query_factor) for r in q.scales], q.scales
        else:
            actions, zeroed = _actions(q, query_factor, math.sqrt(k) if interleaved else 1.0), q.writers
        shared = sorted({a.param for a, _ in actions} & used)
        if shared:
            reasons.append(f"{where}: `{shared[0]}` also feeds another attention whose head_dim grows")
            continue
        for rows, factor in actions:
            if factor != 1.0:
                _scale(width, rows, factor, f"x{factor:.4g}: head_dim x{k} at {site['node']}")
            used.add(rows.param)
        if interleaved:
            for rows in zeroed:
                _zero_new(width, rows, site["node"])
        if scale is not None and follows:
            scales[site["node"]] = new ** -0.5
        done |= {(leaf, kind) for leaf in grown for kind in ("contract", "scale", "norm")}
    return reasons, done, scales


def _construction(leaves, grown, maps, tree) -> tuple[str, int]:
    """(why no exact construction applies, or ""; the factor k)."""
    ms = [maps[leaf] for leaf in grown]
    if any(m.fill == "interleave" for m in ms):
        ks = {m.new / m.old for m in ms}
        if len(grown) != len(leaves) or len(ks) != 1 or any(m.fill != "interleave" for m in ms) \
                or any(m.new % m.old for m in ms):
            return "rotary head_dim growth needs every part of head_dim to grow by one whole factor", 0
        return "", int(ks.pop())
    if len(leaves) != 1 or tree != leaves[0]:
        return "head_dim is split in a way growir cannot grow exactly", 0
    m = ms[0]
    if not m.uniform:
        return (f"head_dim {m.old} -> {m.new} is not a whole multiple; copied query/key dimensions then weigh "
                f"unevenly in the scores"), 0
    return "", m.new // m.old


def _why_not_rescalable(q: Source | None, key: Source | None, tree, ag) -> str:
    if q is None or key is None:
        which = "query" if q is None else "key"
        return (f"growir could not trace the {which} back to its projection (through layout ops, rotary "
                f"embeddings and at most one per-head norm); head_dim growth needs to rescale it")
    mine = {r.param: r.rows for r in q.writers}
    for r in key.writers + key.scales:
        rows = mine.get(r.param, False)
        if rows is not False and (rows is None or r.rows is None or bool(torch.isin(rows, r.rows).any())):
            return f"the query and the key share `{r.param}`, so the query cannot be rescaled alone"
    if q.norm is not None and q.norm is key.norm:
        return f"the query and the key share the norm `{q.norm.node}`"
    for name, src in (("query", q), ("key", key)):
        if src.norm is not None and ag.expand(src.norm.axis) != tree:
            return f"the {name} passes a norm over more than one head's dimensions (`{src.norm.node}`)"
    return ""


def _actions(src: Source, factor: float, behind: float) -> list:
    """(Rows, factor) pairs: ``factor`` on the query; behind a norm, ``behind`` on its projection and
    1/``behind`` on the norm (the zero dimensions shrink the norm's mean of squares by 1/behind**2)."""
    if src.norm is None:
        return [(r, factor) for r in src.proj]
    return [(r, behind) for r in src.norm_proj] + [(r, factor / behind) for r in src.scales]


def _zero_new(width: WidthResult, rows: Rows, where: str) -> None:
    """The query's rows at the new (interleaved) dimensions write zero; the rest of the tensor copies."""
    m = width.rules[rows.param].axes[rows.axis]
    if m.fill != "copy":
        return
    mine = m.index < 0
    if rows.rows is not None:
        mine &= torch.isin(m.source, rows.rows)
    m.source = torch.where(mine, -1, m.source)
    width.rules[rows.param].notes.append(f"zero at the new query dimensions of {where}")


def _scale(width: WidthResult, rows: Rows, factor: float, note: str) -> None:
    rule = width.rules[rows.param]
    if rows.rows is None:
        rule.scale *= factor
    else:
        rule.axes[rows.axis].scale_rows(rows.rows, factor, rows.size)
        note += f" (the query's {len(rows.rows)} of {rows.size} rows)"
    rule.notes.append(note)


def rewrite_scales(gm: fx.GraphModule, scales: dict) -> None:
    """Explicit 1/sqrt(head_dim) scales follow the new head_dim, as a rebuilt config recomputes them."""
    for n in gm.graph.nodes:
        if n.name in scales:
            n.kwargs = {**n.kwargs, "scale": scales[n.name]}
