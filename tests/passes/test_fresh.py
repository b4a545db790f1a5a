"""The fresh width method: one copy of the residual plus a zero (RMSNorm) or mean (LayerNorm) fill, fresh FFN
neurons and heads; exact on pre-norm models at any ratio, and every new parameter learns from step 1."""

from __future__ import annotations

import warnings

import pytest
import torch

import growir
from test_core import assert_preserves
from zoo import example_inputs, make


def grow(name, **kw):
    if name in ("nanogpt", "torchenc"):
        kw["example_inputs"] = example_inputs(name)
    return growir.grow(make(name), width_method="fresh", **kw)


@pytest.mark.parametrize("name", ["llama", "gpt2", "nanogpt"])
@pytest.mark.parametrize("width,depth", [(2.0, 1), (1.5, 1), (2.0, 2)])
def test_fresh_is_exact_on_pre_norm_models(name, width, depth):
    grown = grow(name, width=width, depth=depth, strict=True)
    rec = grown.growir_record
    assert rec.exact and rec.deviation < 1e-6, (rec.reasons, rec.deviation)
    assert "random" in rec.filled.values() and {"zero", "mean"} & set(rec.filled.values())
    assert_preserves(make(name), grown, name)


def _fill(rec, name, axis):
    return (rec.rules[name].axes[axis].index < 0).nonzero().flatten()


def test_fresh_layout_and_gradients_at_step_one():
    """Residual: old units once (×√2 at ×2), fill rows zero, readers' fill columns random. FFN: new neurons'
    producer rows random, their consumer columns zero. One backward step reaches every new block of weights."""
    src, grown = make("llama"), grow("llama", width=2.0)
    rec, p = grown.growir_record, dict(grown.named_parameters())
    hid = _fill(rec, "model.embed_tokens.weight", 1)
    ffn = _fill(rec, "model.layers.0.mlp.down_proj.weight", 1)
    assert len(hid) == 32 and len(ffn) == 64
    old = src.model.embed_tokens.weight
    assert torch.allclose(p["model.embed_tokens.weight"][:, :32], old * 2 ** 0.5)
    assert p["model.embed_tokens.weight"][:, hid].abs().max() == 0
    assert p["model.layers.0.mlp.down_proj.weight"][hid].abs().max() == 0        # fill producers: zero
    assert p["model.layers.0.mlp.down_proj.weight"][:, ffn].abs().max() == 0     # fresh neurons' consumers
    up = p["model.layers.0.mlp.up_proj.weight"]
    assert up[ffn].std() > 0.5 * src.model.layers[0].mlp.up_proj.weight.std()   # fresh producers at the std
    assert up[:, hid].std() > 0.5 * src.model.layers[0].mlp.up_proj.weight.std()  # readers' fill columns
    grown.zero_grad()
    grown(**example_inputs("llama")).logits.pow(2).mean().backward()
    g = {k: v.grad for k, v in p.items()}
    assert g["model.embed_tokens.weight"][:, hid].abs().max() > 0
    assert g["model.layers.0.self_attn.o_proj.weight"][hid].abs().max() > 0
    assert g["model.layers.1.mlp.down_proj.weight"][hid].abs().max() > 0
    assert g["model.layers.0.mlp.down_proj.weight"][:, ffn].abs().max() > 0
    heads = _fill(rec, "model.layers.0.self_attn.o_proj.weight", 1)
    assert len(heads) > 0 and g["model.layers.0.self_attn.o_proj.weight"][:, heads].abs().max() > 0


def test_new_blocks_and_tied_names_draw_their_own_values():
    grown = grow("llama", width=2.0, depth=2)
    rec, p = grown.growir_record, dict(grown.named_parameters())
    ffn = _fill(rec, "model.layers.0.mlp.up_proj.weight", 0)
    assert not torch.equal(p["model.layers.0.mlp.up_proj.weight"][ffn], p["model.layers.1.mlp.up_proj.weight"][ffn])
    nano = grow("nanogpt", width=2.0, strict=True)
    assert nano.lm_head.weight is nano.wte.weight or torch.equal(nano.lm_head.weight, nano.wte.weight)


