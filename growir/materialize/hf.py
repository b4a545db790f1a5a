"""The Hugging Face class rebuilt around the grown tensors, or the rewritten GraphModule where no config can
express the growth.

A config field changes only where the grown shapes or the numeric check require it (the candidates come
fewest changes first from :func:`growir.materialize.candidate_configs`). A candidate is accepted when the
rebuilt model computes what the rewritten graph computes at the example inputs, at sequences longer than
the config's small integer fields (a sliding window, a chunk size), and derives the same generation
settings. ``record.config_changes`` lists every field whose value differs from the source's config.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import traceback

import sympy
import torch
import torch.utils._pytree as pytree

from ..errors import GrowthError, MaterializeError, first_line, warn
from ..frontend.folder import tied_names
from ..passes.depth import count_pairs, depth_layouts, schedule
from ..ir.index_maps import tree_map
from ..verify.compare import TOLERANCE
from ..verify.measure import long_sizes, measurable, measure
from .unread import any_size, own_initialised, unread_names, unread_note

MAX_CHECK_LEN = 512  # the longest sequence the config check runs (it runs on the full grown model)
MATERIALIZE = ("auto", "hf", "graph")


def materialize_hf(model, p, sizes: dict, depth_plan: list, opts, built, rebuild, mode: str = "auto"):
    """``built`` with its grown model replaced by ``model``'s own class, rebuilt from a changed config.

    ``mode="hf"`` raises MaterializeError where no config computes the grown function; ``"auto"`` keeps
    the rewritten GraphModule there, with a warning and a note in the record that say why; ``"graph"``
    always keeps it. ``rebuild(p, sizes, depth_plan, opts, why)`` builds the rules and graph again (a pooler the
    config sizes); ``why`` says why, for ``record.reruns``.
    """
    if mode == "graph":
        return built
    try:
        return _fit_layouts(model, p, sizes, depth_plan, opts, built, rebuild)
    except MaterializeError as err:
        if mode == "hf":
            raise
        note = (f"returned the rewritten torch.fx.GraphModule, not a {type(model).__name__}, because {err}. "
                f"It computes the grown function; pass materialize='hf' to make this an error")
        built.record.notes.append(note)
        warn("growir: " + note)
        return built


def output_only_groups(p) -> list:
    """Groups that parameters write and nothing reads but the model's outputs (a pooler), or nothing at all (a
    pooler whose output the head drops): the rebuilt config decides their size. A group an attention mixes over
    (``mixed_positions``: learned register or prefix tokens beside the input's) counts tokens, not features: it
    keeps its size, since copied tokens would change every softmax over them."""
    mixed = mixed_positions(p)
    return [g for g in p.groups if g.role is None and g.size and not g.pinned and g.producers
            and not g.consumers and (g.in_output or not g.reads) and g.root not in mixed]


def mixed_positions(p) -> set:
    """The leaf roots of every axis an attention mixes over: a fused attention's key positions and the axis of a
    softmax (an attention written out as matmuls)."""
    axes = [site["k"][-2] for site in p.facts.attention] + [r.axis for r in p.facts.reads if r.kind == "softmax"]
    return {leaf for axis in axes for leaf in p.facts.ag.leaf_roots(axis)}


def sizes_given(groups: list, shapes: dict, sizes: dict | None = None) -> dict:
    """group id -> the size the rebuilt model's parameter ``shapes`` give it, where that differs from its size in
    ``sizes`` (else its source size) and every producer agrees."""
    out = {}
    for g in groups:
        first = g.producers[0]
        size = shapes.get(first.param, (None,) * (first.axis + 1))[first.axis]
        if size is not None and size != (sizes or {}).get(g.id, g.size) and all(
                shapes[q.param][q.axis] == size for q in g.producers):
            out[g.id] = size
    return out


def output_only_sizes(p, sizes: dict) -> dict:
    """``sizes`` with each output-only group (a pooler) at the size a rebuilt config most likely gives it: the
    one new size of every other group of its source size (hidden -> 2 x hidden), where they agree. It saves
    making the rules twice; the config search still decides (``sizes_given``), and a different size there makes
    the rules again, with the reason in ``record.reruns``."""
    out = dict(sizes)
    for g in output_only_groups(p):
        new = {sizes.get(h.id, h.size) for h in p.groups if h.size == g.size and h.id != g.id}
        if g.id not in sizes and len(new) == 1 and new != {g.size}:
            out[g.id] = new.pop()
    return out


def _fit_layouts(model, p, sizes: dict, depth_plan, opts, built, rebuild):
    """``_fit_config``, then each other layout of block lists whose kinds never repeat (``depth_layouts``) until a
    config states one; where none does, one error that says what each layout needed."""
    plans, errors = depth_layouts(depth_plan), []
    for k, plan in enumerate(plans):
        try:
            grown = built if k == 0 else rebuild(p, sizes, plan, opts, "the config states another depth layout")
            return _fit_config(model, p, sizes, plan, opts, grown, rebuild)
        except MaterializeError as err:
            if len(plans) == 1:
                raise
            errors.append(f"grown by {', '.join(f'`{b.prefix}` {b.layout}' for b, _ in plan)}: {first_line(err)}")
    raise MaterializeError("no config states any layout of the grown blocks, whose kinds never repeat: "
                           + "; ".join(errors))


def _fit_config(model, p, sizes: dict, depth_plan, opts, built, rebuild):
    """Rebuild the Hugging Face class. Output-only groups (a pooler) take the size the config gives them."""
    from .config import candidate_configs
    free = output_only_groups(p)
    free_axes = {(pa.param, pa.axis) for g in free for pa in g.producers}
    expected = {k: tuple(None if (p.facts.aliases.get(k, k), i) in free_axes else n for i, n in enumerate(v.shape))
                for k, v in with_source_ties(model, built.state).items()}
    expected = any_size(expected, unread_names(built.record.rules))  # the class initialises them at its shapes
    counts = count_pairs(depth_plan, opts.depth_method)  # block lists' and runs' (old, new) counts
    pairs = _size_pairs(p, built.maps, {k: (n, m, "") for k, (n, m) in enumerate(counts)})
    heads = _head_pairs(p, built.maps)
    params = dict(model.named_parameters(remove_duplicate=False))
    scheds = [(b, schedule(b, n, opts.depth_method)) for b, n in depth_plan]
    sources = {b.count: s.sources for b, s in scheds}
    old = {b.name(i, sfx) for b, _ in scheds for i in range(b.count) for sfx in b.suffixes_of(i)}  # replaced
    required = set(params) - old | {b.name(i, sfx) for b, s in scheds for i, src in enumerate(s.sources)
                                    for sfx in b.suffixes_of(src) if b.name(src, sfx) in params}
    if built.eps_values and not opts.keep_eps and eps_shared(p, built.eps_nodes or {}):
        why = "every norm's eps kept: a config field holds the eps of a norm the growth changes and of one it keeps"
        return _fit_config(model, p, sizes, depth_plan, *_kept_eps(p, sizes, depth_plan, opts, rebuild, why), rebuild)
    tried = []
    for cfg, changes, shapes in candidate_configs(model, expected, pairs, heads, required, sources,
                                                  built.eps_values):
        extra = sizes_given(free, shapes, sizes)
        candidate, grown, why = _try_candidate(model, p, cfg, shapes, {**sizes, **extra}, depth_plan, opts,
                                               None if extra else built, rebuild)
        if why is None:
            _keep_generation_config(model, grown)
            candidate.grown, candidate.record.config_changes = grown, config_diff(model.config, grown.config)
            candidate.record.notes += unread_note(own_initialised(grown, candidate), [])
            return candidate
        tried.append(f"{changes} ({why})")
    if built.eps_values and not opts.keep_eps:  # e.g. an eps the config does not hold: keep it
        why = "every norm's eps kept: no config expresses the rescaled eps"
        return _fit_config(model, p, sizes, depth_plan, *_kept_eps(p, sizes, depth_plan, opts, rebuild, why), rebuild)
    raise MaterializeError(f"no {type(model).__name__} config that fits the grown shapes computes what the "
                           f"rewritten graph computes; tried {'; '.join(tried[:4])}")


def _try_candidate(model, p, cfg: dict, shapes: dict, sizes: dict, depth_plan, opts, built, rebuild) -> tuple:
    """(rules, rebuilt model, why the candidate does not fit -- None where it does). A candidate does not fit
    where growir refuses its sizes (a GrowthError), where it does not build (the rules at its sizes, the class
    from its config, the tensors loaded: any exception) or where a model made for it fails while it runs (the
    rebuilt class, or the rewritten graph at its sizes). An exception in the check's own code is a growir bug
    and propagates (the pass names the stage), never hidden as a failed candidate."""
    candidate = grown = None
    try:
        candidate, grown = _load_candidate(model, p, cfg, sizes, depth_plan, opts, built, rebuild)
    except GrowthError as exc:
        return candidate, grown, f"growir refuses it: {first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a config the rules or the class cannot be built for: no candidate
        return candidate, grown, f"it does not build: {type(exc).__name__}: {first_line(exc)}"
    try:
        return candidate, grown, _differs(model, candidate, grown, p.captured, _window_fields(model, cfg, shapes))
    except GrowthError as exc:
        return candidate, grown, f"growir refuses it: {first_line(exc)}"
    except Exception as exc:  # noqa: BLE001 - a model made for the candidate failing is the candidate's failure
        ran = raised_running(exc, {"the rebuilt model": grown, "the rewritten graph at its sizes": candidate.grown})
        if ran is None and not raised_in_model(exc, model):
            raise
        return candidate, grown, f"{ran or 'the rebuilt model'} fails on the example: {type(exc).__name__}: " \
                                 f"{first_line(exc)}"


def raised_running(exc: BaseException, models: dict) -> str | None:
    """The name (a key of ``models``: name -> module or None) of the model whose forward, or one of whose
    submodules' forward, was running when ``exc`` was raised; None where none was.

    >>> layer = torch.nn.Linear(2, 2)
    >>> try:
    ...     layer(torch.zeros(3))
    ... except RuntimeError as exc:
    ...     raised_running(exc, {"the layer": layer, "another": torch.nn.ReLU()})
    'the layer'
    """
    owners = {id(sub): name for name, m in models.items() if m is not None for sub in m.modules()}
    tb = exc.__traceback__
    while tb is not None:
        name = owners.get(id(tb.tb_frame.f_locals.get("self")))
        if name is not None:
            return name
        tb = tb.tb_next
    return None


def raised_in_model(exc: BaseException, model) -> bool:
    """Whether ``exc`` was raised while the model's own code ran (its class's module or the library that
    defines it), not in growir's code between.

    >>> raised_in_model(ValueError("x"), torch.nn.Linear(1, 1))
    False
    """
    import inspect
    import os
    top = type(model).__module__.split(".")[0]
    roots = [os.path.dirname(os.path.abspath(inspect.getfile(type(model))))]
    package = sys.modules.get(top)
    if top not in ("torch", "growir") and getattr(package, "__file__", None):
        roots.append(os.path.dirname(os.path.abspath(package.__file__)))
    own = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "")  # growir/ itself
    files = [os.path.abspath(f.filename) for f in traceback.extract_tb(exc.__traceback__)]
    return any(f.startswith(tuple(os.path.join(r, "") for r in roots)) and not f.startswith(own) for f in files)


def _kept_eps(p, sizes: dict, depth_plan, opts, rebuild, why: str) -> tuple:
    """(options, rules) of the growth built again with every norm's eps kept."""
    kept = dataclasses.replace(opts, keep_eps=True)
    return kept, rebuild(p, sizes, depth_plan, kept, why)


