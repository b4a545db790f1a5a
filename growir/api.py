"""growir's entry points: ``plan`` (what would grow) and ``grow`` (grow it)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field

import torch

from .errors import (AnalysisError, MaterializeError, NotExactError, PreservationError, RewriteError, SpecError,
                     first_line, stage)
from .frontend import capture
from .materialize import release_weights
from .plan import Plan, make_plan, resolve_width, unused_width_notes
from .rebuild import MATERIALIZE, materialize_hf
from .passes.depth import DEPTH_METHODS, depth_rules, schedule, target_layers
from .passes.aki import aki_rules
from .passes.attention import compensate_head_dim, rewrite_scales, rotary_fills
from .passes.exactness import compensate_tied, deviations
from .passes.fill import FillPlan, adjust_norms, open_fill_columns, plan_fill, rewrite_eps
from .passes.fresh import fresh_units, seed_random_fills, split_copies
from .passes.offsets import mark_offsets
from .passes.per_unit import find_unit_constants, freeze_constants, grown_value, rebuilt_values, unit_maps
from .passes.rescale import rescale_residuals, stream_scale
from .passes.size_values import absorb_size_values
from .passes.tensor_rule import rounding_reason
from .passes.width import fpi_index, group_maps, random_index, tree_map, width_rules
from .verify_torch import failing_node, measure, output_maps

WIDTH_METHODS = ("auto", "fresh", "fpi", "fpi_balanced", "fpi_random", "aki")
PRESETS = {"bert2bert": {"width_method": "aki", "depth_method": "stack"}}  # the paper's recipe
TOLERANCE = 1e-5  # max|Δ| <= TOLERANCE * max(1, max|y|) in float32 counts as exact


def plan(model: torch.nn.Module, example_inputs=None) -> Plan:
    """The width groups and blocks growir finds in ``model``; ``print(plan)`` shows them as a table.

    >>> import growir
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> p = growir.plan(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100)))
    >>> len(p.by_role("heads")) > 0
    True
    """
    captured = capture(model, example_inputs)
    with stage("analysing the exported graph", AnalysisError):
        return make_plan(captured)


@dataclass
class GrowthRecord:
    """What a growth did: kept on the grown model as ``growir_record``."""
    plan: Plan
    sizes: dict  # group id -> new size
    layers: dict = field(default_factory=dict)  # block prefix -> (old count, new count, method)
    reasons: list = field(default_factory=list)  # why the growth is not exact (empty: exact)
    deviation: float | None = None  # measured max|Δ| / max(1, max|y|); None: not measured (meta device)
    output_maps: list = field(default_factory=list)  # per flat output, per axis: index map or None
    config_changes: dict = field(default_factory=dict)  # every config field whose value changed
    notes: list = field(default_factory=list)  # what the caller should know beyond exactness (kept groups, ...)
    filled: dict = field(default_factory=dict)  # group label -> fill kind, where repeat-and-fill was used
    width_method: str = ""  # the one used ("auto" resolves to "fresh" or "fpi")
    rules: dict = field(default_factory=dict)  # state_dict name -> TensorRule that made it
    params_before: int = 0
    params_after: int = 0
    rounding: str | None = None  # grown values the source's dtype could not hold exactly (a reason if measurable)
    seconds: float = 0.0  # wall time of the grow call: trace, rules, rebuild, measurement (and --verify)

    @property
    def exact(self) -> bool:
        return not self.reasons

    def __deepcopy__(self, memo):  # the record describes a growth; copies of the model share it
        return self

    def __getstate__(self):  # the plan holds the traced graph (fake tensors): not picklable, not needed
        return {**self.__dict__, "plan": None, "rules": {}}

    def __str__(self) -> str:
        from .report import record_table
        return record_table(self)


@dataclass
class Options:
    width_method: str = "fpi"  # "auto" is resolved by grow() before Options are made
    depth_method: str = "auto"
    seed: int = 0
    noise: float = 0.0
    keep_eps: bool = False  # the rebuilt config cannot express a changed eps: keep it and measure
    unit_values: dict = field(default_factory=dict)  # per-unit constants as the rebuilt model computes them


def grow(model: torch.nn.Module, width=1.0, depth=1.0, *, layers=None, width_method="fpi", depth_method="auto",
         method=None, noise=0.0, example_inputs=None, strict=False, seed=0, verify=False, materialize="auto"):
    """Grow ``model`` wider and deeper, starting from the same function where mathematics allows.

    Returns an instance of the same class for Hugging Face models (config updated), else a rewritten
    ``torch.fx.GraphModule``. The source is never modified. ``grown.growir_record`` says what was done.

    ``width_method``: ``"fpi"`` (the default for now), ``"auto"`` (``"fresh"``, or ``"fpi"`` where only copies
    are exact, e.g. a residual stream that is itself an output and whose norms' eps the config cannot change;
    ``"fpi"`` when ``noise`` is given, since noise breaks the symmetry of copies), ``"fresh"`` (exact and copies
    nothing — the residual stream once plus a zero/mean fill whose readers' columns are random, fresh FFN neurons
    and heads; a post-norm residual is copied; it trained best in benchmarks/savings.py, see docs/savings.md),
    ``"fpi"`` (function-preserving
    copies, and repeat-and-fill for a normalized group whose ratio is not whole, exact for pre-norm models),
    ``"fpi_balanced"`` (copies only, counts differing by at most one), ``"fpi_random"`` (bert2BERT's uniformly
    random copies) or ``"aki"`` (bert2BERT: new units of block l from block l+1; not exact).
    ``method="bert2bert"`` is the paper's recipe (AKI width, stacked depth).
    ``noise=σ`` perturbs split consumer copies by noise that cancels over the copies (relative std σ):
    the function stays exact while copies stop receiving identical gradients (``"fpi"``: fresh has no copies
    except a post-norm residual's).
    ``materialize``: ``"auto"`` rebuilds a Hugging Face model's class from a changed config, or returns the
    rewritten GraphModule with a warning where no config computes the grown function; ``"hf"`` raises
    MaterializeError there instead; ``"graph"`` always returns the GraphModule.

    >>> import growir
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> small = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    >>> big = growir.grow(small, width=2.0, depth=2)
    >>> (big.config.hidden_size, big.config.num_attention_heads, big.config.num_key_value_heads,
    ...  big.config.num_hidden_layers)
    (64, 8, 4, 4)
    """
    if method is not None:
        if method not in PRESETS:
            raise SpecError(f"unknown method {method!r}: the presets are {', '.join(PRESETS)}")
        width_method, depth_method = PRESETS[method]["width_method"], PRESETS[method]["depth_method"]
    if not isinstance(noise, (int, float)) or noise < 0:
        raise SpecError(f"noise must be a number >= 0 (a std relative to each weight's std), got {noise!r}")
    if width_method not in WIDTH_METHODS:
        raise SpecError(f"unknown width_method {width_method!r}: choose one of {', '.join(WIDTH_METHODS)}")
    if depth_method not in DEPTH_METHODS:
        raise SpecError(f"unknown depth_method {depth_method!r}: choose one of {', '.join(DEPTH_METHODS)}")
    if materialize not in MATERIALIZE:
        raise SpecError(f"unknown materialize {materialize!r}: choose one of {', '.join(MATERIALIZE)}")
    started = time.perf_counter()
    p = plan(model, example_inputs)
    with stage("resolving the width spec against the plan", SpecError):
        sizes = resolve_width(p, width)
    wants_depth = layers is not None or float(depth) != 1.0
    if wants_depth and not p.blocks:
        raise SpecError("depth growth asked for, but growir found no repeated blocks in the model")
    depth_plan = [(b, target_layers(b.count, depth, layers)) for b in (p.blocks if wants_depth else [])]
    if width_method == "auto" and noise:  # noise is symmetry breaking for copies: the user asks for copies
        width_method = "fpi"
    opts = Options("fresh" if width_method == "auto" else width_method, depth_method, seed, float(noise))
    built = _grown(model, p, sizes, depth_plan, opts, width, materialize)
    if width_method == "auto" and built.record.reasons:  # copies may still be exact where fresh is not
        copies = _grown(model, p, sizes, depth_plan, dataclasses.replace(opts, width_method="fpi"), width,
                        materialize)
        built = copies if not copies.record.reasons else built
    if strict and built.record.reasons:
        raise NotExactError("strict=True and this growth cannot be exact: " + "; ".join(built.record.reasons))
    record, grown = built.record, built.grown
    record.params_before = sum(t.numel() for t in model.parameters())
    record.params_after = sum(t.numel() for t in grown.parameters())
    record.deviation = _measure(model, built, p)
    if record.rounding and (record.deviation or 0.0) > TOLERANCE:  # rounding below the float32 tolerance is harmless
        record.reasons.append(record.rounding)
        if strict:
            raise NotExactError("strict=True and this growth is not exact: " + record.rounding)
    grown.growir_record = record
    _judge(record, verify, model, grown)
    release_weights(p.captured.gm)  # the record keeps the graph, not the source's weights
    record.seconds = time.perf_counter() - started
    return grown


def _grown(model, p: Plan, sizes: dict, depth_plan: list, opts: Options, width, materialize) -> "_Built":
    with stage("computing the grown tensors and rewriting the graph"):
        built = _build(p, sizes, depth_plan, opts)
    notes = unused_width_notes(p, width, sizes) + _aki_notes(p, built.record, opts.width_method)
    for note in notes:
        warnings.warn("growir: " + note, stacklevel=3)
    built.record.notes += notes + ([f"the graph was exported at fixed shapes ({p.captured.static})"]
                                   if p.captured.static else [])
    if p.captured.is_hf:
        with stage("rebuilding the model's class from its config", MaterializeError):
            built = materialize_hf(model, p, sizes, depth_plan, opts, built, _build, materialize)
    return built


@dataclass
class _Built:
    record: GrowthRecord
    state: dict
    grown: torch.nn.Module
    maps: dict
    eps_values: dict = field(default_factory=dict)  # old eps -> new eps (repeat-and-fill), for the config
    units: list = field(default_factory=list)  # per-unit constants (ALiBi slopes): read back from a rebuilt model


@dataclass
class _Width:
    maps: dict
    rules: dict
    reasons: list
    graph_edits: list  # functions that rewrite the copied graph (sizes, scales, eps)
    eps_values: dict
    filled: dict
    units: list
    stream_scales: dict = field(default_factory=dict)  # group root -> c: that residual stream is c x its copies


def _width(p: Plan, sizes: dict, opts: Options) -> _Width:
    """Index maps and per-tensor rules for the width spec, with every compensation and its reasons."""
    from .passes.constants import rewrite_constants
    fresh = opts.width_method == "fresh"
    fp = plan_fill(p, sizes, every=fresh) if opts.width_method in ("fpi", "fresh") else FillPlan()
    index_fn = random_index if opts.width_method == "fpi_random" else fpi_index
    new_units = fresh_units(p, sizes, fp) if fresh else {}
    maps = group_maps(p, sizes, opts.seed, index_fn, {**fp.fills, **new_units, **rotary_fills(p, sizes)}, fresh)
    units = find_unit_constants(p, maps)
    placed, unit_reasons = unit_maps(units, opts.unit_values)  # old units where the rebuilt values match
    maps.update(placed)
    frozen = {c.node: opts.unit_values.get(c.node, grown_value(c, maps)) for c in units}
    wres = width_rules(p, maps)
    mark_offsets(p, wres.rules)
    size_literals, kept_values = absorb_size_values(p, maps, wres)  # before compensate_tied: it reads the scale
    hd_reasons, compensated, scales = compensate_head_dim(p, maps, wres)
    rescaled = rescale_residuals(p, fp, maps, wres.rules)
    eps, eps_values = adjust_norms(fp, maps, wres.rules, rescaled)
    open_fill_columns(p, fp, maps, wres.rules, "random" if fresh else "copy")
    if fresh:
        split_copies(p, fp.copied, wres.rules)
    reasons = (deviations(p, maps, compensated | {(root, "norm") for root in fp.fills})
               + compensate_tied(p, maps, wres) + hd_reasons
               + [f"repeat-and-fill cannot make {p.group_of(r).label} exact: {why}" for r, why in fp.reasons.items()]
               + unit_reasons)
    if opts.keep_eps and eps:
        eps, eps_values = {}, {}
        reasons.append("the rebuilt config cannot express the norms' rescaled eps (repeat-and-fill), so eps was "
                       "kept: the error is about eps / var(x), measured below")
    if opts.width_method == "aki" and aki_rules(p, maps, wres.rules):
        reasons.append("AKI gives the new units of each block the next block's weights (bert2BERT): "
                       "not function-preserving by design")
    if opts.noise:
        _add_noise(wres.rules, opts)
    edits = [lambda g: rewrite_constants(p, maps, g), lambda g: rewrite_scales(g, scales),
             lambda g: rewrite_eps(g, eps), lambda g: rewrite_eps(g, size_literals),
             lambda g: freeze_constants(g, frozen)]
    filled = {p.group_of(root).label: kind for root, kind in {**fp.fills, **new_units}.items()}
    filled.update({p.group_of(root).label: f"copies ({why})" for root, why in fp.copied.items()})
    return _Width(maps, wres.rules, reasons, edits, eps_values, filled, units,
                  {r: stream_scale(maps[r]) for r in rescaled})


def growth_rules(p: Plan, sizes: dict, depth_plan: list, opts: Options, counts: dict | None = None):
    """Per-tensor rules for a width and depth spec; no weights needed (a meta-device plan will do).

    ``counts`` (block list prefix -> full block count) expands the rules of a two-block proxy's plan to the
    full model (``growir.checkpoint``). Returns (width, rules, schedules, layer info, reasons).
    """
    from .checkpoint import expand_block_rules
    w = _width(p, sizes, opts)
    counts = counts or {}
    rules = expand_block_rules(w.rules, counts)
    schedules, layer_info, reasons = [], {}, list(w.reasons)
    for b, new in depth_plan:
        if b.prefix in counts:
            b = dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(counts[b.prefix])])
        sched = schedule(b, new, opts.depth_method)
        rules.update(depth_rules(sched, rules))
        schedules.append(sched)
        layer_info[b.prefix] = (b.count, new, sched.method)
        if not sched.exact:
            reasons.append(f"depth growth of `{b.prefix}` by `{sched.method}` is not function-preserving"
                           + (" (its blocks are post-norm)" if sched.method == "identity" else ""))
    seed_random_fills(rules, p.facts.aliases, opts.seed)
    return w, rules, schedules, layer_info, reasons


def _build(p: Plan, sizes: dict, depth_plan: list, opts: Options) -> _Built:
    """Index maps -> per-tensor rules -> grown tensors -> rewritten GraphModule."""
    from .materialize import build_graph_module
    w, rules, schedules, layer_info, reasons = growth_rules(p, sizes, depth_plan, opts)
    source_state, state, rounded = _state(p), {}, []
    for name, rule in rules.items():
        state[name], lossy = rule.apply_checked(source_state[rule.source], source_state.get(rule.donor))
        rounded += [name] if lossy else []
    gm = p.captured.gm
    params = set(dict(gm.named_parameters(remove_duplicate=False))) | (
        set(rules) - set(dict(gm.named_buffers(remove_duplicate=False))))
    grown = build_graph_module(gm, state, params, schedules, lambda g: [edit(g) for edit in w.graph_edits],
                               p.facts.aliases)
    record = GrowthRecord(p, dict(sizes), layer_info, reasons, output_maps=output_maps(p, w.maps), rules=rules,
                          filled=w.filled, rounding=rounding_reason(rounded, state) if rounded else None,
                          width_method=opts.width_method)
    return _Built(record, state, grown, w.maps, w.eps_values, w.units)


def _add_noise(rules: dict, opts: Options) -> None:
    """Symmetry breaking on every consumer axis that has copies (each tensor its own seeded draw)."""
    for k, (name, rule) in enumerate(sorted(rules.items())):
        if rule.has_copies_to_perturb() and not rule.zero:
            rules[name] = dataclasses.replace(rule, noise=(opts.noise, opts.seed * 100003 + k))


def _judge(record: GrowthRecord, verify: bool, model, grown) -> None:
    if record.deviation is None:  # a meta-device model: the theorem's verdict only, said as such
        if verify:
            raise SpecError("verify=True needs weights, but the model is on the meta device: grow the real model")
        if not record.exact:
            warnings.warn("growir: the grown model is not function-preserving (not measured: meta device): "
                          + "; ".join(record.reasons), stacklevel=3)
        return
    if record.exact and record.deviation > TOLERANCE:
        raise PreservationError(f"this growth should be exact but its outputs moved by {record.deviation:.3g} "
                                f"(relative to max(1, max|y|)); this is a growir bug: please report it with "
                                f"the model's config")
    if not record.exact:
        warnings.warn(f"growir: the grown model is not function-preserving (measured deviation "
                      f"{record.deviation:.3g}): " + "; ".join(record.reasons), stacklevel=3)
    if verify:
        from .verify import check
        report = check(model, grown)
        record.check = report
        if record.exact and not report.preserved:
            raise PreservationError(f"ONNX Runtime says the grown model does not preserve the function:\n{report}")


def _state(p: Plan) -> dict:
    gm = p.captured.gm
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


def _aki_notes(p: Plan, record: GrowthRecord, width_method: str) -> list[str]:
    """Where AKI (new units from the next block) did not apply, the groups grew by FPI: say so."""
    if width_method != "aki" or not record.sizes:
        return []
    notes = [f"width_method='aki' skipped blocks `{b.prefix}` ({b.why_not}): their groups grew by FPI"
             for b in p.blocks if not b.homogeneous]
    if not any(rule.donor for rule in record.rules.values()):
        notes.append("width_method='aki' found no group inside a block to initialize from the next block "
                     "(AKI applies to a block's own FFN units and heads): every group grew by FPI")
    return notes


def _measure(model, built: _Built, p: Plan) -> float:
    """The self-measure; a grown model that fails to run is a RewriteError naming the op that failed."""
    try:
        return measure(model, built.grown, p.captured, built.record.output_maps)
    except Exception as exc:  # noqa: BLE001 - re-raised as a GrowthError, the original chained
        at = failing_node(built.grown, p.captured)
        raise RewriteError(f"the grown model fails to run{at}: {type(exc).__name__}: {first_line(exc)}. growir "
                           f"grew a size this op depends on without rewriting the op (an argument above holds the "
                           f"old size); the source is unchanged. Grow other roles, or report the op") from exc
