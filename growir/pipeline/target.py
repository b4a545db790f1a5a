"""Grow into a target config: every growth derived from the source's graph and the target's (``grow(into=)``).

Both models are planned weight-free (the target built on the meta device from its config, deep ones as their
two-block proxies). The state_dict names of two models of one class coincide; each parameter axis is made of the
same groups in both (``Plan.layout``), so walking the two layouts side by side pairs every source group with the
target group that the same axes belong to, and the target group's size is the size to grow to. The pairs become
a role dict for ``resolve_width`` (checked to give every group exactly its paired size) and ``layers=`` for the
block lists. A pair that no growth gives (a smaller size, a fixed axis such as the vocabulary that differs, a
layout that differs) is a SpecError naming the config field. A target of another class (or one holding expert
tensors where the model has FFN matrices) is a dense → MoE upcycling instead, which ``pipeline/upcycle.py`` does.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> kw = dict(num_hidden_layers=2, vocab_size=100, head_dim=8)
>>> small = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=6,
...                                      num_key_value_heads=3, **kw))
>>> into = derive(small, LlamaConfig(hidden_size=80, intermediate_size=160, num_attention_heads=10,
...                                  num_key_value_heads=5, **dict(kw, num_hidden_layers=3)))
>>> into.width, into.layers
({'hidden': 80, 'heads': 10, 'kv_heads': 5, 'ffn': 160}, 3)
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

from ..analysis.plan import WIDTH_ROLES, resolve_width
from ..errors import MaterializeError, SpecError
from ..frontend.folder import load_config, meta_model
from ..ir.axes import is_structured
from .context import Context
from .manager import run_passes
from .stages import PROXY_PLAN


def bookkeeping(key: str) -> bool:
    """Whether a config entry describes the file rather than the model (never compared): a private one, the
    entries a bare ``PretrainedConfig`` holds as text (its version, type, where it was loaded from), and the
    class and dtype it was saved with."""
    return key.startswith("_") or key.endswith("dtype") or key in _text_entries() | {"architectures"}


@functools.cache
def _text_entries() -> frozenset:
    import transformers

    return frozenset(k for k, v in transformers.PretrainedConfig().to_dict().items() if isinstance(v, str))


@dataclass
class Into:
    """A growth into ``config``: the width role dict and layer count that give it, and the target's class."""
    config: object
    cls: type
    width: dict
    layers: int | None
    source_config: object = None
    upcycle: bool = False  # another class whose graph is the model's with FFNs made mixtures of experts

    def settle(self, grown) -> list[str]:
        """Check the grown model against the target: its class, and its config in every field the growth
        decided (those that differ from the source's): another class is a MaterializeError, a field set otherwise a
        SpecError.
        Returns notes naming the target's fields that no growth decides and that kept the source's value."""
        if not isinstance(grown, self.cls):
            raise MaterializeError(f"into: the grown model is a {type(grown).__name__}, not the target's "
                                   f"{self.cls.__name__}: no config of that class computes the grown function")
        return self.settle_config(grown.config)

    def settle_config(self, grown_config) -> list[str]:
        """``settle`` for a config alone (a streamed growth chooses its config before writing a tensor); a
        field the growth set to a value other than the target's is a SpecError."""
        src, new, want = (_flat(c) for c in (self.source_config, grown_config, self.config))
        for key in sorted(k for k in set(new) | set(want) if not bookkeeping(k)):
            if new.get(key) != src.get(key) and new.get(key) != want.get(key):
                raise SpecError(f"into: preserving the function needs {key}={new.get(key)!r} in the grown config, "
                                f"but the target says {want.get(key)!r}: this growth cannot reach the target exactly")
        kept = [k for k in sorted(want) if not bookkeeping(k) and want[k] != new.get(k)]
        said = ", ".join(f"{k}={new.get(k)!r} (target: {want[k]!r})" for k in kept)
        return [f"into: kept the source's {said}: no growth decides them"] if kept else []


