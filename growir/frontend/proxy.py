"""The two-block proxy: one cut of a deep model, for the in-memory growth and for streaming alike.

``torch.export`` traces every block, and most of a deep model's capture time is spent re-tracing blocks
that are identical by construction. A proxy keeps two blocks of each repeated block list (``make_proxy``: a
container whose children are numbered 0..n-1 and identical in structure); it is exported and analysed, and
its block rules are replicated by index to every block of the full model (``expansions``: the rules pass
``expand_blocks``). In memory (``make_model_proxy``) the proxy is a meta-device copy of the model (no weights
copied) and the rules are applied to the real tensors; streaming cuts the model built from ``config.json``
(``growir.stream.plan``). Nothing about exactness is taken from the proxy: the
rebuilt class is measured on the real source.

The proxy is checked before it is used: every child of a cut list is identical in structure (classes,
tensor names, shapes, dtypes) to the first one, the proxy's tensors expanded by index are exactly the full
model's tensors, and the graph runs the kept blocks as a chain of blocks. Where any of that fails, or the
result needs the full graph (a GraphModule to return), the whole model is captured, and the record says why
(``record.capture``). A growth that is not exact is checked against the proxy's graph with its blocks copied
out to the full grown lists (``materialize.graph.proxy_schedules``), not a second export.

>>> import torch, growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
...                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
>>> growir.grow(m, width=2.0).growir_record.capture
'a 2-block proxy of `model.layers` (4 blocks)'
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

import torch

from ..errors import GrowthError
from .export import is_hf
from .folder import named_tensors

PROXY_BLOCKS = 2


def signature(module: torch.nn.Module) -> tuple:
    """A module's structure: its submodules' classes and its tensors' names, shapes and dtypes."""
    mods = tuple((n, type(m).__qualname__) for n, m in module.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in named_tensors(module))
    return mods, tensors


def repeated_lists(model: torch.nn.Module) -> dict:
    """{module path: container} for containers whose children are numbered 0..n-1 (n > 2), all identical in
    structure; nested lists inside such a list are left alone (they are copied with their block)."""
    found = {}
    for path, mod in model.named_modules():
        keys = list(mod._modules)
        if len(keys) <= PROXY_BLOCKS or keys != [str(i) for i in range(len(keys))]:
            continue
        if any(path.startswith(p + ".") for p in found):
            continue
        sig = signature(mod._modules["0"])
        if all(signature(mod._modules[k]) == sig for k in keys[1:]):
            found[path] = mod
    return found


def make_proxy(model: torch.nn.Module) -> dict:
    """Truncate ``model``'s repeated block lists to two blocks, in place; returns {path: full count}."""
    counts = {}
    for path, mod in repeated_lists(model).items():
        counts[path] = len(mod._modules)
        for key in list(mod._modules)[PROXY_BLOCKS:]:
            del mod._modules[key]
    return counts


def check_proxy(plan, counts: dict) -> None:
    """The proxy's block lists are the ones the plan found, each with its two blocks."""
    found = {b.prefix: b for b in plan.blocks}
    for prefix in counts:
        b = found.get(prefix)
        if b is None or b.count != PROXY_BLOCKS or not b.homogeneous:
            why = "not found as blocks" if b is None else (b.why_not or f"{b.count} blocks")
            raise GrowthError(f"`{prefix}` has {counts[prefix]} identical children, but on the {PROXY_BLOCKS}-block "
                              f"proxy the graph does not run them as a chain of blocks ({why}); plan the full "
                              f"model with growir.plan(model) instead")


def expansions(name: str, counts: dict) -> list:
    """Where a two-block proxy's state name stands in the full model: ``[(full name, shift)]``, ``shift(s)`` moving
    any other name of the same block by as many blocks. Block 0 stands for blocks 0..n-2 and block 1 for
    block n-1 (the last block differs where a rule reads the next block, as AKI's donor does); a name outside
    every cut list stands for itself. The one loop behind ``expand_names`` and ``expand_block_rules``.

    >>> [full for full, _ in expansions("h.0.w", {"h": 3})], [full for full, _ in expansions("wte", {"h": 3})]
    (['h.0.w', 'h.1.w'], ['wte'])
    """
    hit = _block_of(name, counts)
    if hit is None:
        return [(name, lambda s: s)]
    prefix, k = hit
    n = counts[prefix]
    shifts = [lambda s, d=i - k: _shifted(s, prefix, d) for i in (range(n - 1) if k == 0 else [n - 1])]
    return [(shift(name), shift) for shift in shifts]