def eps_shared(p, changed: dict) -> bool:
    """Whether a norm whose eps the growth keeps has the value of one it changes (``changed``: eps node ->
    (position, new eps)). A config holds eps by value in one field (per-head q/k norms may read the
    residual norms' ``rms_norm_eps``): changing the field would change both, a drift of about eps / var(x)
    too small for the numeric check to see, so the config cannot express the change."""
    from ..analysis.norms import norm_sites
    sites = [s for s in norm_sites(p.captured.gm, p.facts) if s.eps_at is not None and s.eps is not None]
    values = {s.eps for s in sites if s.eps_at[0] in changed}
    return any(s.eps in values for s in sites if s.eps_at[0] not in changed)


def _load_candidate(model, p, cfg: dict, sizes: dict, depth_plan, opts, built, rebuild):
    """(rules built at ``sizes`` -- ``built`` where already built there --, the class rebuilt from ``cfg``
    holding their tensors); per-unit constants (ALiBi slopes) placed where the rebuilt model's own values
    put them."""
    from .load import load_hf
    from ..passes.per_unit import rebuilt_values
    why = "the config sizes a group that only the outputs read (a pooler): the rules at that size"
    candidate = rebuild(p, sizes, depth_plan, opts, why) if built is None else built
    grown = load_hf(model, cfg, with_source_ties(model, candidate.state), unread_names(candidate.record.rules))
    if candidate.units and not opts.unit_values:  # the rebuilt model's own per-unit constants
        values = rebuilt_values(candidate.units, candidate.maps, grown)
        if values:
            candidate = rebuild(p, sizes, depth_plan, dataclasses.replace(opts, unit_values=values),
                                "per-unit constants (ALiBi slopes) placed where the rebuilt model puts them")
            grown = load_hf(model, cfg, with_source_ties(model, candidate.state), unread_names(candidate.record.rules))
    return candidate, grown


