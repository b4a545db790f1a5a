"""A plan made from ``config.json`` alone, on the meta device, deep models on a two-block proxy
(``growir.frontend.proxy``): the blocks are identical by construction, so the proxy's block rules hold, index for
index, for every block of the full model; the proxy's findings are checked against the full module tree first.

>>> import tempfile
>>> from transformers import LlamaConfig
>>> d = tempfile.mkdtemp()
>>> LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
...             num_key_value_heads=2, vocab_size=100).save_pretrained(d)
>>> fp = plan_folder(d)
>>> fp.counts, fp.plan.blocks[0].count
({'layers': 6}, 2)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..frontend.folder import load_config, meta_model
from ..frontend.proxy import PROXY_BLOCKS, check_proxy, make_proxy


@dataclass
class FolderPlan:
    """A plan made from ``config.json`` alone: ``plan`` is the proxy's, ``counts`` the full block counts."""
    plan: object
    counts: dict
    model: torch.nn.Module  # the full model, on the meta device
    config: object
    cls: type
    proxy: torch.nn.Module = None  # the two-block proxy, on the meta device
    notes: list = field(default_factory=list)
    # streaming (``proxy.plan_sample``): the random-weight proxy the config is chosen on, the config fields
    # that make it (field -> proxy value; block list -> its count fields), and whether ``plan`` is its plan
    sample: torch.nn.Module = None
    small: dict = field(default_factory=dict)
    layer_fields: dict = field(default_factory=dict)
    planned_sample: bool = False

    def __str__(self) -> str:
        text = str(self.plan)
        for prefix, n in self.counts.items():
            text = text.replace(f"blocks `{prefix}`: {PROXY_BLOCKS} x", f"blocks `{prefix}`: {n} x")
        return text + ("\n" + "\n".join(self.notes) if self.notes else "")


def plan_folder(folder, proxy: bool = True) -> FolderPlan:
    """Plan from ``folder/config.json`` alone on the meta device, deep models on a two-block proxy.

    >>> import tempfile
    >>> from transformers import GPT2Config
    >>> d = tempfile.mkdtemp()
    >>> GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=100).save_pretrained(d)
    >>> str(plan_folder(d)).count("blocks `h`: 3 x")
    1
    """
    from ..pipeline.stages import plan_of as make_plan

    config, cls = load_config(folder)
    full = meta_model(config, cls)
    model = meta_model(config, cls) if proxy else full
    counts = make_proxy(model) if proxy else {}
    p = make_plan(model)
    check_proxy(p, counts)
    notes = [f"planned on a {PROXY_BLOCKS}-block proxy of `{k}` ({n} blocks, identical in structure)"
             for k, n in counts.items()]
    return FolderPlan(p, counts, full, config, cls, model, notes)
