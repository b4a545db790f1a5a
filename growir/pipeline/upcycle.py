"""Dense → mixture of experts (upcycling) into a target config of another class: ``grow(dense, into=moe_config)``.

Both models are exported with the same inputs and their graphs aligned op for op (``analysis/align.py``): every
parameter outside the FFNs pairs with the target parameter consumed at the same position and is copied; each
place where the graphs differ must be one dense FFN against one MoE layer, whose chains that compute the FFN
(``analysis/router.py``) receive it by the construction that the router makes exact (``passes/upcycle.py``,
measured on the region itself). The router's matrices are drawn at N(0, 1/fan_in), seeded (``draw_routers``: the
symmetry breaker, decisive from the first step); gates and everything else keep the target's seeded initialisation. The grown model is the target's own class, measured against the source on fresh
inputs; the record says, per MoE layer, the construction, the router's ops and why it is exact.
"""

from __future__ import annotations

import copy
import operator
import time

import torch
import torch.utils._pytree as pytree

from ..analysis.align import align
from ..analysis.router import chains, router_ops
from ..analysis.walker import where
from ..errors import NotExactError, SpecError, warn
from ..frontend.export import capture
from ..passes.upcycle import CONSTRUCTIONS, Construction, build, draw_routers, evaluate, factor
from ..verify.compare import TOLERANCE
from ..verify.measure import inputs_at, long_sizes, measure
from .record import GrowthRecord
from .target import bookkeeping


def upcycle(model, config, cls, seed: int = 0, strict: bool = False):
    """``model`` grown into ``cls(config)``, an MoE of the same graph outside its FFNs (see the module docstring).
    SpecError where the graphs do not correspond; a warning with the measured deviation where no construction
    is exact (NotExactError under ``strict``). Weights below float32 are upcycled and measured in float32, then
    stored in the model's dtype."""
    started = time.perf_counter()
    dtype = next(model.parameters()).dtype
    work = model.eval() if dtype == torch.float32 else copy.deepcopy(model).float().eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        target = cls(config).float().eval()
    src_cap, done = _build(work, target, dtype, torch.Generator().manual_seed(seed))
    record = GrowthRecord(plan=None, sizes={}, width_method="upcycle")
    record.notes = [f"{where(r.output[1])}: {c.name} (factor {c.factor:.6g}); router: {' -> '.join(ops)}; {c.why}"
                    + (f"; router drawn from N(0, 1/fan_in), seed {seed} ({', '.join(drawn)})" if drawn else "")
                    for r, c, ops, drawn in done]
    record.reasons = [f"{where(r.output[1])}: no construction is exact for this router ({c.name}: per-token miss "
                      f"{c.spread:.2e}{_SHARDS if c.name == 'shards' else ''})" for r, c, _, _ in done if not c.exact]
    record.params_before = sum(p.numel() for p in model.parameters())
    record.params_after = sum(p.numel() for p in target.parameters())
    record.deviation = _measure(work, target, src_cap)
    record.measured = "the source and the grown model in float32 on two fresh input shapes"
    if record.deviation > TOLERANCE and not record.reasons:
        record.reasons.append(f"measured deviation {record.deviation:.2e} exceeds {TOLERANCE:g}")
    if dtype != torch.float32:
        target.to(dtype)
        record.notes.append(f"stored in {dtype}: measured in float32 before the cast (scaled weights round)")
    if record.reasons:
        message = f"upcycling is not exact: {'; '.join(record.reasons)}"
        if strict:
            raise NotExactError(message)
        warn(message)
    record.seconds = time.perf_counter() - started
    target.growir_record = record
    return target


# why fine-grained experts miss: a router chooses experts, not copies
_SHARDS = ("; the shards of one copy are chosen together only where top-k is a multiple of the shards per copy, "
           "and a router cannot keep them together in general")


def _build(model, target, dtype, generator: torch.Generator):
    """Align the two graphs, copy the paired parameters into ``target`` and write each region's construction.
    Returns (the model's capture, [(region, Construction, the router's ops, the router matrices drawn)])."""
    cls = type(target)
    src_cap, tgt_cap = capture(model), capture(target)
    try:
        al = align(src_cap.gm, tgt_cap.gm)
    except SpecError as error:
        said = str(error).removeprefix("into: ")
        raise SpecError(f"into a {cls.__name__} from a {type(model).__name__}: {said} (growing another class "
                        f"makes experts of FFNs; the sizes outside them must be the model's)") from None
    if not al.regions:
        raise SpecError(f"into: the {cls.__name__}'s graph computes what the model's does with no layer replaced: "
                        f"nothing to upcycle (grow into a target of the model's own class instead)")
    state, source = target.state_dict(), model.state_dict()
    with torch.no_grad():
        for t_name, s_name in al.params.items():
            if t_name in state and s_name in source:
                state[t_name].copy_(source[s_name])
        _check_computed(src_cap.gm, target, tgt_cap.gm, al, state, model.config, dtype)
        env = _region_inputs(tgt_cap, al, state)
        return src_cap, [_upcycle_region(r, al, state, source, env, generator) for r in al.regions]