def _differs(model, candidate, grown, captured, fields=None) -> str | None:
    """Why the rebuilt ``grown`` is not the rewritten graph (None: it is): outputs at the example, outputs
    at a long sequence (past the integer ``fields``), or the generation settings its config derives. Without
    a rewritten graph (a growth planned on a two-block proxy) an exact growth is judged against the source."""
    outputs = len(candidate.record.plan.facts.outputs)
    if candidate.grown is None:
        if not candidate.record.exact or not measurable(grown):
            return "not exact, or not measurable, and no rewritten graph to compare with"
        return _differs_from_source(model, candidate, grown, captured, fields)
    deviation = measure(candidate.grown, grown, captured, [None] * outputs, quick=True)
    if deviation is not None and deviation > TOLERANCE:  # None: a meta-device model, shapes only
        return f"differs from the rewritten graph by {deviation:.2g}"
    # where exact, the source is the reference (the graph's literals are checked too); values rounded into a
    # low-precision dtype make the graph the only reference, as for any inexact growth
    exact = candidate.record.exact and not candidate.record.rounding
    ref, maps = (model, candidate.record.output_maps) if exact else (candidate.grown, [None] * outputs)
    length = check_length(model.config.to_dict(), captured, fields) if deviation is not None else 0
    deviation, length = _long_deviation(ref, grown, captured, maps, length)
    if deviation is not None and deviation > TOLERANCE:
        return f"differs from the {'source' if exact else 'rewritten graph'} by {deviation:.2g} at {length} tokens"
    gen = _generation_diff(model.config, grown.config)
    return f"derives other generation settings: {gen}" if gen else None


