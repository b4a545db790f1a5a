"""The plan: the width groups and blocks found in a model, and a growth spec resolved against them.

>>> import growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
>>> p = growir.plan(small)
>>> sorted({g.role for g in p.groups if g.role})
['ffn', 'head_dim', 'heads', 'hidden', 'kv_heads']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from . import Facts, Group, analyze, find_groups
from ..ir.axes import is_structured
from .blocks import Blocks, find_blocks
from .rotary import rotary_parts
from ..errors import SpecError
from ..frontend.export import Captured

WIDTH_ROLES = ("hidden", "heads", "kv_heads", "head_dim", "ffn")


@dataclass
class Plan:
    """What growir found in a model: width groups (``groups``), repeated blocks (``blocks``)."""
    captured: Captured
    facts: Facts
    groups: list[Group]
    blocks: list[Blocks] = field(default_factory=list)

    def by_role(self, role: str) -> list[Group]:
        """The groups of one role ("hidden", "ffn", ...), in plan order."""
        return [g for g in self.groups if g.role == role]

    def group_of(self, root) -> Group | None:
        """The group whose leaf root is ``root``; None for an axis no parameter touches."""
        return next((g for g in self.groups if g.root == root), None)

    def layout(self, param: str, axis: int):
        """How a parameter axis is made of groups: a group label, or ("prod"|"cat", [parts]).

        A fused QKV projection's output axis reads ``("cat", [("prod", [heads, head_dim]), ...])``.
        """
        param = self.facts.aliases.get(param, param)
        node = next((n for n, s in self.facts.params.items() if s == param), None)
        if node is None:
            raise KeyError(f"`{param}` is not a parameter the graph reads")

        def label(tree):
            if is_structured(tree):
                return (tree[0], [label(t) for t in tree[1]])
            g = self.group_of(tree)
            return g.label if g is not None else f"-:{self.facts.ag.size[tree]}"
        return label(self.facts.ag.expand(self.facts.axes[node][axis]))

    def __str__(self) -> str:
        from ..report import plan_table
        return plan_table(self)

    def __repr__(self) -> str:
        roles = {r: len(self.by_role(r)) for r in WIDTH_ROLES}
        return f"Plan({len(self.groups)} groups {roles}, {sum(len(b.paths) for b in self.blocks)} blocks)"


def make_plan(captured: Captured) -> Plan:
    """The plan of a captured model: walk its graph once, then its width groups and its blocks."""
    facts = analyze(captured.gm)
    groups = find_groups(facts)
    return Plan(captured, facts, groups, find_blocks(captured.gm, facts))


# --- resolving a width spec into new group sizes -------------------------------------------------------------
def resolve_width(plan: Plan, width) -> dict[int, int]:
    """New size per group id for a multiplier or a role dict; groups left out keep their size."""
    if isinstance(width, dict):
        unknown = set(width) - set(WIDTH_ROLES)
        if unknown:
            raise SpecError(f"unknown width role(s) {sorted(unknown)}: the roles are {list(WIDTH_ROLES)}")
        return _from_dict(plan, width)
    try:
        r = Fraction(str(float(width))).limit_denominator(1000)
    except (TypeError, ValueError):
        raise SpecError(f"width must be a number >= 1 or a dict by role, got {width!r}") from None
    if r < 1:
        raise SpecError(f"width={width} would shrink the model: growir only grows (width >= 1); "
                        f"to keep the width use width=1")
    return _from_ratio(plan, r)


def _scaled(g: Group, r: Fraction, what: str, plan: Plan) -> int:
    n = g.size * r
    if n.denominator != 1:
        raise SpecError(f"width={float(r):g} gives {what} {g.label} of size {g.size} a fractional size "
                        f"{float(n):g}; multipliers that give whole sizes for every group: "
                        f"{', '.join(f'{x:g}' for x in _valid_ratios(plan))}")
    return int(n)


def _valid_ratios(plan: Plan, limit: int = 6) -> list[float]:
    out = []
    for k in range(9, 8 * 4 + 1):
        r = Fraction(k, 8)
        try:
            _from_ratio(plan, r, check_only=True)
        except SpecError:
            continue
        out.append(float(r))
        if len(out) == limit:
            break
    return out


def _from_ratio(plan: Plan, r: Fraction, check_only: bool = False) -> dict[int, int]:
    sizes = {}
    for g in plan.groups:
        if g.role in ("hidden", "ffn") or (g.role == "heads" and not g.per_kv):
            if g.pinned and r != 1:
                continue
            n = g.size * r
            if n.denominator != 1:
                if check_only:
                    raise SpecError("fractional")
                _scaled(g, r, g.role, plan)
            sizes[g.id] = int(n)
    paired = {per.id for _, per in _gqa_pairs(plan)}
    for g in plan.groups:  # one shared kv head (MQA) is a size-1 axis, not a group: it stays one
        if g.per_kv and g.id not in paired:
            n = g.size * r
            if n.denominator != 1:
                if check_only:
                    raise SpecError("fractional")
                _scaled(g, r, "heads", plan)
            sizes[g.id] = int(n)
    for kv, per in _gqa_pairs(plan):
        if kv.pinned and per.pinned and r != 1:
            continue
        total = kv.size * per.size * r
        if per.pinned:  # the kv heads take the whole growth (a pinned count stays what it is)
            kv_new = total / per.size
        elif kv.pinned or (kv.size * r).denominator != 1:
            kv_new = Fraction(kv.size)
        else:
            kv_new = kv.size * r
        per_new = total / kv_new
        if per_new.denominator != 1 or kv_new.denominator != 1:
            if check_only:
                raise SpecError("fractional")
            raise SpecError(f"width={float(r):g} gives {float(total):g} query heads from {kv.size * per.size}: "
                            f"a whole number of query heads per kv head is needed; multipliers that work: "
                            f"{', '.join(f'{x:g}' for x in _valid_ratios(plan))}")
        sizes[kv.id], sizes[per.id] = int(kv_new), int(per_new)
    return sizes


def _gqa_pairs(plan: Plan) -> list[tuple[Group, Group]]:
    """(kv_heads group, per-kv query group) pairs that make one attention's query heads."""
    pairs = []
    for site in plan.facts.attention:
        heads = [plan.group_of(x) for x in plan.facts.ag.leaf_roots(site["q"][1])]
        kv = [g for g in heads if g is not None and g.role == "kv_heads"]
        per = [g for g in heads if g is not None and g.per_kv]
        if kv and per and (kv[0], per[0]) not in pairs:
            pairs.append((kv[0], per[0]))
    return pairs


