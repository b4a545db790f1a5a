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
    rows = []
    for g in plan.groups:
        prod = [f"{p.param}[{p.axis}]" for p in g.producers]
        cons = [f"{p.param}[{p.axis}]" for p in g.consumers]
        reads = sorted({r.kind for r in g.reads})
        rows.append([g.label, g.size, len(prod), len(cons), len(g.consts), ",".join(reads) or "-",
                     g.pinned and "pinned" or "", _short(prod + cons, 2)])
    head = _table(["group", "size", "writes", "reads", "consts", "reductions", "", "e.g."], rows)
    blocks = [f"blocks `{b.prefix}`: {b.count} x {'pre-norm' if b.pre_norm else 'post-norm'}"
              + ("" if b.homogeneous else f" (not copyable: {b.why_not})") for b in plan.blocks]
    return "\n".join([head] + blocks)


def record_table(rec) -> str:
    rows = []
    for g in rec.plan.groups:
        new = rec.sizes.get(g.id, g.size)
        if new != g.size:
            rows.append([g.label, g.size, new, len(g.producers) + len(g.consumers)])
    lines = [_table(["group", "old", "new", "tensors"], rows) if rows else "no width change"]
    for prefix, (old, new, method) in rec.layers.items():
        lines.append(f"blocks `{prefix}`: {old} -> {new} ({method})")
    lines.append(f"parameters: {rec.params_before:,} -> {rec.params_after:,}")
    verdict = "exact" if rec.exact else "not exact: " + "; ".join(rec.reasons)
    lines.append(f"preservation: {verdict}; measured deviation {rec.deviation:.2e}")
    return "\n".join(lines)