def load_target(target):
    """(config, class named by its ``architectures`` or None) from a transformers config, a model folder or a
    ``config.json`` path."""
    import transformers

    if isinstance(target, transformers.PretrainedConfig):
        config = copy.deepcopy(target)
    elif isinstance(target, (str, Path)) and Path(target).is_dir():
        config, cls = load_config(target)
        return config, cls if getattr(config, "architectures", None) else None  # a bare config names no class
    elif isinstance(target, (str, Path)) and Path(target).is_file():
        try:
            config = transformers.AutoConfig.from_pretrained(target, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise SpecError(f"into={str(target)!r}: not a transformers config.json ({error})") from error
    else:
        raise SpecError(f"into={target!r}: give a transformers config, a model folder or a config.json path")
    arch = (getattr(config, "architectures", None) or [None])[0]
    return config, getattr(transformers, arch, None) if arch else None


def derive(model, target, width=1.0, depth=1.0, layers=None) -> Into:
    """The growth of ``model`` (a transformers model; meta works) into ``target`` (``load_target``'s forms):
    a role dict and ``layers``. ``width``, ``depth`` and ``layers`` must be left at their defaults (``into``
    decides them). A target of another class, or with expert tensors where the model has FFN matrices, is an
    upcycling (``upcycle=True``, ``pipeline/upcycle.py`` grows it). SpecError: a smaller size, a field no growth
    reaches, a config no class of the model's kind reads."""
    if width != 1.0 or depth != 1.0 or layers is not None:
        raise SpecError("into= derives the width and the depth from the target: leave width, depth and layers out")
    source_config = getattr(model, "config", None)
    if source_config is None or not hasattr(source_config, "to_dict"):
        raise SpecError(f"into= needs a transformers model (one with a config); {type(model).__name__} has none")
    config, cls = load_target(target)
    cls = target_class(model, config, cls)
    if cls is None:
        raise SpecError(f"into: no transformers class for a {type(config).__name__} does what a "
                        f"{type(model).__name__} does (name it in the config's `architectures`)")
    meta = meta_model(config, cls)
    if cls is not type(model) or _has_experts_beyond(model, meta):  # dense FFNs into experts (``upcycle.py``)
        return Into(config, cls, {}, None, source_config, upcycle=True)
    src, tgt = _planned(model), _planned(meta)
    fields = _FieldNamer(source_config, config)
    layers = _layers(src, tgt, fields)  # first: a shallower target's proxy lacks blocks the source has
    pairs = _pairs(src.plan, tgt.plan, fields)
    return Into(config, cls, _role_dict(src.plan, tgt.plan, pairs, fields), layers, source_config)


def target_class(model, config, cls=None):
    """The class ``model`` grows into for ``config``: ``cls`` (named by the config), else the model's own for a
    config of the model's kind, else the class of the model's head for ``config`` (``same_head``); None: none."""
    return cls or (type(model) if type(config) is type(model.config) else same_head(model, config))


def upcycles(model, target) -> bool:
    """Whether growing ``model`` into ``target`` (``load_target``'s forms) makes experts of its FFNs (``derive``'s
    ``upcycle``), from the two configs alone: nothing is planned (``growir grow`` grows these in memory).

    >>> from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig
    >>> kw = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    >>> upcycles(LlamaForCausalLM(LlamaConfig(**kw)), MixtralConfig(**kw))
    True
    """
    config, cls = load_target(target)
    cls = target_class(model, config, cls)
    return cls is not None and (cls is not type(model) or _has_experts_beyond(model, meta_model(config, cls)))


def same_head(model, config):
    """The transformers class for ``config`` with the model's head: what the auto mapping that gives the model's
    class for the model's config gives for ``config`` (a causal LM for a causal LM), or None."""
    from transformers.models.auto import modeling_auto

    for mapping in vars(modeling_auto).values():
        if isinstance(mapping, modeling_auto._LazyAutoMapping):
            try:
                if mapping[type(model.config)] is type(model):
                    return mapping[type(config)]
            except (KeyError, ValueError):
                continue
    return None


def derive_folder(src, target, width=1.0, depth=1.0, layers=None) -> Into:
    """``derive`` for the model folder ``src`` (its config.json alone, planned on the meta device)."""
    config, cls = load_config(src)
    into = derive(meta_model(config, cls), target, width, depth, layers)
    if into.upcycle:
        raise SpecError(f"into: a {into.cls.__name__} makes experts of the model's FFNs, which growir does in memory "
                        f"only so far: load the model and call growir.grow(model, into=...), then save it")
    return into


def _has_experts_beyond(model, target) -> bool:
    """Whether the target (of the model's class) holds tensors of more axes than any the model holds: expert
    tensors (E, out, in) where the model has FFN matrices, a dense layer made a mixture of experts."""
    most = max((t.dim() for t in model.state_dict().values()), default=0)
    return any(t.dim() > most for t in target.state_dict().values())


def _planned(model) -> Context:
    return run_passes(PROXY_PLAN, Context(model=model))


class _FieldNamer:
    """Names the config field behind a size: the entries whose values are the two sizes (else the role)."""

    def __init__(self, source_config, target_config):
        self.src, self.tgt = _flat(source_config), _flat(target_config)

    def __call__(self, old, new, fallback: str) -> str:
        keys = [k for k in self.src if not bookkeeping(k) and self.src[k] == old and self.tgt.get(k) == new]
        return " / ".join(keys) if keys else fallback

    def differing(self) -> list[str]:
        """The entries the two configs set differently."""
        return [k for k in self.tgt if not bookkeeping(k) and self.src.get(k) != self.tgt[k]]


def _flat(config) -> dict:
    """``config.to_dict()`` with nested sub-configs as dotted keys (a multimodal model's text config)."""
    import transformers

    out = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict) and isinstance(getattr(config, key, None), transformers.PretrainedConfig):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _pairs(src_plan, tgt_plan, fields) -> dict:
    """Source group id -> target group, from the layouts of every parameter axis the two graphs share."""
    pairs = {}
    tgt_params = set(tgt_plan.facts.params.values())
    extra = sorted(tgt_params - set(src_plan.facts.params.values()))
    if extra:
        flags = [k for k in fields.differing() if isinstance(fields.tgt[k], bool) or fields.tgt[k] is None]
        raise SpecError(f"into: the target has parameters the model lacks (`{extra[0]}`, {len(extra)} in all; "
                        f"the configs differ in {', '.join(flags) or 'their sizes'}): no growth adds them")
    for node, name in src_plan.facts.params.items():
        if name not in tgt_params:
            raise SpecError(f"into: the target has no parameter `{name}`: its graph is not the source's grown")
        for axis in range(len(src_plan.facts.axes[node])):
            where = f"`{name}` axis {axis}"
            _walk(src_plan, tgt_plan, _tree(src_plan, name, axis), _tree(tgt_plan, name, axis), pairs, where, fields)
    return pairs


