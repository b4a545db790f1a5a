"""Rotate-half rotary embeddings as the axis graph shows them: a query's head_dim made of two equal halves.

>>> import growir
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> p = growir.plan(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
...                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=100)))
>>> half, rest = rotary_parts(p.facts.ag, p.facts.attention[0])
>>> p.group_of(half).size, rest
(4, None)
"""

from __future__ import annotations

from ..ir.axes import is_structured


def rotary_parts(ag, site) -> tuple | None:
    """(half, rest) for a rotate-half rotary head_dim of attention ``site`` in the axis graph ``ag``:
    ``cat(half, half)`` (rest None), or partial rotary ``cat(cat(half, half), rest)`` where ``rest`` passes
    through unrotated. None for anything else."""
    tree = ag.expand(site["q"][-1])
    if not is_structured(tree) or tree[0] != "cat":
        return None
    parts = tree[1]
    if len(parts) == 2 and is_structured(parts[0]) and not is_structured(parts[1]):
        inner = parts[0]
        parts, rest = (inner[1], parts[1]) if inner[0] == "cat" else (None, None)
    elif len(parts) == 3 and not is_structured(parts[2]):
        parts, rest = parts[:2], parts[2]
    else:
        rest = None
    if parts is None or len(parts) != 2 or parts[0] != parts[1] or is_structured(parts[0]):
        return None
    return parts[0], rest
