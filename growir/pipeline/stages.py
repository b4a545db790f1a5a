"""The passes of every stage but the rules (``pipeline/rules.py``): plan (capture, analyse), spec (sizes,
depth), materialize (grown tensors, rewritten graph, record, the class rebuilt) and check (measure, judge).

``grow`` plans on a two-block meta proxy where one stands in for the model (``frontend/proxy.py``): the model is
exported once, and the rebuilt class is measured on the real source once. An exact growth builds no GraphModule;
one that is not exact (a post-norm stack, AKI) checks the rebuilt class against the proxy's graph with its blocks
copied out to the full grown lists (``materialize.graph.proxy_schedules``). Where the proxy cannot do (no config
rebuilds the class, the proxy's graph is not a chain of blocks or holds blocks of several kinds), the growth
starts again on the full capture (a pass raises ``manager.Restart``, the driver runs the stages again) and
``record.capture`` and ``record.reruns`` say why.

Each pass is a small function of the one ``Context``, declared (``manager.declare``) with what it reads, writes
and mutates; the stage lists at the end give the order. A pass that warns
uses ``errors.warn``, which points the warning at the caller's line, the first frame outside growir.
"""

from __future__ import annotations

import dataclasses

from ..frontend.proxy import (NoProxy, check_plan, expand_names, full_capture, make_model_proxy, source_tensors,
                             state_of)
from ..passes.depth import schedule
from .context import Built, Context
from ..errors import (AnalysisError, MaterializeError, NotExactError, PreservationError, RewriteError, SpecError,
                      GrowthError, TraceError, first_line, warn)
from ..frontend.export import capture
from ..frontend.inputs import example_inputs_for
from .manager import Restart, declare, run_passes
from ..materialize.graph import build_graph_module, off_meta, proxy_schedules, release_weights
from ..materialize.hf import output_only_sizes
from ..materialize.reload import reload_check
from ..materialize.unread import kept_note
from ..passes.depth import target_layers
from .rules import RULES
from ..ir.tensor_rule import rounding_reason
from ..analysis.plan import grew_nothing, make_plan, resolve_width, unused_width_notes
from .record import GrowthRecord
from ..verify.compare import TOLERANCE, output_maps
from ..verify.measure import export_gap, failing_node, measure

MEASURED = "the real source and grown models in float32 at the example inputs and a second shape"
_EXPORT, _ANALYSE, _SPEC = "exporting the model", "analysing the exported graph", "resolving the growth spec"
_CLASS, _CHECK = "rebuilding the model's class from its config", "measuring the grown model"


# --- plan -----------------------------------------------------------------------------------------------------
@declare(reads=("model", "example_inputs?"), writes=("captured",), name="capture", what=_EXPORT, error=TraceError)
def _capture(c) -> None:
    c.captured = capture(c.model, c.example_inputs)


@declare(reads=("captured",), writes=("plan",), name="analyse", what=_ANALYSE, error=AnalysisError)
def _analyse(c) -> None:
    c.plan = make_plan(c.captured)


@declare(reads=("model", "example_inputs?", "materialize", "how?", "proxy?"),
         writes=("captured", "proxy?", "counts", "how"), name="capture", what=_EXPORT, error=TraceError)
def _capture_in_memory(c) -> None:
    """grow: the two-block meta proxy where one stands in for the model, else the full model (``c.how``)."""
    if not c.how:  # a restarted growth has said why it captures the full model
        try:
            c.proxy = make_model_proxy(c.model, c.materialize)
            c.counts, c.how = c.proxy.counts, c.proxy.describe()
        except NoProxy as why:
            c.how = full_capture(why)
    if c.proxy is None:
        c.captured = capture(c.model, c.example_inputs)
        return
    try:
        c.captured = capture(c.proxy.model, c.example_inputs)  # a meta model is traced with CPU inputs
    except GrowthError as err:  # the full capture says the same, or succeeds
        raise Restart(full_capture(f"the proxy could not be captured ({type(err).__name__})"), (_capture_in_memory,))
    c.captured.args, c.captured.kwargs = example_inputs_for(c.model, c.example_inputs)  # the real model's


