"""Compare the walker's facts on one graph with an op's hand rule and with its rule derived from its meta kernel
(growir/analysis/derived_rules.py): used by tests/analysis/test_derived_rules.py and benchmarks/rule_coverage.py."""

from __future__ import annotations

from growir.analysis.ops import TRAITS
from growir.analysis.derived_rules import derived
from growir.analysis.walker import Walker
from growir.errors import AnalysisError, UnsupportedOpError


def walk(gm, drop: str | None = None):
    """The walker's facts with the op table as it is, or with ``drop``'s row removed (its rule derived)."""
    table = {k: v for k, v in TRAITS.items() if k != drop}
    return Walker(gm, table, derive=derived).run()


def named(facts) -> dict:
    """Every tensor axis of the graph (tuple outputs' too) by its name: (node, axis) or (node, part, axis)."""
    out = {(name, i): a for name, axes in facts.axes.items() for i, a in enumerate(axes)}
    out.update({(name, k, i): a for name, parts in facts.tuple_axes.items() for k, axes in enumerate(parts)
                for i, a in enumerate(axes)})
    return out


def members(facts) -> dict:
    """Each class root -> the names of the tensor axes in it (how two walks of one graph can be compared)."""
    by_root = {}
    for name, a in named(facts).items():
        by_root.setdefault(facts.ag.find(a), set()).add(name)
    return by_root


def classes(facts) -> set:
    """The partition of the graph's tensor axes into equal classes (classes of one axis, and axes of size 1, which
    never grow and which a derived rule leaves alone, left out)."""
    by_root = members(facts)
    return {frozenset(m) for r, m in by_root.items() if len(m) > 1 and facts.ag.size_of(r) != 1}


def structures(facts) -> dict:
    """For each structured tensor axis: its kind and its leaves' sizes."""
    out = {}
    for name, a in named(facts).items():
        s = facts.ag.structure.get(facts.ag.find(a))
        if s is not None:
            out[name] = (s.kind, [str(facts.ag.size_of(p)) for p in facts.ag.leaves(s.kind, s.parts)])
    return out


def careful(facts) -> set:
    """The classes (by their tensor axes' names) some op reads beyond copying, or pins."""
    by_root = members(facts)
    roots = {facts.ag.find(r.axis) for r in facts.reads} | {facts.ag.find(a) for a in facts.pins}
    return {frozenset(by_root.get(r, {str(facts.ag.size_of(r))})) for r in roots}


def agreement(gm, row: str) -> str:
    """How the derived rule of ``row``'s op compares with its hand rule on ``gm``: ``agrees`` (the same equal
    axes, structures, reads and pins), ``more careful`` (the same axes, and more of them read or pinned),
    ``differs: ...`` or ``refused: ...``."""
    hand = walk(gm)
    try:
        probed = walk(gm, row)
    except UnsupportedOpError as exc:
        return "refused: " + str(exc).split("meta kernel: ", 1)[-1].split(". Rewrite", 1)[0]
    except AnalysisError as exc:
        return f"differs: the walk stops ({str(exc)[:100]})"
    if classes(probed) != classes(hand):
        return "differs: other equal axes"
    if structures(probed) != structures(hand):
        return "differs: other structures"
    if not careful(hand) <= careful(probed):
        return "differs: reads less"
    return "agrees" if careful(hand) == careful(probed) else "more careful"