def _differs_from_source(model, candidate, grown, captured, fields) -> str | None:
    """The check of a growth planned on a proxy (no rewritten graph): the real source against the rebuilt model
    at the example inputs (their padded rows), and at one row of the check length where the candidate changed
    an integer field that shapes no parameter (``fields``: a window, a head count). It is also the growth's
    self-measure (``record.deviation``, ``record.measured``); values rounded into a low-precision dtype pass
    only within the tolerance (else the full graph is the reference)."""
    maps = candidate.record.output_maps
    deviation = measure(model, grown, captured, maps, quick=True)
    long, length = None, 0  # a longer row only past a changed field that may be a length (a window)
    if fields:
        long, length = _long_deviation(model, grown, captured, maps,
                                       check_length(model.config.to_dict(), captured, fields), batch=1)
    deviation = max(deviation, long or 0.0)
    if deviation > TOLERANCE:
        return f"differs from the source by {deviation:.2g} (at most {max(length, _example_length(captured))} tokens)"
    gen = _generation_diff(model.config, grown.config)
    if gen:
        return f"derives other generation settings: {gen}"
    leaves = [t for t in pytree.tree_leaves((captured.args, captured.kwargs)) if isinstance(t, torch.Tensor)]
    batch = leaves[0].shape[0] if leaves and leaves[0].dim() else 1
    candidate.record.deviation = deviation
    candidate.record.measured = (f"the real source and grown models in float32 at the example inputs (batch {batch}, "
                                 f"{_example_length(captured)} tokens)" + (f" and at batch 1, {length} tokens"
                                                                           if long is not None else ""))
    return None