@declare(reads=("captured", "proxy?"), writes=("plan",), name="analyse", what=_ANALYSE, error=AnalysisError)
def _analyse_in_memory(c) -> None:
    if c.proxy is None:
        c.plan = make_plan(c.captured)
        return
    try:
        c.plan = make_plan(c.captured)
        check_plan(c.plan, c.proxy)
    except (GrowthError, NoProxy) as why:
        raise Restart(full_capture(why if isinstance(why, NoProxy) else f"the proxy could not be analysed "
                                   f"({type(why).__name__})"), PROXY_PLAN)


# --- spec -----------------------------------------------------------------------------------------------------
@declare(reads=("plan", "width", "model?", "materialize"), writes=("sizes",), what=_SPEC, error=SpecError)
def _sizes(c) -> None:
    """The new size of each group; where a model's class is rebuilt, an output-only group's (a pooler's) as the
    config will most likely size it, so the rules are made once (streaming sizes it from the chosen config)."""
    c.sizes = resolve_width(c.plan, c.width)
    nothing = grew_nothing(c.plan, c.width, c.sizes)
    if nothing:
        raise SpecError(nothing)
    if c.model is not None and c.plan.captured.is_hf and c.materialize != "graph":
        c.sizes = output_only_sizes(c.plan, c.sizes)


@declare(reads=("plan", "depth", "layers?", "counts"), writes=("depth_plan",), what=_SPEC, error=SpecError)
def _depth_plan(c) -> None:
    wants_depth = c.layers is not None or float(c.depth) != 1.0
    if wants_depth and not c.plan.blocks:
        raise SpecError("depth growth asked for, but growir found no repeated blocks in the model")
    c.depth_plan = [(b, target_layers(c.counts.get(b.prefix, b.count), c.depth, c.layers))
                    for b in (c.plan.blocks if wants_depth else [])]


@declare(reads=("proxy?", "plan", "depth_plan", "counts", "opts"), what=_SPEC, error=SpecError)
def _proxy_depth(c) -> None:
    """Decided before any rule is made: a depth growth that cannot be exact is checked against the rewritten
    full graph; where the proxy's graph cannot be copied out to it, the full model is captured now, once."""
    if c.proxy is None or not _no_proxy_graph(c):
        return
    for b, new in c.depth_plan:
        sched = schedule(_full_blocks(b, c.counts), new, c.opts.depth_method)
        if not sched.exact:
            raise Restart(full_capture(f"the growth is not exact (depth growth of `{b.prefix}` by `{sched.method}`) "
                                       f"and {_no_proxy_graph(c)}"), PROXY_PLAN + SPEC)


def _full_blocks(b, counts: dict):
    """A proxy's block list as the full model's (its count), for what counts blocks."""
    return dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(counts.get(b.prefix, b.count))])


# --- materialize ----------------------------------------------------------------------------------------------
@declare(reads=("plan", "rules", "proxy?"), writes=("state", "rounded"))
def _apply_rules(c) -> None:
    """Each rule applied to its source tensor (and AKI donor), computed in float32, cast once."""
    gm = c.plan.captured.gm
    source = source_tensors(c.proxy, c.rules) if c.proxy is not None else state_of(gm)
    c.state, c.rounded = {}, []
    for name, rule in c.rules.items():
        c.state[name], lossy = rule.apply_checked(source[rule.source], source.get(rule.donor))
        c.rounded += [name] if lossy else []


@declare(reads=("plan", "rules", "state", "schedules", "graph_edits", "proxy?", "reasons", "counts"),
         writes=("graph?",))
