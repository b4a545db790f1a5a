"""In-memory growth captured on a two-block proxy of the model, as streaming plans a folder.

``torch.export`` traces every block, and most of a deep model's capture time is spent re-tracing blocks
that are identical by construction. Here a meta-device copy of the model (no weights copied) keeps two
blocks of each repeated block list (``growir.checkpoint.make_proxy``); that copy is exported and analysed,
and its block rules are replicated by index to every block of the real model (the rules pass
``expand_blocks``), then applied to the real tensors. Nothing about exactness is taken from the proxy: the
rebuilt class is measured on the real source.

The proxy is checked before it is used: every child of a cut list is identical in structure (classes,
tensor names, shapes, dtypes) to the first one, the proxy's tensors expanded by index are exactly the full
model's tensors, and the graph runs the kept blocks as a chain of blocks. Where any of that fails, or the
result needs the full graph (a GraphModule to return, a growth that is not exact and whose rebuilt class
is checked against the rewritten graph), the whole model is captured, and the record says why
(``record.capture``).

>>> import torch, growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
...                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
>>> growir.grow(m, width=2.0).growir_record.capture
'a 2-block proxy of `model.layers` (4 blocks)'
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .checkpoint import PROXY_BLOCKS, _block_of, _shifted, check_proxy, make_proxy, repeated_lists
from .frontend import is_hf


@dataclass
class Proxy:
    """A two-block proxy of a model: ``counts`` maps each cut block list to its full block count."""
    model: torch.nn.Module  # the proxy itself, on the meta device
    counts: dict
    source: dict = field(default_factory=dict, repr=False)  # the real model's tensors (ties under every name)

    def describe(self) -> str:
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
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def expand_names(names, counts: dict) -> set:
    """State names of a two-block proxy as the full model's: block 0's names for blocks 0..n-2, block 1's for n-1.

    >>> sorted(expand_names(["h.0.w", "h.1.w", "wte"], {"h": 3}))
    ['h.0.w', 'h.1.w', 'h.2.w', 'wte']
    """
    out = set()
    for name in names:
        hit = _block_of(name, counts)
        if hit is None:
            out.add(name)
            continue
        prefix, k = hit
        n = counts[prefix]
        out.update(_shifted(name, prefix, i - k) for i in (range(n - 1) if k == 0 else [n - 1]))
    return out


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
    from .errors import GrowthError
    try:
        check_proxy(plan, proxy.counts)
    except GrowthError as err:
        raise NoProxy(str(err).split(";")[0]) from err


def full_capture(why) -> str:
    return f"the full model (no proxy: {why})"


def source_tensors(proxy: Proxy, rules: dict) -> dict:
    """The real tensors the rules read; NoProxy where a rule reads a tensor the model does not hold."""
    missing = sorted({r.source for r in rules.values() if r.source not in proxy.source}
                     | {r.donor for r in rules.values() if r.donor and r.donor not in proxy.source})
    if missing:
        raise NoProxy(f"the proxy's rules read {missing[:3]}, which the model does not hold")
    return proxy.source
