"""``growir doctor``: what growir found in a model, in plain words, and what can grow exactly and why.

Every statement comes from the plan (the analysis facts of the traced graph), never from names: blocks and
whether a norm sits on their residual path, the norm ops and the groups they average over, each attention's
query and key head counts and whether its head_dim is rotary, tensors the graph reads under two names or
both copies and contracts (tied embedding and head). The growth verdicts are dry runs of growir's own rules
on the plan (no tensor is built), so they say exactly what ``growir.grow`` would report, before the
Hugging Face config is rebuilt.

>>> import growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> d = growir.doctor(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)))
>>> [line for line in d.facts if line.startswith("attention")]
['attention: 2 x grouped-query (4 query heads share 2 kv heads), head_dim 8, rotary']
>>> d.verdicts["depth x2"][0]
'exact'
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .analysis.norms import is_square
from .analysis.ops import MEAN, op_name, traits
from .errors import GrowthError
from .analysis.plan import Plan, resolve_width


@dataclass
class Diagnosis:
    """Plain-words facts about a model (``facts``) and growth verdicts (``verdicts``: name -> (verdict, why))."""
    model: str
    facts: list = field(default_factory=list)
    verdicts: dict = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"growir doctor: {self.model}", "found in the graph:"] + [f"  {f}" for f in self.facts]
        lines.append("what can grow (dry runs of growir's rules on this graph; `growir grow` measures it too):")
        width = max(len(k) for k in self.verdicts) if self.verdicts else 0
        for name, (verdict, why) in self.verdicts.items():
            lines.append(f"  {name.ljust(width)}  {verdict}" + (f": {why}" if why else ""))
        return "\n".join(lines)


def doctor(model, example_inputs=None) -> Diagnosis:
    """Trace ``model`` and describe what growir finds and what it can grow exactly (see the module docstring)."""
    from .api import plan as make_plan
    return diagnose(make_plan(model, example_inputs), type(model).__name__)


def diagnose(p: Plan, name: str = "model", counts: dict | None = None) -> Diagnosis:
    """The Diagnosis of an existing plan; ``counts``: the real block counts where ``p`` was made on a proxy."""
    per = _stands_for(p, counts or {})
    facts = _blocks(p, counts or {}) + _norms(p, per) + _attention(p, per) + _tied(p) + _groups(p, counts or {})
    return Diagnosis(name, facts, _verdicts(p))


def _blocks(p: Plan, counts: dict) -> list[str]:
    if not p.blocks:
        return ["blocks: none repeated (depth cannot grow)"]
    out = []
    for b in p.blocks:
        kind = ("pre-norm (no norm on the residual path from a block's input to its output)" if b.pre_norm else
                "post-norm (a norm on the residual path between a block's input and its output)")
        line = f"blocks: `{b.prefix}`, {counts.get(b.prefix, b.count)} of the same ops and shapes, {kind}"
        out.append(line + ("" if b.homogeneous else f"; not copyable: {b.why_not}"))
    return out


def _stands_for(p: Plan, counts: dict) -> dict:
    """node name -> how many nodes of the full model it stands for: on a proxy that keeps k of a list's n
    blocks, each proxy block's node stands for n / k (the blocks are identical in structure)."""
    out = {}
    for b in p.blocks:
        if counts.get(b.prefix) and b.count:
            out.update({getattr(n, "name", n): counts[b.prefix] / b.count for nodes in b.nodes for n in nodes})
    return out


def _group_stands_for(p: Plan, g, counts: dict) -> float:
    """How many groups of the full model ``g`` stands for: a group whose parameters all sit in one proxy block
    (a block's FFN, its heads) is one of n / k; a group across blocks (the residual stream) is one."""
    params = {a.param for a in g.producers + g.consumers}
    for b in p.blocks:
        if counts.get(b.prefix) and b.count and params and any(
                all(x.startswith(path + ".") for x in params) for path in b.paths):
            return counts[b.prefix] / b.count
    return 1


def _norms(p: Plan, per: dict) -> list[str]:
    nodes = {n.name: n for n in p.captured.gm.graph.nodes}
    kinds = Counter()
    for g in p.groups:
        for r in g.reads:
            if r.kind == "norm" and r.node in nodes:
                kinds[(_norm_kind(nodes[r.node]), _role(g))] += per.get(r.node, 1)
    if not kinds:
        return ["norms: none"]
    return ["norms: " + "; ".join(f"{round(n)} x {op} over {role}" for (op, role), n in sorted(kinds.items()))]


