"""The proxy a streamed growth is planned and configured on: the same widths, two blocks per repeated block
list, a small vocabulary, random weights.

Several configs can rebuild the grown shapes while computing different functions (a head count shapes the
computation, not the parameters), so ``grow`` picks the config by running the rebuilt model. A streamed
checkpoint may not fit in memory; its proxy does. It is exported once (``plan_sample``): that plan gives the
full model's rules (block rules replicated by index, ``checkpoint.expand_block_rules``) and the proxy's own
growth, whose rebuilt config is the full model's with the proxy's block counts and vocabulary put back
(``choose_config``). The fields that make the proxy are found by trying them: a field is a block count if
setting it to two rebuilds exactly the two-block proxy's module tree; a field is an input size (the
vocabulary, a position table) if shrinking it changes only axes of its size, and the plan then finds each
such axis in a group that is pinned (indexed by input ids) or read by no parameter (the head's rows).
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from .plan import FolderPlan, plan_folder
from ..frontend.proxy import PROXY_BLOCKS, signature, check_proxy, make_proxy
from ..frontend.folder import meta_model, named_tensors
from ..errors import MaterializeError

SMALL_VOCAB = 128


@dataclasses.dataclass
class Choice:
    """The grown config chosen on the proxy (``choose_config``): the changed fields, the proxy's measured
    deviation, whether the rules keep an eps the config cannot rescale, and what a reload changes."""
    config: object  # the grown model's config
    changes: dict  # field -> new value
    deviation: float | None  # the proxy's measured deviation
    keep_eps: bool  # the config cannot express a rescaled eps: the rules keep it
    sizes: dict = dataclasses.field(default_factory=dict)  # output-only group id -> the size its config gives
    layouts: dict = dataclasses.field(default_factory=dict)  # block list prefix -> the depth layout its config states
    reload: str = ""  # what from_pretrained changes in the proxy's rebuilt class, where it moves the outputs


def plan_sample(folder, config, cls, full, exact_blocks: bool = True) -> FolderPlan:
    """The folder's plan, made once on the random-weight proxy (``fp.sample``), which ``choose_config`` then
    grows. ``exact_blocks=False`` (random per-group draws, ``fpi_random``): the full model is planned on the
    meta device instead and the proxy is exported again when it grows.

    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from growir.frontend.folder import load_config, meta_model
    >>> d = tempfile.mkdtemp()
    >>> LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
    ...             num_key_value_heads=2, vocab_size=1000, architectures=["LlamaForCausalLM"]).save_pretrained(d)
    >>> config, cls = load_config(d)
    >>> fp = plan_sample(d, config, cls, meta_model(config, cls))
    >>> fp.counts, fp.small, fp.sample.config.vocab_size
    ({'model.layers': 4}, {'num_hidden_layers': 2, 'vocab_size': 128}, 128)
    """
    from ..pipeline.stages import plan_of as make_plan

    meta = meta_model(config, cls)
    counts = make_proxy(meta)
    fp = FolderPlan(None, counts, full, config, cls, meta)
    base = config.to_dict()
    small, fp.layer_fields = _block_fields(fp, base)
    inputs = _input_fields(fp, base, small) if exact_blocks else {}
    sample = _sample(fp, {**small, **{k: v for k, (v, _) in inputs.items()}})
    if exact_blocks:
        p = make_plan(sample)
        check_proxy(p, counts)
        if _input_axes_unread(p, [a for _, axes in inputs.values() for a in axes]):
            fp.plan, fp.small, fp.sample, fp.planned_sample = p, {**small, **{k: v for k, (v, _) in inputs.items()}}, \
                sample, True
            fp.notes = [f"planned on a {PROXY_BLOCKS}-block proxy of `{k}` ({n} blocks, identical in structure)"
                        for k, n in counts.items()]
            return fp
    # the proxy's graph does not confirm the input sizes, or blocks are not replicated (then the config is
    # chosen on the full block lists): plan on the meta device, export the proxy again when it grows
    planned = plan_folder(folder, proxy=exact_blocks)
    blocks = small if exact_blocks else {}
    planned.layer_fields = fp.layer_fields if exact_blocks else {}
    planned.small = {**blocks, **_input_fields_on_full_plan(planned, base, blocks)}
    planned.sample = _sample(planned, planned.small)
    return planned


def _sample(fp, small: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = type(fp.config).from_dict({**fp.config.to_dict(), **small})
    return fp.cls(cfg).float().eval()


def choose_config(fp, sizes: dict, depth_plan: list, width, opts, strict: bool = False) -> Choice:
    """The grown config for the folder plan ``fp`` (see the module docstring): its proxy ``fp.sample`` grown
    with ``opts`` (``opts.low_precision``: the weights are stored below float32, where
    ``width_method="auto"`` copies some groups it would otherwise fill, ``passes/fresh.py``; the proxy runs in
    float32 with the same rules). Raises MaterializeError where no config of the class computes the growth."""
    from ..pipeline.stages import GROW, GROW_PLANNED
    from ..pipeline.context import Context
    from ..pipeline.manager import run_passes
    from ..materialize.config import follow_lists
    from ..passes.depth import schedule

    base, small = fp.config.to_dict(), fp.small
    spec = _proxy_depth(fp, depth_plan)
    ctx = Context(opts, fp.sample, None, width, 1.0, spec.get("layers"), asked_method=opts.width_method,
                  materialize="hf", plan=fp.plan if fp.planned_sample else None, strict=strict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_passes(GROW_PLANNED if fp.planned_sample else GROW, ctx)
        except MaterializeError as error:
            raise MaterializeError(f"cannot stream this growth: a streamed checkpoint is loaded by "
                                   f"{fp.cls.__name__}, but {error} (found on a random-weight two-block proxy). "
                                   f"growir.grow(model, ..., materialize='graph') grows it in memory as a "
                                   f"rewritten graph instead") from error
    fp.sample = None  # its weights and the graph's are not needed again
    record = ctx.built.record
    changes = {k: v for k, v in record.config_changes.items() if k not in small}
    full_layers, sources = {}, {}
    layouts = _stated_layouts(ctx, record)
    depth_plan = with_layouts(depth_plan, layouts)
    for b, new in depth_plan:
        n = fp.counts.get(b.prefix, b.count)
        full = dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(n)])
        sources[n] = schedule(full, new, opts.depth_method).sources
        if new != n:  # a list of two blocks or fewer is its own proxy: its count change came with `changes`
            full_layers.update({k: new for k in fp.layer_fields.get(b.prefix, [])})
    cfg = follow_lists(base, {**base, **changes, **full_layers}, sources)
    changes.update(full_layers)
    floats = any(isinstance(v, float) for v in changes.values())
    keep_eps = bool(ctx.eps_values) and not floats  # the width rules rescale an eps the config does not hold
    output_only = {g.id for g in _output_only(fp.plan)}
    grown = {k: v for k, v in record.sizes.items() if k in output_only and k not in sizes}
    moved = record.reload.note() if record.reload is not None and record.reload.moved else ""
    return Choice(type(fp.config).from_dict(cfg), changes, record.deviation, keep_eps, grown, layouts, moved)


def _stated_layouts(ctx, record) -> dict:
    """Block list prefix -> the depth layout the proxy's rebuilt config states: the config rebuild tries each
    layout in turn (``materialize.hf``), and the full lists must grow by the one it took, or the config would
    state another pattern than the tensors written (the record's ``layers`` describes the schedule used)."""
    from ..passes.depth import schedule

    out = {}
    for b, new in ctx.depth_plan or []:
        n = ctx.counts.get(b.prefix) if ctx.counts else None
        full = dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(n)]) if n else b
        said = record.layers.get(b.prefix, (None, None, None))[2]
        out[b.prefix] = next((x for x in b.layouts if schedule(dataclasses.replace(full, layout=x), new,
                                                               ctx.opts.depth_method).describe() == said), b.layout)
    return out


