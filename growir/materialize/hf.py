"""The Hugging Face class rebuilt around the grown tensors, or the rewritten GraphModule where no config can
express the growth.

A config field changes only where the grown shapes or the numeric check require it (the candidates come
fewest changes first from :func:`growir.materialize.candidate_configs`). A candidate is accepted when the
rebuilt model computes what the rewritten graph computes at the example inputs, at sequences longer than
the config's small integer fields (a sliding window, a chunk size), and derives the same generation
settings. ``record.config_changes`` lists every field whose value differs from the source's config.
"""

from __future__ import annotations

import dataclasses
import sys
import traceback

import sympy

from ..errors import GrowthError, MaterializeError, first_line, warn
from ..frontend.folder import tied_names
from ..passes.depth import count_pairs, depth_layouts, schedule
from ..ir.axes import is_structured
from ..ir.index_maps import tree_map
from .faithful import config_diff, differs, keep_generation_config, window_fields
from .unread import any_size, own_initialised, unread_names, unread_note

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
        if opts.rescale:  # one field for every norm: rewrite every filled norm's eps instead of rescaling streams
            unscaled = dataclasses.replace(opts, rescale=False)
            again = rebuild(p, sizes, depth_plan, unscaled, "no residual stream rescaled: one config field holds "
                            "the eps of every filled norm, each rewritten by the same factor")
            if not eps_shared(p, again.eps_nodes or {}) and one_value_each(p, again.eps_nodes or {}):
                return _fit_config(model, p, sizes, depth_plan, unscaled, again, rebuild)
        why = "every norm's eps kept: a config field holds the eps of a norm the growth changes and of one it keeps"
        return _fit_config(model, p, sizes, depth_plan, *_kept_eps(p, sizes, depth_plan, opts, rebuild, why), rebuild)
    tried = []
    for cfg, changes, shapes in candidate_configs(model, expected, pairs, heads, required, sources,
                                                  built.eps_values):
        extra = sizes_given(free, shapes, sizes)
        candidate, grown, why = _try_candidate(model, p, cfg, shapes, {**sizes, **extra}, depth_plan, opts,
                                               None if extra else built, rebuild)
        if why is None:
            keep_generation_config(model, grown)
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
        return candidate, grown, differs(model, candidate, grown, p.captured, window_fields(model, cfg, shapes))
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

    >>> import torch
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

    >>> import torch
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
    kept = dataclasses.replace(opts, keep_eps=True, rescale=True)  # eps kept: the streams rescaled where they can be
    return kept, rebuild(p, sizes, depth_plan, kept, why)


def eps_shared(p, changed: dict) -> bool:
    """Whether a norm whose eps the growth keeps has the value of one it changes (``changed``: eps node ->
    (position, new eps)). A config holds eps by value in one field (per-head q/k norms may read the
    residual norms' ``rms_norm_eps``): changing the field would change both, a drift of about eps / var(x)
    too small for the numeric check to see, so the config cannot express the change."""
    sites = _eps_sites(p)
    values = {s.eps for s in sites if s.eps_at[0] in changed}
    return any(s.eps in values for s in sites if s.eps_at[0] not in changed)


def one_value_each(p, changed: dict) -> bool:
    """Whether the norms that share an eps value are all given one new value (``changed``: eps node ->
    (position, new eps)): what a config field holding it by value can express."""
    new = {}
    for s in _eps_sites(p):
        if s.eps_at[0] in changed:
            new.setdefault(s.eps, set()).add(changed[s.eps_at[0]][1])
    return all(len(v) == 1 for v in new.values())


def _eps_sites(p) -> list:
    """The plan's norms whose eps is a literal of the graph (the ones a growth can rewrite)."""
    from ..analysis.norms import norm_sites
    return [s for s in norm_sites(p.captured.gm, p.facts) if s.eps_at is not None and s.eps is not None]


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


def _head_pairs(p, maps: dict) -> dict:
    """old -> {new} query- and kv-head counts: sizes that shape attention but need not shape a parameter (a
    class deriving head_dim as hidden / heads rebuilds the same shapes with the old counts)."""
    out = {}
    for old, new in (pair for axis in _query_head_axes(p) for pair in _changed(p.facts.ag, maps, axis)):
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


def _changed(ag, maps: dict, axis) -> list:
    """(old, new) sizes of ``axis`` and of each product or concatenation inside it (the kv heads of a projection
    viewed as kv heads x head_dim, where the kv heads are a product themselves) under the growth ``maps``, where
    both are whole numbers and differ."""
    out = []
    for tree in _subtrees(ag.expand(axis)):
        _, _, old, new = tree_map(tree, ag, maps)
        old, new = sympy.sympify(old), sympy.sympify(new)
        if old.is_Integer and new.is_Integer and old != new:
            out.append((int(old), int(new)))
    return out


def _subtrees(tree) -> list:
    """``tree`` and every structured tree inside it (an ``AxisGraph.expand`` tree)."""
    return [tree] + [s for t in tree[1] if is_structured(t) for s in _subtrees(t)] if is_structured(tree) else [tree]


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
        for old, new in _changed(p.facts.ag, maps, axis):
            pairs.setdefault(old, set()).add(new)
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
