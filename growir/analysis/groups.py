"""Width groups: the leaves of the axis graph, each with a role found from structure, never from names.

- ``heads`` / ``kv_heads``: the head axis of an attention's query and key. When they differ (grouped-query
  attention), the query heads are ``kv_heads x per_kv`` where ``per_kv`` was made by an expand; that
  replica group has role ``heads`` and ``per_kv=True``.
- ``head_dim``: the axis attention contracts between query and key (and the value's last axis).
- ``hidden``: a group a norm reduces over (the residual stream; also separate streams like a projection).
- ``ffn``: a group that parameters both write and contract, with only elementwise ops between.
- anything else (vocabulary, positions, batch, sequence, task-head outputs) has no role and keeps its size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch.fx as fx

from ..ir.axes import PROD
from .nodes import back
from .ops import PART, SCALES, indexes_leading
from .walker import Facts, ParamAxis, Read, SizeConst

ROLES = ("hidden", "heads", "kv_heads", "head_dim", "ffn")


@dataclass
class Group:
    """A width group: one leaf of the axis graph, the parameter axes copied (producers) and contracted
    (consumers) along it, what reads it, the literals carrying its size, and its role (or why it is pinned)."""
    id: int
    root: object
    size: int | None  # None for symbolic (batch/sequence) groups
    role: str | None = None
    per_kv: bool = False  # query heads per kv head (grouped-query attention)
    pinned: str | None = None
    producers: list = field(default_factory=list)  # ParamAxis copied along this group
    consumers: list = field(default_factory=list)  # ParamAxis contracted over this group
    reads: list = field(default_factory=list)  # Read
    consts: list = field(default_factory=list)  # SizeConst
    in_output: bool = False

    @property
    def label(self) -> str:
        """How plans and errors name the group: ``g3:ffn``."""
        role = self.role or "-"
        if self.per_kv:
            role = "heads (per kv head)"
        return f"g{self.id}:{role}"


def _concrete(size: sympy.Expr) -> int | None:
    return int(size) if size.is_Integer else None


def find_groups(facts: Facts) -> list[Group]:
    """The width groups of a walk's facts (leaves touching a parameter), with roles, ordered by role."""
    ag = facts.ag
    groups: dict = {}

    def group(root) -> Group:
        if root not in groups:
            groups[root] = Group(len(groups), root, _concrete(ag.size[root]))
        return groups[root]

    names = {**facts.params}
    consumed = {(p, i) for p, i, _ in facts.consumed}
    for node_name, state in names.items():
        for i, axis in enumerate(facts.axes.get(node_name, [])):
            pa = ParamAxis(state, i)
            for leaf in ag.leaf_roots(axis):
                g = group(leaf)
                (g.consumers if (state, i) in consumed else g.producers).append(pa)
    _attach(facts, group)
    result = [g for g in groups.values() if g.producers or g.consumers]
    _assign_roles(facts, result)
    for i, g in enumerate(sorted(result, key=_order)):
        g.id = i
    return sorted(result, key=_order)


def _attach(facts: Facts, group) -> None:
    ag = facts.ag
    for r in facts.reads:
        for leaf in ag.leaf_roots(r.axis):
            group(leaf).reads.append(r)
    for c in facts.consts:
        axes = c.axis if isinstance(c.axis, tuple) and c.axis and isinstance(c.axis[0], tuple) else (c.axis,)
        for a in axes:
            if a is None:
                continue
            for leaf in ag.leaf_roots(a):
                group(leaf).consts.append(c)
    for axis, reason in facts.pins.items():
        for leaf in ag.leaf_roots(axis):
            g = group(leaf)
            g.pinned = g.pinned or reason
    for out in facts.outputs:
        for axis in out or []:
            for leaf in ag.leaf_roots(axis):
                group(leaf).in_output = True


