"""Exact growth by any ratio on pre-norm models (repeat-and-fill), and refusal exactly where it cannot be."""

from __future__ import annotations

import dataclasses

import pytest

import growir
from test_core import assert_preserves
from zoo import example_inputs, make

PRE_NORM_ANY = ["gpt2", "llama", "t5", "vit", "nanogpt", "torchenc"]


def grow(name, **kw):
    if name in ("nanogpt", "torchenc"):
        kw["example_inputs"] = example_inputs(name)
    return growir.grow(make(name), **kw)


@pytest.mark.parametrize("name", PRE_NORM_ANY)
def test_width_one_and_a_half_is_exact(name):
    grown = grow(name, width=1.5, strict=True)
    rec = grown.growir_record
    assert rec.exact and rec.filled, rec.reasons
    assert_preserves(make(name), grown, name)


def test_hidden_64_to_96_heads_4_to_6_ffn_x1_5():
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch
    torch.manual_seed(1)
    src = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, vocab_size=100)).eval()
    grown = growir.grow(src, width={"hidden": 96, "heads": 6, "ffn": 192}, strict=True)
    cfg = grown.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (96, 6, 192)
    assert grown.growir_record.deviation < 1e-5


def test_fill_dimensions_receive_gradients():
    """Zeros in the fill's norm weights and consumer columns too would be a saddle: the residual's fill
    dimensions would never get a gradient. growir copies there (they multiply zeros) so the writers learn."""
    grown = grow("llama", width=1.5)
    rec = grown.growir_record
    grown.zero_grad()
    grown(**example_inputs("llama")).logits.pow(2).mean().backward()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        axis = next(i for i, m in enumerate(rec.rules[name].axes) if m.index is not None and (m.index < 0).any())
        fill = rec.rules[name].axes[axis].index < 0
        grad = dict(grown.named_parameters())[name].grad
        assert grad.index_select(axis, fill.nonzero().flatten()).abs().max() > 0, name


def test_tied_head_with_fill_is_exact():
    grown = grow("nanogpt", width=1.5, strict=True)  # tied embedding/head: final norm divided by n = 1
    assert grown.growir_record.exact


def test_post_norm_refuses_under_strict_and_says_why():
    with pytest.raises(growir.NotExactError, match="post-norm"):
        grow("bert", width=1.5, strict=True)


def test_balanced_copies_differ_by_at_most_one_random_ones_do_not():
    from growir.ir.index_maps import fpi_index, random_index
    import torch
    gen = torch.Generator().manual_seed(0)
    balanced = torch.bincount(fpi_index(384, 768 + 192, gen))
    assert int(balanced.max() - balanced.min()) <= 1
    uniform = torch.bincount(random_index(384, 768, gen), minlength=384)  # bert2BERT: even x2 is uneven
    assert int(uniform.max() - uniform.min()) >= 2


def test_residual_rescaling_keeps_eps_where_the_config_cannot_hold_a_new_one():
    """OPT's LayerNorm eps is no config field; Qwen3 shares one eps between hidden and per-head norms."""
    for name in ("opt", "qwen3"):
        grown = grow(name, width=1.5, strict=True)
        rec = grown.growir_record
        assert rec.exact and rec.deviation < 1e-6, (name, rec.reasons, rec.deviation)
        assert any("residual stream is rescaled" in n for r in rec.rules.values() for n in r.notes)
        assert grown.config.to_dict().get("rms_norm_eps", 1e-6) == make(name).config.to_dict().get("rms_norm_eps", 1e-6)
        assert_preserves(make(name), grown, name)


def test_config_that_cannot_hold_eps_is_measured_not_broken():
    """When the residual stream is itself an output (hidden states), it cannot be rescaled: eps must change,
    OPT's config cannot say so, and growir keeps eps and reports the measured error."""
    source = make("opt")
    source.config.output_hidden_states = True
    with pytest.warns(UserWarning, match="eps was kept"):
        grown = growir.grow(source, width=1.5)
    assert not grown.growir_record.exact and grown.growir_record.deviation < 1e-2


def test_tied_head_norm_that_is_also_an_output_is_reported_not_exact():
    """The final norm feeds a tied head (rescaled by 1/n to keep the logits) and is returned as the last hidden
    state: that output is rescaled too, so the growth is reported inexact, never a 'growir bug'."""
    source = make("opt")
    source.config.output_hidden_states = True
    with pytest.warns(UserWarning, match="also a model output"):
        grown = growir.grow(source, width=2.0, width_method="fpi")
    assert not grown.growir_record.exact
    with pytest.raises(growir.NotExactError):
        growir.grow(source, width=2.0, width_method="fpi", strict=True)


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_rotary_head_dim_growth_interleaves_frequencies(name):
    """Old rotary pair j becomes pair 2j at twice the head_dim (same frequency); pairs between are zero."""
    source = make(name)
    grown = growir.grow(source, width={"head_dim": 16, "hidden": 64}, strict=True)
    assert grown.config.head_dim == 16 and grown.config.num_attention_heads == 4
    assert grown.growir_record.exact
    assert_preserves(source, grown, name)