def _rewrite_graph(c) -> None:
    """The rewritten GraphModule. On a proxy's plan only where the growth is not exact (the rebuilt class is then
    checked against it): the proxy's graph, its blocks copied out to the full grown lists."""
    c.graph = None
    if c.proxy is not None and not c.reasons:
        return
    gm, schedules = c.plan.captured.gm, c.schedules
    buffers = set(dict(gm.named_buffers(remove_duplicate=False)))
    if c.proxy is not None:
        schedules, buffers = proxy_schedules(c.plan.blocks, c.schedules, c.counts), expand_names(buffers, c.counts)
        if isinstance(schedules, str):
            raise MaterializeError(f"the growth is not exact and {schedules}: the full graph is the reference")
    params = set(dict(gm.named_parameters(remove_duplicate=False))) | (set(c.rules) - buffers)
    edits = list(c.graph_edits)
    if c.proxy is not None:  # traced on the meta device: its ops run where the tensors are
        edits.append(lambda g: off_meta(g, next(iter(c.proxy.source.values())).device))
    c.graph = build_graph_module(gm, c.state, params, schedules, lambda g: [edit(g) for edit in edits],
                                 c.plan.facts.aliases)


@declare(reads=("plan", "sizes", "layer_info", "reasons", "maps", "rules", "filled", "opts", "rounded", "state",
                "graph?", "eps_values", "units", "eps"), writes=("built",))
def _record(c) -> None:
    record = GrowthRecord(c.plan, dict(c.sizes), c.layer_info, c.reasons, output_maps=output_maps(c.plan, c.maps),
                          rules=c.rules, filled=c.filled, width_method=c.opts.width_method,
                          rounding=rounding_reason(c.rounded, c.state) if c.rounded else None)
    c.built = Built(record, c.state, c.graph, c.maps, c.eps_values, c.units, c.eps)


GRAPH = (_apply_rules, _rewrite_graph, _record)


def build(c, sizes: dict, depth_plan: list, opts) -> Built:
    """The rules and the rewritten graph again, in a nested context (a config rebuild)."""
    return run_passes(RULES + GRAPH, c.nested(sizes=sizes, depth_plan=depth_plan, opts=opts)).built


@declare(reads=("proxy?", "plan", "rules", "reasons", "counts"))
def _proxy_fits(c) -> None:
    """A proxy's growth goes on where its rules read tensors the model holds and, if it is not exact, its graph
    copied out block by block is the full grown graph (the rebuilt class is checked against it); otherwise the
    growth starts again, full."""
    if c.proxy is None:
        return
    why = _no_proxy_graph(c) if c.reasons else None
    if why:
        why = f"the growth is not exact ({'; '.join(c.reasons)[:200]}) and {why}"
    try:
        source_tensors(c.proxy, c.rules)
    except NoProxy as err:
        why = str(err)
    if why:
        raise Restart(full_capture(why), PROXY_PLAN + SPEC + RULES)


def _no_proxy_graph(c) -> str | None:
    """Why the proxy's graph cannot be copied out to the full grown graph (None: it can)."""
    why = proxy_schedules(c.plan.blocks, [], c.counts)
    return why if isinstance(why, str) else None


@declare(reads=("model", "plan", "built", "sizes", "depth_plan", "opts", "proxy?", "materialize", "counts"),
         writes=("built",), what=_CLASS, error=MaterializeError)
def _rebuild_class(c) -> None:
    from ..materialize.hf import materialize_hf
    if not c.plan.captured.is_hf:
        return
    rebuild = _rebuilder(c)
    if c.proxy is None:
        c.built = materialize_hf(c.model, c.plan, c.sizes, c.depth_plan, c.opts, c.built, rebuild, c.materialize)
        return
    depth_plan = [(_full_blocks(b, c.counts), n) for b, n in c.depth_plan]  # the full lists' counts
    try:  # no GraphModule to fall back to: the full capture makes it
        c.built = materialize_hf(c.model, c.plan, c.sizes, depth_plan, c.opts, c.built, rebuild, "hf")
    except MaterializeError as err:
        why = f"no config rebuilds {type(c.model).__name__} from the proxy's growth ({first_line(err)[:300]})"
        raise Restart(full_capture(why), PROXY_PLAN + SPEC + RULES + GRAPH + (_rebuild_class,))