def _assign_roles(facts: Facts, groups: list[Group]) -> None:
    ag = facts.ag
    by_root = {g.root: g for g in groups}
    expanded = {ag.find(a) for a in facts.expanded} | {leaf for a in facts.expanded for leaf in ag.leaf_roots(a)}

    def set_role(axis, role, per_kv=False):
        for leaf in ag.leaf_roots(axis):
            g = by_root.get(leaf)
            if g is not None and g.role is None and g.size is not None:
                g.role, g.per_kv = role, per_kv

    def set_heads(axis):
        heads = ag.leaf_roots(axis)
        replicas = [leaf for leaf in heads if leaf in expanded]
        for leaf in heads:  # kv heads repeated by an expand: query heads = kv_heads x per_kv
            if not replicas:
                set_role(leaf, "heads")
            else:
                set_role(leaf, "heads", per_kv=True) if leaf in replicas else set_role(leaf, "kv_heads")

    for site in facts.attention:
        q, v = site["q"], site["v"]
        set_role(q[-1], "head_dim")
        set_role(v[-1], "head_dim")
        set_heads(q[1])
    # an input's axis (a sequence fixed by a position table, an image's patch grid) is data, never a head
    data = {leaf for name in facts.inputs for a in facts.axes.get(name, []) for leaf in ag.leaf_roots(a)}
    for g in groups:  # attention written out as matmuls: contracted dim and batch (head) dims
        kinds = {r.kind for r in g.reads}
        if g.role is None and g.size is not None and kinds & {"contract", "value"} and g.root not in data:
            g.role = "head_dim"
    for r in facts.reads:  # a batch axis of attention written out: heads, or kv heads x replicas
        if r.kind == "batch" and any(by_root.get(leaf) is not None and by_root[leaf].consumers
                                     and leaf not in data for leaf in ag.leaf_roots(r.axis)):
            set_heads(r.axis)
    heads = {g.root for g in groups if g.role in ("heads", "kv_heads")}
    for r in facts.reads:  # a norm over heads x channels (an SSM's gated norm over its inner width): per-head ones
        if r.kind == "norm" and heads & set(ag.leaf_roots(r.axis)):
            set_role(r.axis, "head_dim")
    for s in list(ag.structure.values()):  # heads x channels with no norm over them: the channels are per-head too
        if s.kind == PROD:
            major = next((k for k, part in enumerate(s.parts) if set(ag.leaf_roots(part)) <= heads), len(s.parts))
            for part in s.parts[major + 1:]:
                if not data & set(ag.leaf_roots(part)):
                    set_role(part, "head_dim")
    for g in groups:
        if g.role is None and g.size is not None and any(r.kind == "norm" for r in g.reads):
            g.role = "hidden"
    for g in groups:
        if g.role is None and g.size is not None and g.producers and g.consumers and not g.pinned:
            g.role = "ffn"


def _order(g: Group):
    rank = ROLES.index(g.role) if g.role in ROLES else len(ROLES)
    return (rank, str(g.root))


__all__ = ["Group", "find_groups", "ROLES", "ParamAxis", "Read", "SizeConst"]


def contractions_over(gm: fx.GraphModule, facts: Facts, group: Group) -> list[tuple[str, int, fx.Node]]:
    """(parameter, axis, the activation it contracts) for every contraction of a parameter over ``group``."""
    on_group = {(pa.param, pa.axis) for pa in group.consumers}
    nodes = {n.name: n for n in gm.graph.nodes}
    return [(p, i, reads_from(nodes[node], facts)) for p, i, node in facts.consumed if (p, i) in on_group]


def reads_from(node: fx.Node, facts: Facts) -> fx.Node | None:
    """The activation a contraction reads, back through layout ops, gathers of whole tokens and
    multiplications by constants."""
    x = next((a for a in node.args if isinstance(a, fx.Node) and a.name not in facts.params), None)
    return back(x, lambda n: PART(n) or indexes_leading(n) or (SCALES(n) and not isinstance(n.args[1], fx.Node)))