def _from_dict(plan: Plan, spec: dict) -> dict[int, int]:
    sizes = {}
    grows_head_dim = "head_dim" in spec and any(spec["head_dim"] != plan.facts.ag.size_of(site["q"][-1])
                                                for site in plan.facts.attention)
    if grows_head_dim:
        sizes.update(_head_dim_sizes(plan, spec["head_dim"]))
    for role in ("hidden", "ffn"):
        if role in spec:
            groups = plan.by_role(role)
            if not groups:
                raise SpecError(f"width asks for {role}={spec[role]} but the model has no {role} group")
            for g in groups:
                sizes[g.id] = _checked(spec[role], g, role)
    if "heads" in spec or "kv_heads" in spec:
        paired = {per.id for _, per in _gqa_pairs(plan)}
        for g in plan.by_role("heads"):
            if g.id not in paired:
                sizes[g.id] = _checked(spec.get("heads", g.size), g, "heads")
        for kv, per in _gqa_pairs(plan):
            heads = spec.get("heads", kv.size * per.size)
            kv_new = spec.get("kv_heads")
            if kv_new is None:
                ratio = Fraction(heads, kv.size * per.size)
                kv_new = kv.size * ratio if (kv.size * ratio).denominator == 1 else kv.size
            if heads % kv_new:
                raise SpecError(f"heads={heads} is not a multiple of kv_heads={kv_new}: each kv head serves a "
                                f"whole number of query heads")
            sizes[kv.id], sizes[per.id] = _checked(int(kv_new), kv, "kv_heads"), heads // int(kv_new)
    return sizes


