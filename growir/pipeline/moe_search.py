"""``experts=E, top_k=k`` on a dense model: the transformers mixture-of-experts class to upcycle into, found by
search, as the config search finds a rebuild (no table of classes, no field read by name).

The candidates are the config classes of the auto mapping that gives the model's class for its config (a causal
LM's causal LMs). Each is built on the meta device from the model's config entries it shares, and kept where it
holds tensors of more axes than any of the model's (expert tensors). They are tried in the order of how few
(name, shape) tensors the two models do not share. For a candidate, the fields that set the expert count are those
whose value is an axis of the expert tensors and whose change moves that axis alone (set to E); a field the
model's config lacks and whose value is a size of the new tensors but no size of the model's is an expert's width
(set to the FFN's, which copies then fill). Both models are cut to two blocks per repeated list, exported on the
meta device and aligned op for op (``analysis/align.py``): the first candidate whose graph is the model's with
FFNs made mixtures of experts is the target. Top-k is a size no tensor shows: it is read from the aligned graph (the
``topk`` over E scores), and the fields holding that k are set to ``k`` until the graph's top-k runs it. The
found (class, fields) are cached per (model config, E, k); the upcycling itself is ``pipeline/upcycle.py``'s.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
>>> found = find_moe(dense, experts=4, top_k=2)  # doctest: +SKIP
>>> found.cls.__name__  # doctest: +SKIP
'MixtralForCausalLM'
"""

from __future__ import annotations

import collections
import functools
import json
from dataclasses import dataclass, field

import torch

from ..analysis.align import align
from ..analysis.moe import TOPK
from ..analysis.plan import make_plan
from ..errors import SpecError, first_line
from ..frontend.export import capture
from ..frontend.folder import meta_model, named_tensors
from ..frontend.proxy import make_proxy, meta_copy
from ..materialize.config import is_token_field
from .target import bookkeeping
from .upcycle import upcycle

MAX_TRIED = 8  # candidates exported and aligned before the search gives up (each costs an export)


@dataclass
class Found:
    """The class found for ``experts=E, top_k=k``: its config, the fields the search set, and what it tried."""
    config: object
    cls: type
    fields: dict
    tried: list = field(default_factory=list)  # (class name, why not)


def find_moe(model, experts: int, top_k: int) -> Found:
    """The mixture-of-experts class and config for ``model`` with ``experts`` experts choosing ``top_k`` (see the
    module docstring). SpecError, naming what was tried, where no class's graph matches: give ``into=``."""
    if not isinstance(experts, int) or isinstance(experts, bool) or not isinstance(top_k, int) \
            or isinstance(top_k, bool) or not 1 <= top_k <= experts:
        raise SpecError(f"experts={experts!r}, top_k={top_k!r} on a dense model: give an expert count and a top-k "
                        f"with 1 <= top_k <= experts (experts=8, top_k=2)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise SpecError(f"experts= on a dense model finds a transformers MoE class for its config; "
                        f"{type(model).__name__} has none: give into= an MoE model of your own")
    entries = {k: v for k, v in config.to_dict().items() if not bookkeeping(k)}  # a saved and loaded config too
    key = (type(config), json.dumps(entries, sort_keys=True, default=str), experts, top_k)
    if key not in _FOUND:
        _FOUND[key] = _search(model, experts, top_k)
    cfg_cls, cls, fields, tried = _FOUND[key]
    if cls is None:
        said = "; ".join(f"{c}: {why}" for c, why in tried) or "no class of its kind holds expert tensors"
        raise SpecError(f"experts={experts}, top_k={top_k}: no transformers class computes a "
                        f"{type(model).__name__}'s graph with its FFNs made mixtures of experts ({said}); name "
                        f"the target with into= (a config, a model folder or a config.json)")
    return Found(cfg_cls(**_shared(config, cfg_cls), **fields), cls, fields, tried)


_FOUND: dict = {}  # (config class, config entries, E, k) -> what _search found: one search per config


def _search(model, experts: int, top_k: int) -> tuple:
    """(config class, class, fields) of the first candidate that aligns, or (None, None, {}); and [(class name,
    why not)]."""
    source = _Source(model)
    tried = []
    for cfg_cls, cls in _ranked(model, source):
        if len(tried) >= MAX_TRIED:
            break
        try:
            fields = _fit(model, cfg_cls, cls, source, experts, top_k)
        except _NotIt as why:
            tried.append((cls.__name__, str(why)))
            continue
        return cfg_cls, cls, fields, tried
    return None, None, {}, tried


class _NotIt(Exception):
    """A candidate that is not the target (the message says why)."""


class _Source:
    """The model cut to two blocks per repeated list on the meta device: its tensors as (name, shape), its graph
    and plan (exported once), and the names of its FFN tensors (those with an axis in a group of role ffn)."""

    def __init__(self, model):
        self.model = model
        shallow = meta_copy(model)
        make_proxy(shallow)
        self.tensors = _tensors(shallow)
        self.most = max(len(s) for _, s in self.tensors)
        captured = capture(shallow)
        self.graph = captured.gm
        plan = make_plan(captured)
        self.ffn = {pa.param for g in plan.by_role("ffn") for pa in g.producers + g.consumers}