def _long_deviation(ref, grown, captured, maps: list, length: int, batch: int | None = None):
    """(deviation, length) at the longest sequence up to ``length`` the reference model accepts (a position
    table may stop it earlier than the export's range says), at ``batch`` rows where given; (None, 0) where
    no axis is dynamic."""
    example = _example_length(captured)
    while captured.dims and length > example:
        sizes = long_sizes(captured, length, batch)
        if not sizes:
            break
        try:
            return measure(ref, grown, captured, maps, sizes=sizes), length
        except Exception:  # noqa: BLE001 - too long for the reference itself: halve; else the grown model fails
            try:
                measure(ref, ref, captured, [None] * len(maps), sizes=sizes)
            except Exception:  # noqa: BLE001
                length //= 2
                continue
            raise
    return None, 0


def _example_length(captured) -> int:
    leaves = pytree.tree_leaves((captured.args, captured.kwargs)) if captured is not None else []
    return max((t.shape[1] for t in leaves if isinstance(t, torch.Tensor) and t.dim() >= 2), default=8)


def check_length(cfg: dict, captured, fields=None) -> int:
    """A sequence length beyond every small integer field of the config (a sliding window, a chunk size):
    twice the largest field below the model's position count, at least twice the example's sequence, at
    most the position count and MAX_CHECK_LEN. ``fields``: only these count (None: every field).

    >>> check_length({"sliding_window": 8, "hidden_size": 32, "eos_token_id": 400}, None)
    64
    >>> check_length({"sliding_window": 8, "hidden_size": 32, "eos_token_id": 400}, None, {"sliding_window"})
    16
    """
    from ..frontend.inputs import max_positions
    from .config import is_token_field
    limit = min(MAX_CHECK_LEN, max_positions(_Fields(cfg), MAX_CHECK_LEN))
    ints = [v for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and not is_token_field(k)
            and 0 < v < limit and (fields is None or k in fields)]
    return min(limit, 2 * max(ints + [_example_length(captured)]))


def _window_fields(model, cfg: dict, shapes: dict) -> set:
    """The integer fields the long check must exceed: those ``cfg`` changed that shape no parameter (reverting
    one rebuilds the same shapes), as a window or a head count would. A field both configs share means the
    same in the source and the grown model, and a size that shapes parameters is checked by the shapes."""
    from .load import config_shapes
    base = model.config.to_dict()
    changed = [k for k, v in cfg.items() if isinstance(v, int) and not isinstance(v, bool) and base.get(k) != v
               and 0 < v < MAX_CHECK_LEN]  # check_length reads no other field: no model built for them
    return {k for k in changed if k in base and config_shapes(model, {**cfg, k: base[k]}) == shapes}


class _Fields:
    """A config dict read as attributes."""
    def __init__(self, cfg: dict):
        self.__dict__.update(cfg)