def _rebuilder(c):
    """``materialize_hf``'s callback: the rules and graph built again for other sizes or options, each distinct
    build once (candidate configs often ask for the same one), and ``c.reruns`` says why."""
    done = []

    def rebuild(p, sizes, depth_plan, opts, why):
        for key, built in done:
            if key == (sizes, depth_plan, opts):
                return built
        c.reruns.append(f"rules, graph: {why}")
        done.append(((dict(sizes), list(depth_plan), opts), build(c, sizes, depth_plan, opts)))
        return done[-1][1]
    return rebuild


@declare(reads=("plan", "built", "width", "sizes", "opts"), mutates=("built",), what=_CLASS)
def _notes(c) -> None:
    p, record = c.plan, c.built.record
    notes = unused_width_notes(p, c.width, c.sizes) + _aki_notes(p, record, c.opts.width_method)
    for note in notes:
        warn("growir: " + note)
    record.notes += notes + ([f"the graph was exported at fixed shapes ({p.captured.static})"]
                             if p.captured.static else []) + kept_note(c.built)


def _aki_notes(p, record, width_method: str) -> list[str]:
    """Where AKI (new units from the next block) did not apply, the groups grew by FPI: say so."""
    if width_method != "aki" or not record.sizes:
        return []
    notes = [f"width_method='aki' skipped blocks `{b.prefix}` ({b.why_not}): their groups grew by FPI"
             for b in p.blocks if not b.homogeneous]
    if not any(rule.donor for rule in record.rules.values()):
        notes.append("width_method='aki' found no group inside a block to initialize from the next block "
                     "(AKI applies to a block's own FFN units and heads): every group grew by FPI")
    return notes


# --- check ----------------------------------------------------------------------------------------------------
@declare(reads=("model", "plan", "built", "strict", "how?"), mutates=("built",), what=_CHECK)
def _measure(c) -> None:
    """Parameter counts and the self-measure; a cast that rounded counts only where it shows in float32."""
    record, grown = c.built.record, c.built.grown
    if c.strict and record.reasons:
        raise NotExactError("strict=True and this growth cannot be exact: " + "; ".join(record.reasons))
    record.params_before = sum(t.numel() for t in c.model.parameters())
    record.params_after = sum(t.numel() for t in grown.parameters())
    record.capture, record.reruns = c.how, list(c.reruns)
    if record.measured:  # a proxy's growth was measured on the real source while its class was rebuilt
        return
    try:
        record.deviation = measure(c.model, grown, c.plan.captured, record.output_maps)
        record.measured = MEASURED if record.deviation is not None else ""
    except Exception as exc:  # noqa: BLE001 - re-raised as a GrowthError, the original chained
        at = failing_node(grown, c.plan.captured)
        raise RewriteError(f"the grown model fails to run{at}: {type(exc).__name__}: {first_line(exc)}. growir "
                           f"grew a size this op depends on without rewriting the op (an argument above holds the "
                           f"old size); the source is unchanged. Grow other roles, or report the op") from exc
    if record.rounding and (record.deviation or 0.0) > TOLERANCE:  # rounding below the tolerance is harmless
        record.reasons.append(record.rounding)
        if c.strict:
            raise NotExactError("strict=True and this growth is not exact: " + record.rounding)
    gap = export_gap(c.model, grown, c.plan.captured, record.output_maps) if (
        record.exact and (record.deviation or 0.0) > TOLERANCE) else None
    if gap and gap[0] > TOLERANCE and gap[1] <= TOLERANCE:  # not the growth: the export took one branch
        record.reasons.append(f"the model's forward branches on its inputs' values: its export at the example "
                              f"inputs differs from it by {gap[0]:.3g} at other inputs, and the grown graph, exact "
                              f"to that export ({gap[1]:.2g}), computes the export's branch at every input")


