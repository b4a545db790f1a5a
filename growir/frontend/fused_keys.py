"""Checkpoint keys that transformers converts when it loads a folder: a model whose experts are one fused tensor
(``mlp.experts.down_proj``, experts first) is saved as one tensor per expert (``mlp.experts.0.down_proj.weight``
...), and ``from_pretrained`` stacks (and concatenates) them back. The conversion is transformers' own
(``get_model_conversion_mapping``, the list its loader applies), so a folder is read as the class reads it;
no table of names here.

>>> import tempfile, torch
>>> from transformers import MixtralConfig, MixtralForCausalLM
>>> from growir.frontend.folder import Checkpoint, load_config, meta_model, state_names
>>> d = tempfile.mkdtemp()
>>> MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
...     num_attention_heads=2, num_key_value_heads=1, num_local_experts=3, vocab_size=50)).save_pretrained(d)
>>> model = meta_model(*load_config(d))
>>> ck = Checkpoint(d, state_names(model), model)
>>> ck.meta("model.layers.0.mlp.experts.gate_up_proj").shape
torch.Size([3, 64, 16])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Fused:
    """One model tensor stored as several checkpoint keys: transformers' converter and, per source pattern, the
    keys it gathers (in the order transformers sorts them: expert 0, 1, ...)."""
    converter: object  # a transformers WeightConverter
    keys: dict  # source pattern -> [checkpoint key]

    def apply(self, read, name: str) -> torch.Tensor:
        """The model's tensor ``name`` from the stored ones, each read by ``read(key)`` (on the meta device when
        ``read`` gives meta tensors: the shape and dtype without reading a weight)."""
        conv = self.converter
        tensors = {p: [read(k) for k in keys] for p, keys in self.keys.items()}
        for op in conv.operations:
            tensors = op.convert(tensors, source_patterns=conv.source_patterns, target_patterns=conv.target_patterns,
                                 full_layer_name=name, model=None, config=None, missing_keys=None)
        if len(tensors) != 1:  # a converter that splits one key into several (none met yet) is not a fused tensor
            raise ValueError(f"{name}: the conversion gives {len(tensors)} tensors")
        return next(iter(tensors.values()))


def fused_keys(model, keys: set, names: set) -> tuple:
    """({model name: checkpoint key}, {model name: Fused}) for the ``names`` of ``model`` that no key in ``keys``
    spells: what transformers' conversion mapping renames or merges ``keys`` into. Empty where transformers has
    no conversion mapping (an older version) or the model is not a transformers model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key
        from transformers.core_model_loading import rename_source_key
    except ImportError:
        return {}, {}
    if not keys or not names or not hasattr(model, "base_model_prefix"):
        return {}, {}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = dict.fromkeys(names, True)
    renamed, fused = {}, {}
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if target not in names:
            continue
        if pattern is None:
            renamed[target] = key
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        fused.setdefault(target, Fused(conv, {p: [] for p in conv.source_patterns})).keys[pattern].append(key)
    return renamed, {n: f for n, f in fused.items() if all(f.keys.values())}