def _check_computed(src_gm, target, tgt_gm, al, state: dict, src_config, dtype) -> None:
    """Tensors the target computes from its config (a rotary table) must equal the source's, up to the rounding
    to the source's ``dtype`` (then the source's values are kept): SpecError naming the config fields the two set
    differently."""
    for t_name, s_name in al.params.items():
        if t_name in state:
            continue
        a, b = operator.attrgetter(s_name)(src_gm), operator.attrgetter(t_name)(tgt_gm)
        # equal as computed (a bfloat16 model keeps its rotary table in float32), or after the rounding to dtype
        if a.shape == b.shape and (torch.equal(a, b) or torch.equal(a, b.to(dtype).to(a.dtype))):
            b.copy_(a)
            operator.attrgetter(t_name)(target).copy_(a)
        else:
            src, tgt = src_config.to_dict(), target.config.to_dict()
            fields = [k for k in tgt if k in src and not bookkeeping(k) and src[k] != tgt[k]]
            raise SpecError(f"into: the target computes `{t_name}` other than the model's `{s_name}` (the configs "
                            f"differ in {', '.join(fields) or 'their defaults'}): set the target's to the model's")


def _region_inputs(tgt_cap, al, state: dict) -> dict:
    """Target node -> its value on many tokens, for every node a region reads (one run of the target's graph)."""
    want = {b for r in al.regions for b in _reads(r.target)}
    args, kwargs = inputs_at(tgt_cap, long_sizes(tgt_cap, 64, 4))
    seen = {}

    class _Recording(torch.fx.Interpreter):
        def fetch_attr(self, target):
            return state[target] if target in state else super().fetch_attr(target)

        def run_node(self, n):
            out = super().run_node(n)
            if n in want:
                seen[n] = out
            return out

    _Recording(tgt_cap.gm).run(*pytree.tree_leaves((args, kwargs)))
    return seen


def _reads(nodes: list) -> set:
    inside = set(nodes)
    return {a for n in nodes for a in n.all_input_nodes if a not in inside}


def _upcycle_region(region, al, state: dict, source: dict, env: dict, generator: torch.Generator):
    """Write the first exact construction for one region (else the closest, scaled by its mean factor).
    Returns (region, Construction, the router's ops, the router matrices drawn)."""
    found = chains(region, al.pairs)
    if not found:
        raise SpecError(f"into: no chain of the target's layer ending at {where(region.output[1])} computes the "
                        f"model's FFN ending at {where(region.output[0])} (the same ops on weights of at least its "
                        f"sizes): the target's experts are not the FFN's kind")
    chain_params = set().union(*(c.params for c in found))
    routers, ops = router_ops(region, chain_params)
    gates = {n.target for n in region.target if n.op == "get_attr"} - chain_params - routers
    experts = max((state[t.param].shape[0] for c in found for _, t in c.pairs if t.expert), default=1)
    drawn = draw_routers(state, routers, experts, generator)
    parts = (found, routers, gates, experts)
    saved = {k: state[k].clone() for k in chain_params | routers | gates}
    t_env = {n: env[n] for n in _reads(region.target)}
    s_env = {s: env[t] for s, t in al.pairs.items() if t in env and s in _reads(region.source)}
    ffn = evaluate(region.source, s_env, source)[region.output[0]]
    tried = []
    for name, why in CONSTRUCTIONS:
        _restore(state, saved)
        if build(name, state, source, *parts):
            c, miss = factor(evaluate(region.target, t_env, state)[region.output[1]], ffn)
            tried.append(Construction(name, c, miss, why.format(c=f"{c:.6g}")))
            if tried[-1].exact:
                break
    if not tried:
        raise SpecError(f"into: the experts of the target's layer ending at {where(region.output[1])} are smaller "
                        f"than the model's FFN and no shared expert holds it: no construction carries the FFN")
    best = next((c for c in tried if c.exact), min(tried, key=lambda c: c.spread))
    _restore(state, saved)
    build(best.name, state, source, *parts, scale=1.0 / best.factor)
    return region, best, ops, drawn


def _restore(state: dict, saved: dict) -> None:
    for k, v in saved.items():
        state[k].copy_(v)


def _measure(model, target, captured) -> float:
    """The largest deviation of the grown model's outputs from the source's on two fresh input shapes (longer
    than the example's, so the router sees many tokens): ``verify.measure`` at each."""
    return max(measure(model, target, captured, [], sizes=long_sizes(captured, length, batch))
               for length, batch in ((13, 3), (7, 2)))