def _head_dim_sizes(plan: Plan, new: int) -> dict[int, int]:
    """head_dim groups at ``new``. A rotary (rotate-half) head_dim is two halves of one group, maybe followed
    by a part that is not rotated (partial rotary); each grows by the same whole factor, so that every old
    frequency lands on a new one (docs/methods.md)."""
    sizes = {}
    for site in plan.facts.attention:
        rotary = rotary_parts(plan.facts.ag, site)
        for axis in (site["q"][-1], site["v"][-1]):
            tree = plan.facts.ag.expand(axis)
            g = plan.group_of(tree) if not is_structured(tree) else None
            if g is not None:
                sizes[g.id] = _checked(new, g, "head_dim")
            elif rotary is not None and axis is site["q"][-1]:
                old = int(plan.facts.ag.size_of(axis))
                if new % old:
                    raise SpecError(f"head_dim={new}: rotary embeddings need head_dim to grow by a whole factor "
                                    f"(so that each old frequency is also a new one): {old} -> "
                                    f"{', '.join(str(old * k) for k in (2, 3, 4))}, ...")
                k = new // old
                for leaf in rotary:
                    if leaf is not None:
                        g = plan.group_of(leaf)
                        sizes[g.id] = _checked(g.size * k, g, "head_dim")
            else:
                raise SpecError("head_dim growth on an attention whose head_dim is split in a way growir does not "
                                "understand (neither one axis nor rotate-half rotary) is not supported: grow heads "
                                "instead")
    for g in plan.by_role("head_dim"):  # attention written out as matmuls
        sizes.setdefault(g.id, _checked(new, g, "head_dim"))
    return sizes


def _checked(value, g: Group, role: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SpecError(f"{role} must be a whole number, got {value!r}")
    if value < g.size:
        raise SpecError(f"{role}={value} is smaller than the model's {g.size}: growir only grows")
    if g.pinned and value != g.size:
        raise SpecError(f"{role} group {g.label} cannot grow: it is {g.pinned}. Growing it would change the "
                        f"model's inputs; wrap the model so that its inputs are token ids or pixels")
    return value


def unused_width_notes(plan: Plan, width, sizes: dict) -> list[str]:
    """What a width multiplier left unchanged: role groups it skipped because they are pinned, or every
    group (no group has a role a multiplier grows). A role dict naming a pinned group is a SpecError."""
    if isinstance(width, dict) or float(width) == 1:
        return []
    notes = []
    skipped = [g for g in plan.groups if g.role in ("hidden", "ffn", "heads") and g.pinned and g.id not in sizes]
    if skipped:
        notes.append(f"width={float(width):g} left {', '.join(g.label for g in skipped)} at their size: "
                     f"{skipped[0].pinned}; nothing grows there")
    notes += _single_head_notes(plan, float(width))
    return notes


def grew_nothing(plan: Plan, width, sizes: dict) -> str:
    """Why a multiplier (not 1) grows no group at all, or "": a SpecError (a growth that grows nothing is no growth;
    it had been a note on a model returned unchanged, which counted as exact)."""
    if isinstance(width, dict) or float(width) == 1 or any(sizes.get(g.id, g.size) != g.size for g in plan.groups):
        return ""
    return (f"width={float(width):g} grew nothing: growir found no group with a role a multiplier grows "
            f"({', '.join(r for r in WIDTH_ROLES if r != 'head_dim')}) that is free to grow; its groups: "
            f"{', '.join(g.label for g in plan.groups[:8])}{' and more' if len(plan.groups) > 8 else ''}. Name a "
            f"group's size in a width dict to grow it (growir.plan(model) lists them), or report the model if its "
            f"hidden width should have been found")


def _single_head_notes(plan: Plan, width: float) -> list[str]:
    """Attention with one query head: its head axis has size 1, which the graph cannot tell from a broadcast,
    so it is no group and a multiplier does not grow it; say so instead of leaving the heads silently at one.
    Attention by ``scaled_dot_product_attention``, or written out (its head axis is a batch axis of size 1)."""
    from .walker import module_of
    ag, nodes = plan.facts.ag, {n.name: n for n in plan.captured.gm.graph.nodes}
    single = [s["node"] for s in plan.facts.attention if ag.size_of(s["q"][1]) == 1]
    single += [r.node for r in plan.facts.reads if r.kind == "batch" and ag.size_of(r.axis) == 1]
    if not single:
        return []
    first = module_of(nodes[single[0]])[0]
    return [f"width={width:g} kept the single-head attention in `{first}` (and {len(set(single)) - 1} more ops) "
            f"at one head: one head is a size-1 axis, which the graph cannot tell from a broadcast, so it is no "
            f"group growir copies and the attention stays as wide as it was; pass width={{'head_dim': ...}} to "
            f"widen it"]
