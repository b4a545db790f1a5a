"""Choosing the grown config on a proxy: the same widths, two blocks, a small vocabulary, random weights.

Several configs can rebuild the grown shapes while computing different functions (a head count shapes the
computation, not the parameters), so ``grow`` picks the config by running the rebuilt model. A streamed
checkpoint may not fit in memory; its proxy does, and the config it picks is the full model's config with
the proxy's block counts and vocabulary put back. The fields that make the proxy are found by trying them:
a field is a block count if setting it to two rebuilds exactly the two-block proxy's module tree.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch

from .checkpoint import PROXY_BLOCKS, _signature, meta_model

SMALL_VOCAB = 128


@dataclass
class Choice:
    config: object  # the grown model's config
    changes: dict  # field -> new value
    deviation: float | None  # the proxy's measured deviation
    keep_eps: bool  # the config cannot express a rescaled eps: the rules keep it


def choose_config(fp, sizes: dict, depth_plan: list, width, width_method: str, depth_method: str,
                  low_precision: bool = False) -> Choice:
    """The grown config for the folder plan ``fp`` (see the module docstring). ``low_precision``: the weights are
    written below float32 precision, where ``width_method="auto"`` copies some groups it would otherwise fill
    (``passes/fresh.py``); the proxy is then grown in bfloat16 so that its config follows the same choice."""
    from .api import grow
    from .materialize import _follow_lists
    from .passes.depth import schedule

    base = fp.config.to_dict()
    small, layer_fields = _proxy_fields(fp, base)
    proxy_cfg = type(fp.config).from_dict({**base, **small})
    torch.manual_seed(0)
    proxy = fp.cls(proxy_cfg).to(torch.bfloat16 if low_precision else torch.float32).eval()
    spec = _proxy_depth(fp, depth_plan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grown = grow(proxy, width=width, width_method=width_method, depth_method=depth_method, materialize="hf",
                     **spec)  # the config is what we want: no GraphModule in its place
    record = grown.growir_record
    changes = {k: v for k, v in record.config_changes.items() if k not in small}
    full_layers, sources = {}, {}
    for b, new in depth_plan:
        n = fp.counts.get(b.prefix, b.count)
        full = dataclasses.replace(b, paths=[f"{b.prefix}.{i}" for i in range(n)])
        sources[n] = schedule(full, new, depth_method).sources
        if new != n:  # a list of two blocks or fewer is its own proxy: its count change came with `changes`
            full_layers.update({k: new for k in layer_fields.get(b.prefix, [])})
    cfg = _follow_lists(base, {**base, **changes, **full_layers}, sources)
    changes.update(full_layers)
    floats = any(isinstance(v, float) for v in changes.values())
    keep_eps = _needs_eps(fp, sizes, width_method, low_precision) and not floats
    return Choice(type(fp.config).from_dict(cfg), changes, record.deviation, keep_eps)


def _proxy_fields(fp, base: dict):
    """(field -> proxy value, block list prefix -> its count fields): the fields that, set to two, rebuild
    the two-block proxy, and those holding a large input-only size (the vocabulary) that can shrink."""
    want = _signature(fp.proxy)
    small, layer_fields = {}, {}
    for prefix, n in fp.counts.items():
        for k, v in base.items():
            if type(v) is int and v == n and _builds_like({**base, **small, k: PROXY_BLOCKS}, fp, want):
                small[k] = PROXY_BLOCKS
                layer_fields.setdefault(prefix, []).append(k)
    keys = {t[0] for t in want[1]}
    for g in fp.plan.groups:
        if not g.pinned or not g.size or g.size <= SMALL_VOCAB:
            continue
        for k, v in base.items():
            if type(v) is int and v == g.size and k not in small:
                trial = _built({**base, **small, k: SMALL_VOCAB}, fp)
                if trial is not None and {t[0] for t in _signature(trial)[1]} == keys:
                    small[k] = SMALL_VOCAB
    return small, layer_fields


def _built(cfg: dict, fp):
    try:
        return meta_model(type(fp.config).from_dict(cfg), fp.cls)
    except Exception:  # noqa: BLE001 - a config that does not build is simply not the field we look for
        return None


def _builds_like(cfg: dict, fp, want) -> bool:
    m = _built(cfg, fp)
    return m is not None and _signature(m) == want


def _proxy_depth(fp, depth_plan: list) -> dict:
    """The proxy's depth spec: its blocks grown by about the full model's ratio (at least one more)."""
    if not depth_plan:
        return {}
    b, new = depth_plan[0]
    n = fp.counts.get(b.prefix, b.count)
    if new == n:
        return {}
    return {"layers": max(b.count + 1, round(new * b.count / n))}


def _needs_eps(fp, sizes: dict, width_method: str, low_precision: bool = False) -> bool:
    """Whether the width rules rescale a norm's eps (repeat-and-fill)."""
    from .api import Options, growth_rules
    opts = Options(width_method, low_precision=low_precision)
    return bool(growth_rules(fp.plan, sizes, [], opts)[0].eps_values)
