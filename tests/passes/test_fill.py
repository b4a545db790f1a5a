"""Why repeat-and-fill is not exact (passes/fill.py ``_why_not``): every reason that holds, the post-norm theorem
first where it applies, and never where it does not (an embedding LayerNorm before pre-norm blocks)."""

from __future__ import annotations

import warnings

import pytest
import transformers as T

import growir
from zoo import VOCAB

SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=64)
THEOREM = "feeds the residual stream (post-norm): no exact construction exists"
HEAD = "reads the output of `aten.gelu`"


def fill_reasons(model) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = growir.grow(model.eval(), width=1.5).growir_record
    return " ".join(r for r in record.reasons if r.startswith("repeat-and-fill"))


def test_a_post_norm_encoder_with_a_masked_lm_head_states_the_theorem_and_the_head():
    """BERT's blocks are post-norm (the theorem: no exact x1.5), and its masked-LM head's LayerNorm reads a GELU:
    both hold, and the theorem comes first, not the first other check met."""
    text = fill_reasons(T.BertForMaskedLM(T.BertConfig(**SIZES)))
    assert THEOREM in text and HEAD in text, text
    assert text.index(THEOREM) < text.index(HEAD)
    assert "channel by channel" not in text, text  # the head's dense adds its bias: no per-channel product
    with pytest.raises(growir.NotExactError, match="no exact construction exists"):
        growir.grow(T.BertForMaskedLM(T.BertConfig(**SIZES)).eval(), width=1.5, strict=True)


def test_an_embedding_norm_before_pre_norm_blocks_claims_no_theorem():
    """A pre-norm model whose embedding LayerNorm writes the stream (RoBERTa-PreLayerNorm): its input is a sum
    of embeddings, not a block's residual sum, so the post-norm theorem is not claimed; every fill obstacle is
    named instead (the first block's norm reads that LayerNorm, the head's LayerNorm reads a GELU)."""
    text = fill_reasons(T.RobertaPreLayerNormForMaskedLM(T.RobertaPreLayerNormConfig(**SIZES)))
    assert "no exact construction" not in text, text
    assert "reads the output of `aten.layer_norm`" in text and HEAD in text, text
