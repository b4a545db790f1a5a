"""Norms with no weight (passes/bare_norms.py): repeat-and-fill's factor goes to the contractions that read them,
or the group is copied (a whole ratio) or reported (another ratio) where nothing can take it."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers as T

import growir
from growir.verify.compare import TOLERANCE
from test_archs import assert_same, grow_quietly, ids
from zoo import VOCAB


def olmo() -> nn.Module:
    """OLMo: every LayerNorm is ``F.layer_norm(x, shape, None, None, eps)``."""
    torch.manual_seed(0)
    return T.OlmoForCausalLM(T.OlmoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)).eval()


@pytest.mark.parametrize("spec", [{"width": 2.0}, {"width": 1.5}, {"width": 2.0, "depth": 2}])
def test_olmo_weightless_layer_norms_fill_exactly(spec):
    """The fill leaves each weightless norm's output sqrt(d'/d) too large on the copies; the projections that
    read it (q/k/v, gate/up, the head) take sqrt(d/d') instead, the stream is rescaled, eps stays, and OLMo's own
    class is rebuilt."""
    source = olmo()
    grown = grow_quietly(source, **spec)
    assert isinstance(grown, T.OlmoForCausalLM)
    notes = grown.growir_record.rules["model.layers.0.self_attn.q_proj.weight"].notes
    assert any("has no weight" in n for n in notes), notes
    assert grown.config.hidden_size == int(32 * spec["width"])
    assert_same(source, grown, [ids(2, 9), ids(1, 13, seed=1)])


class ReturnsBareNorm(nn.Module):
    """A pre-norm block whose final weightless norm is the output itself: nothing reads it that could take the
    fill's factor."""

    def __init__(self, d=8):
        super().__init__()
        self.emb, self.up, self.down = nn.Embedding(VOCAB, d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.down(F.gelu(self.up(F.layer_norm(x, x.shape[-1:]))))
        return F.layer_norm(x, x.shape[-1:])


def grow_recorded(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, example_inputs=(torch.randint(0, VOCAB, (2, 5)),), **kw)
    return grown.growir_record, [str(w.message) for w in caught if "growir" in str(w.message)]


def test_a_returned_weightless_norm_is_copied_at_a_whole_ratio():
    """Uniform copies keep a norm's statistics with or without a weight: exact, and said why it is not filled."""
    record, said = grow_recorded(ReturnsBareNorm().eval(), width=2.0)
    assert record.exact and record.deviation <= TOLERANCE and not said, (record.reasons, said)
    assert any("has no weight and its output is returned" in why for why in record.filled.values()), record.filled


def test_a_returned_weightless_norm_at_another_ratio_is_reported_not_claimed():
    """At x1.5 neither a fill nor copies are exact there: a warning with the measured deviation and the reason,
    never a PreservationError."""
    record, said = grow_recorded(ReturnsBareNorm().eval(), width=1.5)
    assert not record.exact and record.deviation > TOLERANCE
    assert any("has no weight and its output is returned" in r for r in record.reasons), record.reasons
    assert said
