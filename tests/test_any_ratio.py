"""Exact growth by any ratio on pre-norm models (repeat-and-fill), and refusal exactly where it cannot be."""

from __future__ import annotations

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


def test_tied_head_with_fill_is_exact():
    grown = grow("nanogpt", width=1.5, strict=True)  # tied embedding/head: final norm divided by n = 1
    assert grown.growir_record.exact


def test_post_norm_refuses_under_strict_and_says_why():
    with pytest.raises(growir.NotExactError, match="post-norm"):
        grow("bert", width=1.5, strict=True)


def test_balanced_copies_differ_by_at_most_one_random_ones_do_not():
    from growir.passes.width import fpi_index, random_index
    import torch
    gen = torch.Generator().manual_seed(0)
    balanced = torch.bincount(fpi_index(384, 768 + 192, gen))
    assert int(balanced.max() - balanced.min()) <= 1
    uniform = torch.bincount(random_index(384, 768, gen), minlength=384)  # bert2BERT: even x2 is uneven
    assert int(uniform.max() - uniform.min()) >= 2


def test_config_that_cannot_hold_eps_is_measured_not_broken():
    with pytest.warns(UserWarning, match="eps was kept"):
        grown = grow("opt", width=1.5)
    assert not grown.growir_record.exact and grown.growir_record.deviation < 1e-2


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_rotary_head_dim_growth_interleaves_frequencies(name):
    """Old rotary pair j becomes pair 2j at twice the head_dim (same frequency); pairs between are zero."""
    source = make(name)
    grown = growir.grow(source, width={"head_dim": 16, "hidden": 64}, strict=True)
    assert grown.config.head_dim == 16 and grown.config.num_attention_heads == 4
    assert grown.growir_record.exact
    assert_preserves(source, grown, name)
