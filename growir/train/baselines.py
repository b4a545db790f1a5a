"""Growth baselines that bert2BERT compares against, for any HF model built from a block ``nn.ModuleList``.

* **StackBERT** (Gong et al. 2019): train a shallow model, double its depth by stacking a copy of its blocks on
  top, train, … — :func:`stackbert` stacks once; :class:`ProgressiveStacking` does it during training.
* **MSLT** (Yang et al. 2020): the same stacking, but after each stacking only the new top blocks (and the
  head) are trained; a final stage trains everything — ``ProgressiveStacking(..., new_only=True, unfreeze_at=s)``.
* **DirectCopy** (bert2BERT's baseline): the source's tensors copied into the top-left corner of a randomly
  initialised wider (and deeper) target; every other weight keeps its random initialisation.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> small = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
...                     num_key_value_heads=2, vocab_size=256)
>>> model, cb = progressive(LlamaForCausalLM, small, {0: 1, 5: 2}, seed=0)
>>> cb.on_step_begin(model, 5), model.config.num_hidden_layers
(True, 2)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import find_blocks, stack_blocks
from .flops import head_params
from .loop import Callback


def stackbert(source: nn.Module, depth: int) -> nn.Module:
    """A copy of ``source`` stacked to ``depth`` blocks (blocks 1..L, then 1..L again; remainder from the top).

    >>> from transformers import BertConfig, BertForMaskedLM
    >>> m = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                                intermediate_size=32, vocab_size=257))
    >>> stackbert(m, 4).config.num_hidden_layers, m.config.num_hidden_layers
    (4, 2)
    """
    model = copy.deepcopy(source)
    stack_blocks(model, depth)
    return model


def _freeze_all_but_new(model: nn.Module, new: list[int]) -> None:
    model.requires_grad_(False)
    blocks = find_blocks(model).blocks
    for i in new:
        blocks[i].requires_grad_(True)
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    for p in head_params(model):
        p.requires_grad_(id(p) not in embeddings)


class ProgressiveStacking(Callback):
    """Stack to ``stages[step]`` blocks at those steps; with ``new_only`` (MSLT) train only the new blocks and
    the head until ``unfreeze_at``, then everything."""

    def __init__(self, stages: dict[int, int], new_only: bool = False, unfreeze_at: int | None = None):
        self.stages, self.new_only, self.unfreeze_at = dict(stages), new_only, unfreeze_at

    def on_step_begin(self, model: nn.Module, step: int) -> bool:
        """Stack blocks where ``step`` starts a stage (MSLT: freeze all but the new ones); True where it stacked or
        unfroze (the optimizer is rebuilt)."""
        changed = False
        depth = self.stages.get(step)
        if depth is not None and depth > len(find_blocks(model).blocks):
            new = stack_blocks(model, depth)
            if self.new_only:
                _freeze_all_but_new(model, new)
            changed = True
        if self.unfreeze_at is not None and step == self.unfreeze_at:
            model.requires_grad_(True)
            changed = True
        return changed


def progressive(model_cls, config, stages: dict[int, int], *, new_only: bool = False,
                unfreeze_at: int | None = None, seed: int = 0) -> tuple[nn.Module, ProgressiveStacking]:
    """A freshly initialised ``model_cls`` at depth ``stages[0]`` and the callback that stacks it further.
    ``config`` gives the width; its depth is ignored."""
    config = copy.deepcopy(config)
    config.num_hidden_layers = stages[0]
    torch.manual_seed(seed)
    return model_cls(config), ProgressiveStacking(stages, new_only=new_only, unfreeze_at=unfreeze_at)


def doubling_stages(start_depth: int, depth: int, steps: int) -> dict[int, int]:
    """StackBERT's schedule: double from ``start_depth`` to ``depth``, spending equal steps at each depth.

    >>> doubling_stages(1, 4, 90)
    {0: 1, 30: 2, 60: 4}
    """
    depths = [start_depth]
    while depths[-1] < depth:
        depths.append(min(2 * depths[-1], depth))
    return {i * steps // len(depths): d for i, d in enumerate(depths)}


@torch.no_grad()
def directcopy(source: nn.Module, target_config, seed: int = 0) -> nn.Module:
    """A randomly initialised ``type(source)(target_config)`` whose parameters' leading corner holds the
    source's parameter of the same name (``target[:a, :b] = source``); buffers are left as built.

    >>> from transformers import BertConfig, BertForMaskedLM
    >>> cfg = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    ...                  vocab_size=257)
    >>> src = BertForMaskedLM(cfg)
    >>> big = directcopy(src, BertConfig(**{**cfg.to_dict(), "hidden_size": 32, "intermediate_size": 64}))
    >>> name = "encoder.layer.0.attention.self.query.weight"
    >>> w, w0 = big.get_parameter(big.base_model_prefix + "." + name), src.get_parameter(src.base_model_prefix + "." + name)
    >>> tuple(w.shape), bool((w[:16, :16] == w0).all())
    ((32, 32), True)
    """
    torch.manual_seed(seed)
    target = type(source)(target_config)
    source_params = dict(source.named_parameters())
    for name, param in target.named_parameters():
        old = source_params.get(name)
        if old is None:
            continue
        if old.ndim != param.ndim or any(a > b for a, b in zip(old.shape, param.shape)):
            raise ValueError(f"directcopy: source {name} {tuple(old.shape)} does not fit in the target's "
                             f"{tuple(param.shape)}; the target must be at least as large on every axis")
        param[tuple(slice(0, n) for n in old.shape)] = old
    return target