def _tree(plan, name: str, axis: int):
    node = next(n for n, s in plan.facts.params.items() if s == name)
    return plan.facts.ag.expand(plan.facts.axes[node][axis])


def _walk(src_plan, tgt_plan, a, b, pairs: dict, where: str, fields) -> None:
    if is_structured(a) or is_structured(b):
        if not (is_structured(a) and is_structured(b) and a[0] == b[0] and len(a[1]) == len(b[1])):
            raise SpecError(f"into: {where} is made differently in the target: its graph is not the source's grown")
        for x, y in zip(a[1], b[1]):
            _walk(src_plan, tgt_plan, x, y, pairs, where, fields)
        return
    g, h = src_plan.group_of(a), tgt_plan.group_of(b)
    old, new = src_plan.facts.ag.size[a], tgt_plan.facts.ag.size[b]
    if g is None or h is None or g.pinned:
        if old != new:
            why = g.pinned if g is not None and g.pinned else "an axis no width group grows"
            raise SpecError(f"into: the target's {fields(old, new, where)} is {new} where the model's is {old} "
                            f"({where}: {why}); no growth reaches it")
        return
    if h.role != g.role or pairs.setdefault(g.id, h) is not h:
        raise SpecError(f"into: {where} pairs the model's group {g.label} with the target's {h.label}, which "
                        f"{'has another role' if h.role != g.role else 'differs from the other axes of the group'}")
    if new < old:
        raise SpecError(f"into: the target's {fields(old, new, g.role)} is {new}, smaller than the model's {old} "
                        f"({g.label}): growir only grows")