def with_layouts(depth_plan: list, layouts: dict) -> list:
    """``depth_plan`` (``[(Blocks, new count)]``) with each list's layout taken from ``layouts`` (prefix -> layout)."""
    return [(dataclasses.replace(b, layout=layouts.get(b.prefix, b.layout)), new) for b, new in depth_plan]


def _output_only(p) -> list:
    from ..materialize.hf import output_only_groups
    return output_only_groups(p)


def _block_fields(fp, base: dict):
    """(field -> two, block list prefix -> its count fields): the fields that, set to two, rebuild the
    two-block proxy's module tree: each list's own (an encoder's and a decoder's count), else one for all."""
    want, whole = signature(fp.proxy), signature(fp.model)
    small, layer_fields = {}, {}
    for prefix, n in fp.counts.items():
        fields = _count_fields(fp, base, n, {}, _cut(whole, prefix)) or _count_fields(fp, base, n, small, want)
        small.update(fields)
        if fields:
            layer_fields[prefix] = list(fields)
    return small, layer_fields


def _count_fields(fp, base: dict, n: int, small: dict, target) -> dict:
    """The int fields equal to ``n`` that, set to two (with ``small``), build the module tree ``target``."""
    whole, found = signature(fp.model), {}
    for k, v in base.items():
        if type(v) is int and v == n and _builds_like({**base, **small, **found, k: PROXY_BLOCKS}, fp, target) \
                and not _builds_like({**base, k: PROXY_BLOCKS}, fp, whole):  # a head count equal to the
            found[k] = PROXY_BLOCKS  # block count (4 heads in 4 blocks) shapes no tensor: not a block count
    return found