def _tensors(model) -> collections.Counter:
    return collections.Counter((n, tuple(t.shape)) for n, t in named_tensors(model))


def _mapping_of(model) -> list:
    """(config class, model class) of the auto mapping that gives the model's class for its config."""
    return _mapping(type(model), type(model.config))


@functools.cache
def _mapping(model_cls, config_cls) -> list:
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for mapping in vars(modeling_auto).values():
        if not isinstance(mapping, modeling_auto._LazyAutoMapping):
            continue
        try:
            if mapping[config_cls] is not model_cls:
                continue
        except (KeyError, ValueError):
            continue
        out = {}
        for kind in mapping._model_mapping:
            try:
                cfg_cls = CONFIG_MAPPING[kind]
                out.setdefault(mapping[cfg_cls], cfg_cls)
            except Exception:  # noqa: BLE001 - a class that does not import is no candidate
                continue
        return [(c, m) for m, c in out.items()]
    return []


def _shared(config, cfg_cls) -> dict:
    """The model's config entries that ``cfg_cls`` has too (the sizes, eps, rotary settings, ...)."""
    have = _defaults(cfg_cls)
    return {k: v for k, v in config.to_dict().items() if not bookkeeping(k) and k in have}


@functools.cache
def _defaults(cfg_cls) -> dict:
    try:
        return cfg_cls().to_dict()
    except Exception:  # noqa: BLE001 - a config that needs arguments has no defaults to share
        return {}


def _built(cfg_cls, cls, entries: dict):
    try:
        return meta_model(cfg_cls(**entries), cls)
    except Exception:  # noqa: BLE001 - a config that does not build is no candidate
        return None


def _ranked(model, source: _Source):
    """The candidates holding expert tensors, in the order of: fewest of the model's tensors outside its FFNs
    missing (each must be copied), fewest FFN tensors kept (every FFN becomes experts), fewest new tensors (a
    router and experts, not shared experts besides), fewest config entries not shared (only an order: the
    alignment decides)."""
    mine = {k for k in model.config.to_dict() if not bookkeeping(k)}
    ranked = []
    for cfg_cls, cls in _mapping_of(model):
        if cfg_cls is type(model.config) or cls is type(model):
            continue
        meta = _built(cfg_cls, cls, _shared(model.config, cfg_cls))
        if meta is None:
            continue
        make_proxy(meta)
        tensors = _tensors(meta)
        if max((len(s) for _, s in tensors), default=0) <= source.most:
            continue  # no expert tensors
        missing = source.tensors - tensors
        theirs = {k for k in _defaults(cfg_cls) if not bookkeeping(k)}
        outside = sum(n for (name, _), n in missing.items() if name not in source.ffn)
        kept = sum(n for (name, _), n in (source.tensors - missing).items() if name in source.ffn)
        extra = sum((tensors - source.tensors).values())
        ranked.append(((outside, kept, extra, len(theirs ^ mine), cls.__name__), cfg_cls, cls))
    return [(c, m) for _, c, m in sorted(ranked, key=lambda r: r[0])]


def _fit(model, cfg_cls, cls, source: _Source, experts: int, top_k: int) -> dict:
    """The fields that make ``cls`` the model upcycled into ``experts`` experts of top ``top_k`` (``_NotIt``).
    The graph is aligned with at least the candidate's own expert count (its default top-k then runs)."""
    base = _shared(model.config, cfg_cls)
    field_, default = _expert_field(cfg_cls, cls, base, source, experts)
    fields = {**_width_fields(cfg_cls, cls, {**base, field_: experts}, source, field_), field_: experts}
    wide = max(experts, default)
    graph = _aligned(cfg_cls, cls, {**base, **fields, field_: wide}, source)
    fields.update(_top_k_fields(cfg_cls, cls, {**base, **fields}, source, _choice_k(graph, wide), experts, top_k))
    return fields


def _expert_tensors(meta, source: _Source) -> dict:
    return {n: tuple(t.shape) for n, t in named_tensors(meta) if t.dim() > source.most}


def _ints(cfg_cls, entries: dict, source: _Source) -> dict:
    """The candidate's integer fields that the model's config lacks (token ids never)."""
    cfg = {**_defaults(cfg_cls), **entries}
    mine = source.model.config.to_dict()
    return {k: v for k, v in cfg.items() if type(v) is int and k not in mine and not is_token_field(k)
            and not bookkeeping(k)}