def _role_dict(src_plan, tgt_plan, pairs: dict, fields) -> dict:
    """The role dict whose resolution gives every source group its paired target size (or a SpecError)."""
    want = {gid: h.size for gid, h in pairs.items()}
    spec = {}
    for role in WIDTH_ROLES:
        if role == "head_dim":
            sizes = {tgt_plan.facts.ag.size_of(s["q"][-1]) for s in tgt_plan.facts.attention}
            old = {src_plan.facts.ag.size_of(s["q"][-1]) for s in src_plan.facts.attention}
        elif role == "heads":
            sizes, old = _query_heads(tgt_plan), _query_heads(src_plan)
        else:
            sizes = {want[g.id] for g in src_plan.by_role(role) if g.id in want}
            old = {g.size for g in src_plan.by_role(role)}
        if len(sizes) > 1:
            raise SpecError(f"into: the target's {role} sizes differ between its layers ({sorted(sizes)}): growir "
                            f"grows every {role} group to one size")
        if sizes and sizes != old:
            spec[role] = int(next(iter(sizes)))
    resolved = resolve_width(src_plan, spec)
    for g in src_plan.groups:  # a group with no role (a pooler's output) takes the size the rebuilt config gives
        if g.role and g.id in want and resolved.get(g.id, g.size) != want[g.id]:
            raise SpecError(f"into: the target's {fields(g.size, want[g.id], g.role)} cannot be reached: {spec} "
                            f"gives {g.label} {resolved.get(g.id, g.size)}, the target has {want[g.id]}")
    return spec


def _query_heads(plan) -> set:
    """The query head count of each attention (kv heads x query heads per kv head where they are grouped)."""
    counts = set()
    for site in plan.facts.attention:
        n = 1
        for root in plan.facts.ag.leaf_roots(site["q"][1]):
            n *= plan.facts.ag.size[root]
        counts.add(n)
    return counts


def _layers(src: Context, tgt: Context, fields) -> int | None:
    """``layers=`` for the block lists: the one count that every list of the target has."""
    have = {b.prefix: src.counts.get(b.prefix, b.count) for b in src.plan.blocks}
    want = {b.prefix: tgt.counts.get(b.prefix, b.count) for b in tgt.plan.blocks}
    for prefix in set(have) - set(want):  # one block is no repeated list: count the target's modules there
        try:
            want[prefix] = len(tgt.model.get_submodule(prefix))
        except (AttributeError, TypeError):
            raise SpecError(f"into: the target has no block list `{prefix}`: its graph is not the source's "
                            f"grown") from None
    for prefix, old in have.items():
        new = want[prefix]
        if new < old:
            raise SpecError(f"into: the target's {fields(old, new, 'layer count')} is {new}, fewer than the "
                            f"model's {old} blocks in `{prefix}`: growir only grows")
    if all(want[p] == n for p, n in have.items()):
        return None
    counts = {want[p] for p in have}
    if len(counts) > 1:
        raise SpecError(f"into: the target's block lists grow to different counts ({want}): one layers= grows "
                        f"every list to one count")
    return counts.pop()
