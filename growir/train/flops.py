"""FLOPs of a training step, counted from what actually runs.

For a full step on ``T = batch·seq`` tokens (Kaplan et al. 2020, with both attention matmuls counted):

    C = 6·N·T + 6·2·L·seq·d_attn·T

``N`` is the number of non-embedding parameters: the blocks, the final norm and head transform, and the
output projection ``d·V`` (counted even when it is tied to the input embedding, because its matmul runs).
Input embedding tables are lookups and not counted. ``2·L·seq·d_attn`` per token is the forward cost of
``QKᵀ`` and ``softmax·V`` (``2·seq·d_attn`` each, over the whole window; causal masking is not discounted).

A step is forward (``2·P`` per parameter, ``4·seq·d_attn`` per block) plus backward, split into the gradient
with respect to inputs (``2·P``; attention ``8·seq·d_attn``, both operands are activations) and with respect to
weights (``2·P``). A full step gives ``6·N`` and ``12·L·seq·d_attn``. Partial steps count only what runs:

* a sliced sub-model (two-stage stage 1) pays forward for its blocks and head only;
* backward starts at the head and stops at the lowest block that has a trainable parameter (at the bottom
  when the input embedding is trainable, tied or not); blocks below are not reached. Blocks it passes through pay input gradients; trainable blocks also pay weight gradients; the
  head pays weight gradients only when one of its parameters is trainable.

So stage 1 of bert2BERT on a sub-model of depth ``k`` training its top ``l_b`` blocks costs per token
``2·(k·P + H) + 4·k·s·d + (4·l_b·P + 8·l_b·s·d) + 2·H (+ 2·H if the head is trained)``.

>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> m = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=256))
>>> N = non_embedding_params(m)
>>> step_flops(m, batch=4, seq=8) == training_flops(N, n_layers=2, seq=8, d_attn=16, tokens=32)
True
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .blocks import find_blocks


def training_flops(n_params: int, n_layers: int, seq: int, d_attn: int, tokens: int) -> float:
    """``6·N·T + 12·L·seq·d_attn·T``: the cost of training every parameter on ``tokens`` tokens.

    >>> training_flops(1000, n_layers=2, seq=10, d_attn=8, tokens=100)
    792000.0
    """
    return float(6 * n_params * tokens + 6 * 2 * n_layers * seq * d_attn * tokens)


@dataclass(frozen=True)
class ParamSplit:
    """Parameters per block (current depth), of the head (final norm, head transform, output ``d·V``) and
    of the input embedding tables, plus the attention width ``d_attn``."""
    per_block: list[int]
    head: int
    embedding: int
    d_attn: int


def d_attn_of(config) -> int:
    """Width of the query projection: heads × head_dim (from an HF config).

    >>> from transformers import BertConfig
    >>> d_attn_of(BertConfig(hidden_size=64, num_attention_heads=4))
    64
    """
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def head_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the blocks and the embedding tables, plus a tied output weight (its matmul runs)."""
    in_blocks = {id(p) for p in find_blocks(model).blocks.parameters()}
    in_embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = [p for p in model.parameters() if id(p) not in in_blocks and id(p) not in in_embed]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and id(out.weight) in in_embed:
        head.append(out.weight)
    return head


def split_params(model: nn.Module) -> ParamSplit:
    """Sort ``model``'s parameters into blocks, head and embeddings (shared tensors counted once)."""
    blocks = find_blocks(model).blocks
    head = head_params(model)
    counted = {id(p) for p in blocks.parameters()} | {id(p) for p in head}
    embedding = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    return ParamSplit(per_block, sum(p.numel() for p in head), embedding, d_attn_of(model.config))


def non_embedding_params(model: nn.Module) -> int:
    """``N`` of the formula: all blocks plus the head (output projection included), no embedding tables."""
    split = split_params(model)
    return sum(split.per_block) + split.head


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def step_flops(model: nn.Module, batch: int, seq: int) -> float:
    """FLOPs of one training step of ``model`` as it is now (current depth, current ``requires_grad``)."""
    split = split_params(model)
    blocks = find_blocks(model).blocks
    trained = [_trainable(b) for b in blocks]
    lowest = trained.index(True) if any(trained) else len(blocks)
    embeddings = [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    if any(p.requires_grad for p in embeddings):
        lowest = 0  # the gradient must reach the input embedding through every block
    head_trained = any(p.requires_grad for p in head_params(model))
    att = 2 * 2 * seq * split.d_attn  # forward QKᵀ and softmax·V, per token per block
    per_token = 2 * split.head + 2 * split.head * (lowest < len(blocks)) + 2 * split.head * head_trained
    for i, p in enumerate(split.per_block):
        per_token += 2 * p + att                      # forward
        if i >= lowest:
            per_token += 2 * p + 2 * att              # gradient w.r.t. inputs
            per_token += 2 * p * trained[i]           # gradient w.r.t. weights
    return float(per_token * batch * seq)
