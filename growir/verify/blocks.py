"""Verify a streamed growth block by block, never holding either model whole: ``check_blocks``.

Source and grown run in float32 on a few short sequences (the plan's example inputs), each as a
:class:`growir.lazy_model.LazyModel` (every module's tensors read from the shards just before its forward,
dropped after). The blocks are the block lists the plan's graph analysis found (``growir.analysis.blocks``,
on the two-block proxy); the units compared are: the input of each list's first block (what the embedding
made), every block's output (the residual stream it hands on), and the model's outputs (after the final
norm and head). The grown value is mapped back to the source's positions with the plan's index maps for
that value's axes (the residual stream's group at a block boundary, the output maps at the end) and divided by
the factor the rules put on it (a rescaled residual stream; a post-norm block's output norm divided for a tied
head, ``_rule_factors``), and the deviation is max|Δ| / max(1, max|source|) against ``TOLERANCE``, as
``grow``'s self-check (both are :mod:`growir.verify.compare`). A grown block made by depth growth is compared
with the source block it follows (``Schedule.sources``). Errors carry forward, so the unit where the deviation
first exceeds the tolerance is where the growth went wrong; the report names it.

>>> import tempfile, torch, growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> src, out = tempfile.mkdtemp(), tempfile.mkdtemp() + "/grown"
>>> LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
...     num_attention_heads=4, num_key_value_heads=2, vocab_size=100)).to(torch.bfloat16).save_pretrained(src)
>>> check = growir.grow_checkpoint(src, out, width=2.0, verify=True).check
>>> check.preserved, check.worst[0] in check.deviations
(True, True)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree

from ..analysis.norms import scaling_params
from ..errors import GrowthError, first_line
from ..ir.axes import is_structured
from .compare import TOLERANCE, axis_maps, deviation, output_maps
from .lazy_model import LazyModel


@dataclass
class BlockCheck:
    """Per unit (a block's output, a block list's input, the model's outputs): its float32 deviation."""
    deviations: dict  # unit name -> max|Δ| / max(1, max|source|), in the grown model's order
    exact: bool  # whether the growth claims to preserve the function (else the numbers are for information)
    seconds: float = 0.0
    sequences: int = 0
    peak_bytes: int = 0  # the most float32 tensor bytes held at once (source or grown)
    notes: list = field(default_factory=list)

    @property
    def worst(self) -> tuple:
        """(unit, deviation) with the largest deviation."""
        return max(self.deviations.items(), key=lambda kv: kv[1], default=(None, 0.0))

    @property
    def first_failing(self) -> str | None:
        """The first unit, in run order, beyond the tolerance: where the grown model goes wrong."""
        return next((k for k, v in self.deviations.items() if not v <= TOLERANCE), None)

    @property
    def finite(self) -> bool:
        """Whether every deviation is a number: a NaN or Inf is a failure whatever the growth claims (no rounding
        or inexact method makes one)."""
        return all(math.isfinite(v) for v in self.deviations.values())

    @property
    def preserved(self) -> bool:
        """Whether every unit is within the tolerance (:data:`growir.verify.compare.TOLERANCE`)."""
        return self.first_failing is None

    def summary(self) -> str:
        """One line: the verdict, the first unit beyond the tolerance, the worst unit, time and memory."""
        name, dev = self.worst
        head = "preserved" if self.preserved else f"NOT preserved from `{self.first_failing}` on " \
                                                  f"({self.deviations[self.first_failing]:.3g})"
        return (f"block check: {head}; worst `{name}` {dev:.3g} (float32, relative) over {len(self.deviations)} "
                f"units, {self.sequences} sequences, {self.seconds:.1f} s, at most "
                f"{_size(self.peak_bytes)} of weights held")

    def __str__(self) -> str:
        """The summary and every unit's deviation in run order; beyond 16 units, the five largest."""
        shown = list(self.deviations.items())
        if len(shown) > 16:
            shown = sorted(shown, key=lambda kv: -kv[1])[:5]
        rows = [f"  {name:<40} {dev:.3g}" for name, dev in shown]
        left = len(self.deviations) - len(shown)
        more = [f"  ({left} more units, all smaller)"] if left else []
        return "\n".join([self.summary()] + rows + more + self.notes)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


@dataclass
class _List:
    """One block list to watch: its prefix, source and grown block counts, per grown position (the source block it
    copies, the one whose output it hands on), the index maps and factor of its input and of its blocks' outputs
    (block 0's, the last block's), and per grown block the factor its own rules put on its output."""
    prefix: str
    n: int
    n_new: int
    sources: list
    in_maps: tuple
    out_maps: list
    factors: list


def check_blocks(src_dir, grown_dir, fp, grown_config, maps, schedules: list, exact: bool = True,
                 rules: dict | None = None) -> BlockCheck:
    """Compare the folders ``src_dir`` and ``grown_dir`` block by block (see the module docstring).

    ``fp``: the source's ``FolderPlan``; ``maps``: (width index maps: group root -> ``GroupMap``, residual
    scales: group root -> c where the grown stream is c times its copies, see ``passes/rescale.py``);
    ``schedules``: the depth schedules; ``rules``: the grown model's per-tensor rules (without them, a block
    whose output norm was scaled for what reads the stack, ``_rule_factors``, reads as a departure).
    Only one module's tensors of one model are in memory at a time.
    """
    maps, scales = maps
    start = time.perf_counter()
    p = fp.plan
    args, kwargs = p.captured.args, p.captured.kwargs
    lists, notes = _block_lists(p, fp.counts, maps, scales, schedules, rules or {})
    with torch.no_grad(), LazyModel(src_dir, fp.config, fp.cls) as source:
        seen = _run(source, lists, args, kwargs, grown=False)
        peak = source.peak_bytes
    del source
    out_maps = output_maps(p, maps)
    with torch.no_grad(), LazyModel(grown_dir, grown_config, fp.cls) as grown:
        deviations = _compare(seen, _run(grown, lists, args, kwargs, grown=True), out_maps)
        peak = max(peak, grown.peak_bytes)
    sequences = int(pytree.tree_leaves((args, kwargs))[0].shape[0])
    return BlockCheck(deviations, exact, time.perf_counter() - start, sequences, peak, notes)


def _block_lists(p, counts: dict, maps: dict, scales: dict, schedules: list, rules: dict):
    """The plan's block lists (nested ones; parallel lists are compared at the model's outputs only)."""
    by_prefix = {s.blocks.prefix: s for s in schedules}
    items, notes = [], []
    for b in p.blocks:
        if b.containers or not b.homogeneous or not b.chain_out:
            notes.append(f"  (`{b.prefix}`: compared at the model's outputs only)")
            continue
        n = counts.get(b.prefix, b.count)
        sched = by_prefix.get(b.prefix)
        sources = _followed(sched) if sched is not None else [(i, i) for i in range(n)]
        at = lambda node: (axis_maps(p, p.facts.axes.get(node.name), maps), _scale(p, node, scales))
        items.append(_List(b.prefix, n, len(sources), sources, at(b.chain_in[0]),
                           [at(b.chain_out[0]), at(b.chain_out[-1])], _rule_factors(p, b, len(sources), rules)))
    return items, notes


def _rule_factors(p, b, n_new: int, rules: dict) -> list:
    """Per grown block, the factor its output carries beyond block 0's where that output is a norm's (post-norm
    blocks): the norm's rule scale over block 0's. The blocks of a list share their rules, so a factor every block
    has (a fill's norm rescale) cancels; what is left was set for what reads the stack's output: the tied head's
    1/n on the norm before it (``passes/exactness.compensate_tied``), which a post-norm stack's last block is."""
    params = [scaling_params(node, p.facts) for node in (b.chain_out[0], b.chain_out[-1])]
    if not rules or not params[0] or len(params[0]) != len(params[1]):
        return [1.0] * n_new
    factors = []
    for i in range(n_new):
        mine = params[0 if i < n_new - 1 else 1]
        ratios = {_scale_of(rules, b, q, i) / _scale_of(rules, b, r, 0) for q, r in zip(mine, params[0])}
        factors.append(ratios.pop() if len(ratios) == 1 else 1.0)  # weight and bias scaled apart: no one factor
    return factors


def _scale_of(rules: dict, b, name: str, block: int) -> float:
    """The rule scale of the proxy's state ``name`` moved into block ``block`` of the grown list ``b`` (its name
    there by ``Blocks.suffix_of`` and ``Blocks.name``, container lists included; a state outside the list: its own)."""
    suffix = next((s for j in range(b.count) if (s := b.suffix_of(j, name)) is not None), None)
    rule = rules.get(b.name(block, suffix) if suffix is not None else name)
    return rule.scale if rule is not None and rule.scale else 1.0


def _followed(sched) -> list:
    """Per grown position, (the source block it copies, the source block whose output it hands on): its own
    for a block in place, the one before it for an added block (an identity block hands its input on; with
    periods, 0 1 0 1, the added copy of 0 follows 1)."""
    out, last = [], None
    for src, fresh in zip(sched.sources, sched.fresh):
        last = src if not fresh or last is None else last
        out.append((src, last))
    return out


def _run(lazy: LazyModel, lists: list, args, kwargs, grown: bool) -> dict:
    """Run the model once; returns {unit: (name, value, index maps)} in run order."""
    seen, mark = {}, [0]
    inside = tuple(lst.prefix + "." for lst in lists)

    def outside_since() -> list:
        mods = [m or type(lazy.model).__name__ for m in lazy.loaded[mark[0]:] if not m.startswith(inside)]
        mark[0] = len(lazy.loaded)
        return mods

    handles = [h for lst in lists for h in _watch(lazy.model.get_submodule(lst.prefix), lst, seen, outside_since,
                                                  grown)]
    try:
        outputs = pytree.tree_leaves(lazy.model(*args, **kwargs))
    except (RuntimeError, NotImplementedError) as error:
        if "meta" not in str(error):
            raise
        raise GrowthError(f"cannot verify {type(lazy.model).__name__} block by block: a forward reads tensors of a "
                          f"module it does not own, which are read only while that module runs ({first_line(error)}); "
                          f"use verify='onnx' (both models loaded) if they fit in memory") from error
    finally:
        for h in handles:
            h.remove()
    mods = outside_since()
    name = "outputs" + (f" (after {', '.join(mods)})" if mods else "")
    seen[("out",)] = (name, outputs, None)
    return seen


def _watch(container, lst: _List, seen: dict, outside_since, grown: bool) -> list:
    """Hooks that record the list's input and each block's output into ``seen``; returns their handles."""
    def first_in(module, a, k):
        mods = outside_since()
        name = f"input of `{lst.prefix}`" + (f" (after {', '.join(mods)})" if mods else "")
        seen[("in", lst.prefix)] = (name, _hidden(a, k, len(lst.in_maps[0] or [])), lst.in_maps)
    handles = [container._modules["0"].register_forward_pre_hook(first_in, with_kwargs=True)]
    count = lst.n_new if grown else lst.n
    for i in range(count):
        src, ref = lst.sources[i] if grown else (i, i)
        key = (lst.prefix, ref, i) if grown else (lst.prefix, i)
        label = f"{lst.prefix}.{i}" + (f" (from source block {src})" if grown and count != lst.n else "")
        index_maps, factor = lst.out_maps[0 if i < count - 1 else 1]
        block_maps = (index_maps, factor * (lst.factors[i] if grown else 1.0))

        def out(module, a, o, key=key, label=label, block_maps=block_maps):
            outside_since()
            seen[key] = (label, _first_tensor(o), block_maps)
        handles.append(container._modules[str(i)].register_forward_hook(out))
    return handles


def _scale(p, node, scales: dict) -> float:
    """The factor the grown value carries over its copies: c for a rescaled residual stream, else 1."""
    c = 1.0
    for axis in p.facts.axes.get(node.name) or []:
        tree = p.facts.ag.expand(axis)
        c *= 1.0 if is_structured(tree) else scales.get(tree, 1.0)
    return c


def _hidden(args, kwargs, rank: int):
    """A block's residual input: its first floating tensor argument with the rank the graph gives it (0: any)."""
    return next(t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                and t.is_floating_point() and (not rank or t.dim() == rank))


def _first_tensor(out):
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _compare(source: dict, grown: dict, out_maps: list) -> dict:
    """{grown unit name: deviation}; a grown block is compared with the source block it follows."""
    deviations = {}
    for key, (name, value, maps) in grown.items():
        skey = key[:2]  # a grown block (prefix, source position, own position) -> the source's (prefix, position)
        if skey not in source:
            continue
        ref = source[skey][1]
        if key == ("out",):
            devs = [deviation(a, b, out_maps[k] if k < len(out_maps) else None)
                    for k, (a, b) in enumerate(zip(ref, value))]
            deviations[name] = max([d for d in devs if d is not None], default=0.0)
        else:
            deviations[name] = deviation(ref, value / maps[1], maps[0])
    return deviations