HEAD_DIM_CASES = {
    "qwen3": {"head_dim": 16},  # per-head RMS norms on q and k, then rotary
    "neox": {"head_dim": 16, "hidden": 64},  # partial rotary (half of head_dim), QKV fused per head
    "phi3": {"head_dim": 16, "hidden": 64},  # one QKV weight sliced into q, k, v; rotary
    "nanogpt": {"head_dim": 16},  # one QKV weight split into q, k, v; copies
    "torchenc": {"head_dim": 16},  # nn.MultiheadAttention's in_proj (unflatten, select)
}


@pytest.mark.parametrize("name", list(HEAD_DIM_CASES))
def test_head_dim_growth_through_norms_fused_qkv_and_partial_rotary_is_exact(name):
    grown = grow(name, width=HEAD_DIM_CASES[name], strict=True)
    assert grown.growir_record.exact, grown.growir_record.reasons
    assert_preserves(make(name), grown, name)


def test_rotary_growth_zeroes_only_the_query_so_new_dimensions_train():
    """Zero query and key rows at the new dimensions would be a saddle: neither gets a gradient. growir zeroes
    the query only; the key copies, so the query's new rows receive gradients at once."""
    grown = grow("qwen3", width={"head_dim": 16})
    rec, state = grown.growir_record, grown.state_dict()
    new = rec.rules["model.layers.0.self_attn.q_proj.weight"].axes[0].index < 0
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    assert new.any() and (q[new] == 0).all() and (q[~new] != 0).any()
    k_new = rec.rules["model.layers.0.self_attn.k_proj.weight"].axes[0].index < 0
    assert (k[k_new] != 0).all(dim=1).all()
    assert (state["model.layers.0.self_attn.q_norm.weight"] != 0).all()
    inputs = example_inputs("qwen3")
    grown.zero_grad()
    grown(**inputs).logits.pow(2).mean().backward()
    assert grown.model.layers[0].self_attn.q_proj.weight.grad[new].abs().max() > 0


def test_rotary_frequency_table_continues_its_sequence():
    """In a rewritten GraphModule the frequency buffer at head_dim k·d is the one a fresh model computes."""
    import torch
    from strategies import Arch, Rotary
    arch = Arch(vocab=11, heads=2, kv_heads=1, head_dim=8, ffn=16, layers=2, pre_norm=True, norm="rms",
                bias=False, mlp="gelu", fused_mlp=False, positions="rotary", fused_qkv=True, tied=False,
                final_norm=True, literal_views=False, seed=0, qk_norm=True, partial_rotary=True)
    grown = growir.grow(arch.build(), width={"head_dim": 24}, example_inputs=arch.inputs(2, 5), strict=True)
    assert torch.allclose(dict(grown.named_buffers())["rotary.inv_freq"], Rotary(12).inv_freq, rtol=1e-5)


def test_per_head_layernorm_with_rotary_growth_is_exact():
    """A per-head LayerNorm would move its mean onto zero query dimensions; growir copies the query there and
    zeroes the norm's weight and bias at the new dimensions instead."""
    from strategies import Arch
    arch = Arch(vocab=11, heads=2, kv_heads=2, head_dim=8, ffn=16, layers=2, pre_norm=True, norm="layer",
                bias=True, mlp="gelu", fused_mlp=False, positions="rotary", fused_qkv=True, tied=False,
                final_norm=True, literal_views=False, seed=0, qk_norm=True, partial_rotary=True)
    for a in (arch, dataclasses.replace(arch, positions="learned")):
        grown = growir.grow(a.build(), width={"head_dim": 16}, example_inputs=a.inputs(2, 5), strict=True)
        assert grown.growir_record.exact and grown.growir_record.deviation < 1e-6


def test_noise_with_fill_positions_keeps_the_function():
    """Symmetry-breaking noise skips fill positions (some must stay zero) and still cancels over copies."""
    for name, width in (("llama", 1.5), ("qwen3", {"head_dim": 16})):
        grown = grow(name, width=width, width_method="fpi", noise=0.05, strict=True)
        assert grown.growir_record.exact
        assert_preserves(make(name), grown, name)


def test_query_and_key_from_one_projection_are_reported_not_guessed():
    """Shared query/key (Reformer-style): rescaling the query alone is impossible; growir says so."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class SharedQK(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.qk, self.v = nn.Embedding(11, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.o, self.head = nn.Linear(16, 16), nn.Linear(16, 11)

        def forward(self, ids):
            x = self.emb(ids)
            b, t, _ = x.shape
            qk = self.qk(x).view(b, t, 2, 8).transpose(1, 2)
            v = self.v(x).view(b, t, 2, 8).transpose(1, 2)
            y = F.scaled_dot_product_attention(qk, qk, v).transpose(1, 2).reshape(b, t, 16)
            return self.head(x + self.o(y))

    torch.manual_seed(0)
    with pytest.raises(growir.GrowthError, match="share `qk.weight`"):
        growir.grow(SharedQK().eval(), width={"head_dim": 16}, example_inputs=(torch.randint(0, 11, (2, 5)),),
                    strict=True)