def config_diff(old, new) -> dict:
    """Every field whose value differs between two configs (added or removed fields included).

    >>> from transformers import BertConfig
    >>> config_diff(BertConfig(hidden_size=32), BertConfig(hidden_size=64))
    {'hidden_size': 64}
    """
    a, b = old.to_dict(), new.to_dict()
    skip = {"transformers_version", "_name_or_path"}
    return {k: b.get(k) for k in list(b) + [k for k in a if k not in b] if k not in skip and a.get(k) != b.get(k)}


def _generation_diff(old, new) -> dict:
    """The generation settings (token ids, lengths) the two configs derive, where they differ."""
    try:
        from transformers import GenerationConfig
        a = GenerationConfig.from_model_config(old).to_diff_dict()
        b = GenerationConfig.from_model_config(new).to_diff_dict()
    except (ImportError, AttributeError, TypeError, ValueError):  # a config that derives no generation settings
        return {}
    return {k: b.get(k) for k in set(a) | set(b) if k != "transformers_version" and a.get(k) != b.get(k)}


def _keep_generation_config(model, grown) -> None:
    """The source's own generation settings (maybe loaded from its folder, not derived) carry over."""
    source = getattr(model, "generation_config", None)
    if source is not None and hasattr(grown, "generation_config"):
        grown.generation_config = copy.deepcopy(source)


def _head_pairs(p, maps: dict) -> dict:
    """old -> {new} query- and kv-head counts: sizes that shape attention but need not shape a parameter (a
    class deriving head_dim as hidden / heads rebuilds the same shapes with the old counts)."""
    out = {}
    for old, new in filter(None, (_changed(p.facts.ag, maps, axis) for axis in _query_head_axes(p))):
        out.setdefault(old, set()).add(new)
    for g in p.by_role("heads") + p.by_role("kv_heads"):  # attention written out as matmuls records no site
        if g.root in maps and not g.per_kv:
            out.setdefault(maps[g.root].old, set()).add(maps[g.root].new)
    return out


def _query_head_axes(p) -> list:
    """The query-head axes of every attention: a fused attention's, and the batch axes an attention written out
    as matmuls reads (there the query heads of grouped-query attention are kv heads x heads per kv head, a product
    no single group holds; a config's head count holds the product)."""
    ag = p.facts.ag
    return [site["q"][1] for site in p.facts.attention] + [
        r.axis for r in p.facts.reads if r.kind == "batch"
        and all(ag.size_of(leaf).is_Integer for leaf in ag.leaf_roots(r.axis))]  # not a batch x heads merge


def _changed(ag, maps: dict, axis) -> tuple | None:
    """(old, new) sizes of ``axis`` under the growth ``maps``, where both are whole numbers and differ."""
    _, _, old, new = tree_map(ag.expand(axis), ag, maps)
    old, new = sympy.sympify(old), sympy.sympify(new)
    return (int(old), int(new)) if old.is_Integer and new.is_Integer and old != new else None


def with_source_ties(model, state: dict) -> dict:
    """The grown tensors under every name the source model gives them: a tensor the source shares between
    two names (a tied bias, say) that the traced graph saw under one name gets both."""
    out = dict(state)
    for name, names in tied_names(model).items():
        known = [n for n in names if n in state]
        if name not in out and known:
            out[name] = state[known[0]]
    return out


def _size_pairs(p, maps: dict, layer_info: dict) -> dict:
    """old size -> {new sizes} over every parameter axis and attention head count that changed."""
    pairs = {}

    def add(axis):
        changed = _changed(p.facts.ag, maps, axis)
        if changed:
            pairs.setdefault(changed[0], set()).add(changed[1])
    for m in maps.values():
        pairs.setdefault(m.old, set()).add(m.new)
    for node in list(p.facts.params) + list(p.facts.buffers):
        for axis in p.facts.axes.get(node, []):
            add(axis)
    for site in p.facts.attention:
        for axis in (site["k"][1], site["q"][-1]):
            add(axis)
    for axis in _query_head_axes(p):
        add(axis)
    for old, new, _ in layer_info.values():
        if new != old:
            pairs.setdefault(old, set()).add(new)
    return pairs