def _expert_field(cfg_cls, cls, base: dict, source: _Source, experts: int) -> tuple:
    """(the field whose change moves the expert tensors' expert axis alone, its value in the candidate)."""
    before = _expert_tensors(_built(cfg_cls, cls, base), source)
    sizes = {n for s in before.values() for n in s}
    probe = experts if experts not in sizes else next(p for p in range(experts + 1, 1 << 20) if p not in sizes)
    for k, v in _ints(cfg_cls, base, source).items():
        if v not in sizes:
            continue
        meta = _built(cfg_cls, cls, {**base, k: probe})
        after = _expert_tensors(meta, source) if meta is not None else {}
        if after.keys() == before.keys() and all(_one_axis(before[n], after[n], v, probe) for n in before):
            if probe != experts and _built(cfg_cls, cls, {**base, k: experts}) is None:
                continue
            return k, v
    raise _NotIt(f"no field sets the expert count ({len(before)} expert tensors)")


def _one_axis(old: tuple, new: tuple, v: int, probe: int) -> bool:
    moved = [(a, b) for a, b in zip(old, new) if a != b]
    return len(old) == len(new) and len(moved) == 1 and moved[0] == (v, probe)


def _width_fields(cfg_cls, cls, entries: dict, source: _Source, count: str) -> dict:
    """{field: the FFN's width} for the fields the model's config lacks whose value is a size of the candidate's
    new tensors and of none of the model's (an expert's or a shared expert's width; not ``count``, the expert
    count's field, nor another field of its value): copies then fill them."""
    meta = _built(cfg_cls, cls, entries)
    tensors = {(n, tuple(t.shape)) for n, t in named_tensors(meta)}
    missing = {s for _, s in source.tensors - collections.Counter(tensors)}
    kept = {n for _, s in set(source.tensors) & tensors for n in s}
    widths = {n for s in missing for n in s} - kept
    if len(widths) != 1:
        return {}
    width = widths.pop()
    new = {n for _, s in tensors - set(source.tensors) for n in s} - {n for _, s in source.tensors for n in s}
    out = {}
    for k, v in _ints(cfg_cls, entries, source).items():
        if v in new and v > 1 and k != count and v != entries[count] \
                and _built(cfg_cls, cls, {**entries, **out, k: width}) is not None:
            out[k] = width
    return out


def _aligned(cfg_cls, cls, entries: dict, source: _Source):
    """The candidate's two-block graph, aligned with the model's (``_NotIt`` where the graphs differ elsewhere)."""
    meta = _built(cfg_cls, cls, entries)
    make_proxy(meta)
    try:
        graph = capture(meta).gm
        al = align(source.graph, graph)
    except SpecError as error:
        raise _NotIt(first_line(error).removeprefix("into: ")) from None
    except Exception as error:  # noqa: BLE001 - a candidate that does not export is not the target
        raise _NotIt(f"does not export: {type(error).__name__}: {first_line(error)}") from None
    kept = sorted(name for name in al.params.values() if name in source.ffn)
    if not al.regions or kept:
        raise _NotIt(f"its graph keeps the FFN `{kept[0]}` dense" if kept else "its graph replaces no FFN")
    return graph


def _top_k_fields(cfg_cls, cls, entries: dict, source: _Source, k0: set, experts: int, top_k: int) -> dict:
    """{field: top_k} for the field holding ``k0``, the k of the graph's top-k over the expert scores (none where
    it is ``top_k`` already), checked by exporting the candidate at ``entries`` with it: its top-k runs ``top_k``."""
    if len(k0) != 1:
        raise _NotIt(f"its top-k over the experts runs {sorted(k0) or 'nowhere'}")
    old = k0.pop()
    options = [{}] if old == top_k else [{k: top_k} for k, v in _ints(cfg_cls, entries, source).items() if v == old]
    for change in options:
        meta = _built(cfg_cls, cls, {**entries, **change})
        if meta is None:
            continue
        make_proxy(meta)
        try:
            if _choice_k(capture(meta).gm, experts) == {top_k}:
                return change
        except Exception:  # noqa: BLE001 - a field whose change breaks the export is not the top-k
            continue
    raise _NotIt(f"no field sets its top-k to {top_k} (the graph chooses {old})")


def _choice_k(gm, experts: int) -> set:
    """The k of every top-k over a last axis of E scores (the experts' choice)."""
    return {int(n.args[1]) for n in gm.graph.nodes
            if TOPK(n) and isinstance(n.args[0].meta.get("val"), torch.Tensor)
            and n.args[0].meta["val"].shape[-1] == experts}


def upcycle_by_search(model, experts: int, top_k: int, *, seed: int = 0, strict: bool = False):
    """``model`` (dense) upcycled into the class ``find_moe`` finds: ``pipeline/upcycle.py``'s growth, whose record
    notes say which class was found, the fields set and the candidates tried before it."""
    found = find_moe(model, experts, top_k)
    grown = upcycle(model, found.config, found.cls, seed=seed, strict=strict)
    set_ = ", ".join(f"{k}={v!r}" for k, v in found.fields.items())
    before = f"; tried first: {', '.join(c for c, _ in found.tried)}" if found.tried else ""
    grown.growir_record.notes.insert(0, f"experts={experts}, top_k={top_k}: {found.cls.__name__} found by search, "
                                        f"its graph the model's with FFNs made experts ({set_}){before}")
    return grown