def test_post_norm_copies_the_residual_and_says_so():
    """BERT normalizes the residual in place: at ×2 the hidden group is copied (exact), heads and FFN are fresh;
    at ×1.5 no construction is exact and the measured deviation is reported."""
    grown = grow("bert", width=2.0, strict=True)
    rec = grown.growir_record
    assert rec.exact and any(v.startswith("copies (") for v in rec.filled.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = grow("bert", width=1.5).growir_record
    assert not rec.exact and rec.deviation > 1e-3
    assert any("not function-preserving" in str(w.message) for w in caught)


def test_auto_is_the_default_and_decides_per_group():
    """``width_method="auto"`` (the default) grows each group fresh where that is exact and copies it where only
    copies are: BERT's post-norm residual is copied (its consumers split), its heads and FFN are fresh."""
    rec = growir.grow(make("llama"), width=2.0).growir_record
    assert rec.width_method == "auto" and rec.exact and "zero" in rec.filled.values()
    rec = growir.grow(make("bert"), width=2.0, strict=True).growir_record
    assert rec.exact and "random" in rec.filled.values()
    assert any(v.startswith("copies (") for v in rec.filled.values())


def test_auto_copies_where_a_fill_would_round():
    """Weights stored in bfloat16 at ×2: a fill's sqrt(2) rounds, copies' 1/2 do not, so the residual is copied
    (plainly: split factors would round too); FFN neurons and heads stay fresh."""
    grown = growir.grow(make("llama").to(torch.bfloat16), width=2.0, strict=True)
    rec = grown.growir_record
    assert rec.exact and rec.deviation <= 1e-5 and "random" in rec.filled.values()
    assert any("below float32" in v for v in rec.filled.values())
    assert not any(m.split for r in rec.rules.values() for m in r.axes)


def test_noise_asks_for_copies():
    """``noise`` breaks the symmetry of copies, so width_method="auto" grows copies when it is given."""
    src, inputs = make("nanogpt"), example_inputs("nanogpt")
    rec = growir.grow(src, width=2.0, width_method="auto", noise=0.05, example_inputs=inputs).growir_record
    assert rec.width_method == "fpi" and rec.exact


def test_fresh_copies_a_group_whose_norm_reads_an_activation():
    """BERT's MLM transform: dense -> GELU -> LayerNorm. A fill (or a rescale) before the GELU is not what the norm
    sees, so that group is copied (exact at a whole ratio) instead of filled."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    source = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=100, tie_word_embeddings=False)).eval()
    grown = growir.grow(source, width=2.0, width_method="fresh")
    assert grown.growir_record.exact and grown.growir_record.deviation < 1e-5


def test_post_norm_copies_are_split_by_bounded_factors_and_train_apart():
    """A copied (post-norm) residual's consumers split each element over its copies by factors in (0.25, 0.75)
    that sum to 1: exact, bounded, and the copies' columns get different gradients at the first step."""
    src = make("bert")
    grown = grow("bert", width=2.0, strict=True)
    assert grown.growir_record.deviation < 1e-6
    old = src.encoder.layer[0].attention.self.query.weight
    new = grown.encoder.layer[0].attention.self.query.weight
    a = (new[:32, :32] / old).detach()
    assert torch.allclose(new[:32, :32] + new[:32, 32:], old, atol=1e-6)
    assert 0.25 <= float(a.min()) and float(a.max()) <= 0.75 and float(a.std()) > 0.05
    assert torch.equal(grown.embeddings.word_embeddings.weight[:, :32], grown.embeddings.word_embeddings.weight[:, 32:])
    grown.zero_grad()
    grown(**example_inputs("bert")).last_hidden_state.pow(2).mean().backward()
    g = grown.embeddings.word_embeddings.weight.grad
    assert not torch.allclose(g[:, :32], g[:, 32:])  # the copies no longer train as one


def test_record_says_how_each_group_grew():
    rec = growir.grow(make("bert"), width=2.0).growir_record
    methods = rec.group_methods
    assert methods["g0:hidden"].startswith("copies (") and "random" in methods.values()
    assert set(methods) >= set(rec.filled)