@declare(reads=("plan", "built", "strict"), mutates=("built",), what=_CHECK)
def _reload(c) -> None:
    """A rebuilt Hugging Face class saved and loaded again (``materialize/reload.py``): the same model, or a note
    and a warning that say what ``from_pretrained`` changes, with the deviation (strict: an error)."""
    record, grown = c.built.record, c.built.grown
    if not c.plan.captured.is_hf or not hasattr(grown, "save_pretrained"):
        return
    result = reload_check(grown, c.plan.captured, len(record.plan.facts.outputs))
    record.reload, note = result, result.note()
    if result.moved:
        if c.strict:
            raise MaterializeError("strict=True and " + note)
        warn("growir: " + note)
    record.notes += [note] if note else []


@declare(reads=("model", "built", "verify"), mutates=("built",), what=_CHECK)
def _judge(c) -> None:
    """The verdict: a bug (exact by theorem, not by measure), a warning (not exact), and verify's check."""
    record, grown = c.built.record, c.built.grown
    grown.growir_record = record
    if record.deviation is None:  # a meta-device model: the theorem's verdict only, said as such
        if c.verify:
            raise SpecError("verify=True needs weights, but the model is on the meta device: grow the real model")
        if not record.exact:
            warn("growir: the grown model is not function-preserving (not measured: meta device): "
                 + "; ".join(record.reasons))
        return
    if record.exact and record.deviation > TOLERANCE:
        raise PreservationError(f"this growth should be exact but its outputs moved by {record.deviation:.3g} "
                                f"(relative to max(1, max|y|)); this is a growir bug: please report it with "
                                f"the model's config")
    if not record.exact:
        warn(f"growir: the grown model is not function-preserving (measured deviation "
             f"{record.deviation:.3g}): " + "; ".join(record.reasons))
    if c.verify:
        from ..verify.onnx_check import check
        record.check = check(c.model, grown)
        if record.exact and not record.check.preserved:
            raise PreservationError(f"ONNX Runtime says the grown model does not preserve the function:\n"
                                    f"{record.check}")


@declare(reads=("plan",), mutates=("plan",), what=_CHECK)
def _release(c) -> None:
    release_weights(c.plan.captured.gm)  # the record keeps the graph, not the source's weights


# The pipeline, stage by stage (docs/design.md renders this table from the lists: ``stage_table``).
PLAN = (_capture, _analyse)
PROXY_PLAN = (_capture_in_memory, _analyse_in_memory)  # grow: the two-block proxy where it stands in
SPEC = (_sizes, _depth_plan)
STAND_IN = (_proxy_depth,)  # grow: whether the proxy can stand in, decided before any rule is made
MATERIALIZE = (_proxy_fits,) + GRAPH + (_rebuild_class, _notes)
CHECK = (_measure, _reload, _judge, _release)
GROW = PROXY_PLAN + SPEC + STAND_IN + RULES + MATERIALIZE + CHECK
GROW_PLANNED = SPEC + RULES + MATERIALIZE + CHECK  # grow on a plan made beforehand (a streamed model's proxy)
STAGES = {"PLAN": PLAN, "PROXY_PLAN": PROXY_PLAN, "SPEC": SPEC, "STAND_IN": STAND_IN, "RULES": RULES,
          "MATERIALIZE": MATERIALIZE, "CHECK": CHECK}  # by name, for docs/design.md's table (pipeline/table.py)


def plan_of(model, example_inputs=None):
    """The PLAN stage alone: the width groups and blocks of ``model`` (``growir.plan``)."""
    return run_passes(PLAN, Context(model=model, example_inputs=example_inputs)).plan