def _norm_kind(node) -> str:
    op = op_name(node)
    if MEAN(node) and node.args and is_square(node.args[0]):
        return "RMS norm (a mean of squares, aten.mean)"
    return f"{traits(node).label} ({op})" if traits(node).label else f"a mean ({op})"


def _role(g) -> str:
    return "query heads per kv head" if g.per_kv else (g.role or "-")


def _attention(p: Plan, per: dict) -> list[str]:
    from .analysis.rotary import rotary_parts
    ag, kinds = p.facts.ag, Counter()
    for site in p.facts.attention:
        q, k, d = (int(ag.size_of(a)) for a in (site["q"][1], site["k"][1], site["q"][-1]))
        heads = [p.group_of(x) for x in ag.leaf_roots(site["q"][1])]
        kv = next((g.size for g in heads if g is not None and g.role == "kv_heads"), None)
        replicated = any(g is not None and g.per_kv for g in heads)
        kv = kv if kv is not None else (1 if replicated or k == 1 else k)  # a size-1 kv axis is no group
        if kv == q:
            kind = f"multi-head ({q} heads)"
        elif kv == 1:
            kind = f"multi-query ({q} query heads share 1 kv head)"
        else:
            kind = f"grouped-query ({q} query heads share {kv} kv heads)"
        rot = rotary_parts(p.facts.ag, site)
        rotary = "not rotary" if rot is None else ("rotary" if rot[1] is None else "partial rotary")
        kinds[f"{kind}, head_dim {d}, {rotary}"] += per.get(site["node"], 1)
    if not kinds and p.by_role("head_dim"):
        return ["attention: written out as matmuls (query-key contraction found, no fused attention op)"]
    return [f"attention: {round(n)} x {k}" for k, n in kinds.items()] or ["attention: none found"]


def _tied(p: Plan) -> list[str]:
    f = p.facts
    names = {}
    for alias, used in sorted(f.aliases.items()):
        names.setdefault(used, [used]).append(alias)
    both = {name for name, _, _ in f.consumed} & f.produced
    out = []
    for used in sorted(names.keys() | both):
        one = " and ".join(f"`{n}`" for n in names.get(used, [used]))
        what = ("used as an embedding (copied) and as the head (contracted)" if used in both else
                "shared")
        out.append(f"tied: {one}" + (" are one tensor, " if used in names else " is ") + what)
    return out or ["tied weights: none"]


def _groups(p: Plan, counts: dict) -> list[str]:
    roles = Counter()
    for g in p.groups:
        if g.role:
            roles[(_role(g), g.size)] += _group_stands_for(p, g, counts)
    pinned = sorted({g.pinned for g in p.groups if g.pinned})
    line = "width groups: " + ", ".join(f"{role} {size}" + (f" (x{round(n)})" if n > 1 else "")
                                        for (role, size), n in roles.items())
    return [line] + ([f"fixed: {len(pinned)} group(s), e.g. {pinned[0]}"] if pinned else [])


def _verdicts(p: Plan) -> dict:
    out = {"width x2": _width_verdict(p, 2.0), "width x1.5": _width_verdict(p, 1.5)}
    dims = sorted({int(p.facts.ag.size_of(s["q"][-1])) for s in p.facts.attention}
                  or {g.size for g in p.by_role("head_dim")})
    if len(dims) == 1:
        out["head_dim x2"] = _width_verdict(p, {"head_dim": 2 * dims[0]})
    out["depth x2"] = _depth_verdict(p)
    return out


def _width_verdict(p: Plan, spec) -> tuple[str, str]:
    from .api import Options, growth_rules
    try:
        reasons = growth_rules(p, resolve_width(p, spec), [], Options())[0].reasons
    except GrowthError as error:
        return "refused", " ".join(str(error).split())
    return ("exact", "") if not reasons else ("not exact (strict=True refuses)", "; ".join(reasons))


def _depth_verdict(p: Plan) -> tuple[str, str]:
    from .passes.depth import schedule
    if not p.blocks:
        return "refused", "no repeated blocks"
    verdicts = []
    for b in p.blocks:
        if not b.homogeneous:
            verdicts.append(("refused", f"`{b.prefix}`: {b.why_not}"))
            continue
        sched = schedule(b, 2 * b.count, "auto")
        why = (f"`{b.prefix}`: new blocks by `{sched.method}`, their residual writers zeroed" if sched.exact else
               f"`{b.prefix}`: post-norm, so new blocks by `{sched.method}` change the function (no depth "
               f"method can be exact here)")
        verdicts.append(("exact" if sched.exact else "not exact (strict=True refuses)", why))
    worst = next((v for v in verdicts if v[0] != "exact"), verdicts[0])
    return worst[0], "; ".join(why for _, why in verdicts)