def _cut(sig: tuple, prefix: str) -> tuple:
    """A module's ``signature`` with the blocks of the list ``prefix`` past the proxy's two left out."""
    past = re.compile(rf"{re.escape(prefix)}\.(\d+)(\.|$)")
    keep = lambda name: (m := past.match(name)) is None or int(m.group(1)) < PROXY_BLOCKS  # noqa: E731
    return tuple(tuple(entry for entry in part if keep(entry[0])) for part in sig)


def _input_fields(fp, base: dict, small: dict) -> dict:
    """field -> (small value, [(tensor, axis)] it shrinks): int fields above the small size whose shrinking, on
    its own, changes only the first axis of tensors, where it is their size (the rows of a table: a vocabulary,
    positions; the plan confirms them, ``_input_axes_unread``)."""
    names, shapes = _shapes(fp.proxy)
    taken = {v for v in base.values() if type(v) is int} | {n for s in shapes.values() for n in s}
    to = next(n for n in range(SMALL_VOCAB, 1 << 20, 8) if n not in taken)
    out = {}
    for k, v in base.items():
        if type(v) is not int or v <= to or k in small:
            continue
        trial = _built({**base, **small, k: to}, fp)
        if trial is None or _shapes(trial)[0] != names:
            continue
        new = _shapes(trial)[1]
        changed = [(n, a) for n, s in shapes.items() for a, (x, y) in enumerate(zip(s, new[n])) if x != y]
        # a table's rows only (an FFN width is also the axis 1 of the weights that read it)
        if changed and all(a == 0 and shapes[n][a] == v and new[n][a] == to for n, a in changed):
            out[k] = (to, changed)
    return out


def _input_axes_unread(p, axes: list) -> bool:
    """Every shrunk axis lies in a group that is pinned (indexed by input ids) or that the rebuilt config
    sizes (read by no parameter, as a head's rows), and one at least is pinned."""
    free = {g.id for g in _output_only(p)}
    where = {(pa.param, pa.axis): g for g in p.groups for pa in g.producers + g.consumers}
    groups = [where.get((p.facts.aliases.get(n, n), a)) for n, a in axes]
    return all(g is not None and (g.pinned or g.id in free) for g in groups) and (
        not axes or any(g.pinned for g in groups))


def _input_fields_on_full_plan(fp, base: dict, small: dict) -> dict:
    """The input-size fields where the proxy's own plan cannot confirm them (``width_method="fpi_random"``,
    which plans the full model on the meta device, or a shrunk axis that a parameter reads): the fields that
    hold a pinned group's size in ``fp.plan`` and, set to ``SMALL_VOCAB``, keep the module tree."""
    keys = {t[0] for t in signature(_built({**base, **small}, fp))[1]}
    out = {}
    for g in fp.plan.groups:
        if not g.pinned or not g.size or g.size <= SMALL_VOCAB:
            continue
        for k, v in base.items():
            if type(v) is int and v == g.size and k not in small and k not in out:
                trial = _built({**base, **small, **out, k: SMALL_VOCAB}, fp)
                if trial is not None and {t[0] for t in signature(trial)[1]} == keys:
                    out[k] = SMALL_VOCAB
    return out


def _shapes(model) -> tuple:
    tensors = named_tensors(model)
    return [n for n, _ in tensors], {n: tuple(t.shape) for n, t in tensors}


def _built(cfg: dict, fp):
    try:
        return meta_model(type(fp.config).from_dict(cfg), fp.cls)
    except Exception:  # noqa: BLE001 - a config that does not build is simply not the field we look for
        return None


def _builds_like(cfg: dict, fp, want) -> bool:
    m = _built(cfg, fp)
    return m is not None and signature(m) == want


def _proxy_depth(fp, depth_plan: list) -> dict:
    """The proxy's depth spec: one block more (fewer where the full model shrinks), the least that builds a
    deeper config; the full counts are put back into it. Each block of the proxy grown in float32 at the full
    widths is large (180 MiB for a 1024-wide decoder block grown x2): the full ratio (four blocks) took the
    preparation's peak RSS past the streaming bound."""
    if not depth_plan:
        return {}
    b, new = depth_plan[0]
    if b.prefix not in fp.counts:  # a list of two blocks or fewer is its own proxy: grown to its target
        return {} if new == b.count else {"layers": new}
    n = fp.counts[b.prefix]
    if new == n:
        return {}
    return {"layers": b.count + 1 if new > n else max(1, round(new * b.count / n))}
