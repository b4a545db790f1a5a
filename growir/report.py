"""Readable tables for plans and growth records (library code returns them; only the CLI prints)."""

from __future__ import annotations


def _table(headers: list, rows: list) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _short(items: list, n: int = 3) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f", +{len(items) - n} more" if len(items) > n else "")


def plan_table(plan) -> str:
    """The plan in words: one row per width group (what writes, splits and reads it), the fused axes, the
    block lists, and a legend (``print(growir.plan(model))`` shows it)."""
    rows = []
    for g in plan.groups:
        prod = [f"{p.param}[{p.axis}]" for p in g.producers]
        cons = [f"{p.param}[{p.axis}]" for p in g.consumers]
        reads = sorted({r.kind for r in g.reads})
        rows.append([g.label, g.size, len(prod), len(cons), len(g.consts), ",".join(reads) or "-",
                     g.pinned and "pinned" or "", _short(prod + cons, 1)])
    head = _table(["group", "size", "copied", "split", "consts", "reads", "", "e.g."], rows)
    fused = []
    for node, param in plan.facts.params.items():
        for axis, _ in enumerate(plan.facts.axes.get(node, [])):
            lay = plan.layout(param, axis)
            if isinstance(lay, tuple) and lay[0] == "cat":
                fused.append(f"fused `{param}`[{axis}] = {_show(lay)}")
    blocks = [f"blocks `{b.prefix}`: {b.count} x {'pre-norm' if b.pre_norm else 'post-norm'}"
              + ("" if b.homogeneous else f" (not copyable: {b.why_not})") for b in plan.blocks]
    legend = ("copied: parameter axes that write the group (rows copied); split: axes that contract it "
              "(divided by copy count); consts: size literals in the graph; reads: reductions over it")
    return "\n".join([head] + fused[:6] + ([f"... {len(fused) - 6} more fused axes"] if len(fused) > 6 else [])
                     + blocks + [legend])


def _show(lay) -> str:
    if isinstance(lay, tuple):
        sep = " | " if lay[0] == "cat" else " x "
        return "(" + sep.join(_show(p) for p in lay[1]) + ")"
    return str(lay)


def record_table(rec) -> str:
    """Grown groups collapsed by (role, old, new): one row per kind of change."""
    rows = {}
    for g in rec.plan.groups if rec.plan is not None else ():  # an upcycling's record has no width plan
        new = rec.sizes.get(g.id, g.size)
        if new != g.size:
            role = g.label.split(":", 1)[1] if g.role else "output-only"
            key = (role, g.size, new)
            count, tensors = rows.get(key, (0, 0))
            rows[key] = (count + 1, tensors + len(g.producers) + len(g.consumers))
    table = [[role, count, old, new, tensors] for (role, old, new), (count, tensors) in rows.items()]
    lines = [_table(["role", "groups", "old", "new", "tensor axes"], table) if table else "no width change"]
    for prefix, (old, new, method) in rec.layers.items():
        lines.append(f"blocks `{prefix}`: {old} -> {new} ({method})")
    ratio = f" (x{rec.params_after / rec.params_before:.2f})" if rec.params_before else ""
    lines.append(f"parameters: {rec.params_before:,} -> {rec.params_after:,}{ratio}; grown in {rec.seconds:.1f} s")
    if rec.config_changes:
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in rec.config_changes.items()))
    lines += [f"note: {n}" for n in getattr(rec, "notes", [])]
    verdict = "exact" if rec.exact else "not exact: " + "; ".join(rec.reasons)
    measured = ("deviation not measured (meta device: shapes only)" if rec.deviation is None
                else f"measured deviation {rec.deviation:.2e}")
    lines.append(f"preservation: {verdict}; {measured}")
    return "\n".join(lines)