def expand_names(names, counts: dict) -> set:
    """State names of a two-block proxy as the full model's (``expansions``).

    >>> sorted(expand_names(["h.0.w", "h.1.w", "wte"], {"h": 3}))
    ['h.0.w', 'h.1.w', 'h.2.w', 'wte']
    """
    return {full for name in names for full, _ in expansions(name, counts)}


def expand_block_rules(rules: dict, counts: dict) -> dict:
    """Rules of a two-block proxy for the full block lists (``expansions``), every name in a rule shifted by
    the same number of blocks as the rule's own."""
    return {full: rule if full == name else dataclasses.replace(rule, source=shift(rule.source),
                                                                donor=rule.donor and shift(rule.donor))
            for name, rule in rules.items() for full, shift in expansions(name, counts)}


def _block_of(name: str, counts: dict):
    for prefix in counts:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
        if m:
            return prefix, int(m.group(1))
    return None


def _shifted(name: str, prefix: str, delta: int) -> str:
    m = re.match(re.escape(prefix) + r"\.(\d+)\.", name)
    return name if m is None else f"{prefix}.{int(m.group(1)) + delta}.{name[m.end():]}"


@dataclass
class Proxy:
    """A two-block proxy of a model: ``counts`` maps each cut block list to its full block count."""
    model: torch.nn.Module  # the proxy itself, on the meta device
    counts: dict
    source: dict = field(default_factory=dict, repr=False)  # the real model's tensors (ties under every name)

    def describe(self) -> str:
        """The proxy in words, for the growth record."""
        lists = ", ".join(f"`{k}` ({n} blocks)" for k, n in self.counts.items())
        return f"a {PROXY_BLOCKS}-block proxy of {lists}"


class NoProxy(Exception):
    """The two-block proxy cannot stand in for the model: the message says why (the full model is captured)."""


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules whose tensors are meta tensors of the same shapes and dtypes: no weights are
    copied, and tied tensors stay tied. Scalar floating buffers keep their values (copied): the analysis reads
    them (a size-derived constant such as an embedding scale of sqrt(hidden), ``passes/size_values.py``), and
    a 0-d CPU tensor may meet tensors of any device.

    >>> m = meta_copy(torch.nn.Linear(2, 3)); m.register_buffer("s", torch.tensor(2.0)); m.weight.device
    device(type='meta')
    >>> meta_copy(m).s
    tensor(2.)
    """
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        if not isinstance(t, torch.nn.Parameter) and t.dim() == 0 and t.is_floating_point():
            memo[id(t)] = t.detach().clone()
            continue
        meta = t.detach().to("meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def state_of(model: torch.nn.Module) -> dict:
    """Every parameter and buffer of ``model`` by its state name, tied tensors under each of their names."""
    return dict(named_tensors(model, buffer_aliases=True))


def make_model_proxy(model: torch.nn.Module, materialize: str = "auto") -> Proxy:
    """The two-block meta proxy of ``model``; NoProxy says why the full model must be captured instead."""
    if not is_hf(model) or materialize == "graph":
        raise NoProxy("the result is the rewritten GraphModule, which is the full graph" if is_hf(model) else
                      "not a Hugging Face model: the result is the rewritten GraphModule, which is the full graph")
    if not repeated_lists(model):
        raise NoProxy(f"no list of more than {PROXY_BLOCKS} identical blocks to cut")
    shallow = meta_copy(model)
    counts = make_proxy(shallow)
    source = state_of(model)
    if expand_names(state_of(shallow), counts) != set(source):
        raise NoProxy("the proxy's tensors, expanded block by block, are not the model's tensors")
    return Proxy(shallow, counts, source)


def check_plan(plan, proxy: Proxy) -> None:
    """NoProxy where the proxy's graph does not run its kept blocks as a chain of blocks."""
    from ..errors import GrowthError
    try:
        check_proxy(plan, proxy.counts)
    except GrowthError as err:
        raise NoProxy(str(err).split(";")[0]) from err


def full_capture(why) -> str:
    """The record's words for a growth captured whole, and why no proxy stood in.

    >>> full_capture("a single block")
    'the full model (no proxy: a single block)'
    """
    return f"the full model (no proxy: {why})"


def source_tensors(proxy: Proxy, rules: dict) -> dict:
    """The real tensors the rules read; NoProxy where a rule reads a tensor the model does not hold."""
    missing = sorted({r.source for r in rules.values() if r.source not in proxy.source}
                     | {r.donor for r in rules.values() if r.donor and r.donor not in proxy.source})
    if missing:
        raise NoProxy(f"the proxy's rules read {missing[:3]}, which the model does not hold")
    return proxy.source
