"""The core promise on the zoo: grown(x) == source(x) within 1e-5 * max(1, max|y|), source untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils._pytree as pytree

import growir
from growir.verify.compare import map_source_output
from zoo import ALL, PRE_NORM, SIZE_FIELDS, NanoGPT, TorchEncoder, example_inputs, make

TOL = 1e-5


def outputs(model, inputs) -> dict:
    """Floating-point outputs by their position among the flattened outputs."""
    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(**inputs)
    return {i: t for i, t in enumerate(pytree.tree_leaves(out))
            if isinstance(t, torch.Tensor) and t.is_floating_point()}


def assert_preserves(source, grown, name):
    """At two batch/sequence shapes, every output of ``grown`` equals the source's mapped by the groups."""
    maps = grown.growir_record.output_maps
    for batch, seq in ((2, 7), (3, 5)):
        inputs = example_inputs(name, batch, seq, seed=batch)
        ys, yg = outputs(source, inputs), outputs(grown, inputs)
        assert ys.keys() == yg.keys()
        for k in ys:
            expected, index = map_source_output(ys[k], yg[k].shape, maps[k] if k < len(maps) else None)
            err = (yg[k][index] - expected).abs().max().item()
            assert err <= TOL * max(1.0, expected.abs().max().item()), f"{name} output {k}: {err:.3g}"


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, snap):
    now = model.state_dict()
    return set(now) == set(snap) and all(torch.equal(now[k], snap[k]) for k in snap)


def grow(name, model, **kw):
    example = example_inputs(name) if name in ("nanogpt", "torchenc") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, example_inputs=example, **kw)
    assert not [w for w in caught if "growir" in str(w.message)], "an exact growth warns about nothing"
    return grown


def fresh_count(name, grown) -> int:
    """Parameters of the same architecture built fresh at the grown sizes (independent of growir)."""
    if name == "nanogpt":
        return sum(p.numel() for p in NanoGPT(d=64, heads=8).parameters())
    if name == "torchenc":
        return sum(p.numel() for p in TorchEncoder(d=64, heads=8).parameters())
    return sum(p.numel() for p in type(grown)(grown.config).parameters())


@pytest.mark.parametrize("name", ALL)
def test_width_two_is_exact(name):
    source = make(name)
    snap = snapshot(source)
    grown = grow(name, source, width=2.0)
    rec = grown.growir_record
    assert rec.exact, rec.reasons
    assert_preserves(source, grown, name)
    assert same_state(source, snap), "the source model was modified"
    assert type(grown) is type(source) if name not in ("nanogpt", "torchenc") else isinstance(
        grown, torch.fx.GraphModule)
    grown_groups = [g for g in rec.plan.groups if rec.sizes.get(g.id, g.size) != g.size]
    assert grown_groups and all(rec.sizes[g.id] == 2 * g.size for g in grown_groups)
    assert rec.params_after == fresh_count(name, grown)
    assert set(rec.config_changes) <= SIZE_FIELDS, rec.config_changes


@pytest.mark.parametrize("name", sorted(PRE_NORM - {"t5"}))
def test_width_and_depth_exact_for_pre_norm(name):
    source = make(name)
    grown = grow(name, source, width=2.0, depth=2)
    rec = grown.growir_record
    assert rec.exact, rec.reasons
    (old, new, method), = rec.layers.values()
    assert (old, new, method) == (2, 4, "identity")
    assert_preserves(source, grown, name)
    if hasattr(grown, "config"):
        layers = [v for k, v in rec.config_changes.items() if v == 4]
        assert layers, rec.config_changes
        assert set(rec.config_changes) <= SIZE_FIELDS, rec.config_changes


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_post_norm_depth_warns_with_deviation(name):
    with pytest.warns(UserWarning, match=r"not function-preserving \(measured deviation"):
        grown = growir.grow(make(name), width=2.0, depth=2)
    assert grown.growir_record.layers["encoder.layer"][2] == "stack"
    with pytest.raises(growir.NotExactError, match="stack"):
        growir.grow(make(name), depth=2, strict=True)


def test_llama_from_the_issue():
    source = make("llama")
    big = growir.grow(source, width=2.0, depth=2)
    cfg = big.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers,
            cfg.intermediate_size) == (64, 8, 4, 4, 128)
    assert_preserves(source, big, "llama")


def test_kv_heads_follow_a_whole_multiplier():
    big = growir.grow(make("llama"), width=1.5)  # 4 query heads over 2 kv heads
    assert (big.config.num_attention_heads, big.config.num_key_value_heads) == (6, 3)


def test_mqa_stays_mqa():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=1, vocab_size=100)).eval()
    big = growir.grow(source, width=2.0)
    assert (big.config.num_attention_heads, big.config.num_key_value_heads) == (8, 1)
    assert big.growir_record.exact and big.growir_record.deviation < TOL


def test_non_integer_width_on_post_norm_warns_and_strict_raises():
    with pytest.warns(UserWarning, match="uneven"):
        growir.grow(make("bert"), width=1.5)
    with pytest.raises(growir.NotExactError, match="post-norm"):
        growir.grow(make("bert"), width=1.5, strict=True)


def test_balanced_copies_on_pre_norm_are_approximate():
    with pytest.warns(UserWarning, match="uneven"):
        grown = growir.grow(make("gpt2"), width=1.5, width_method="fpi_balanced")
    assert 0 < grown.growir_record.deviation < 1


def test_width_one_is_identity():
    source = make("gpt2")
    grown = growir.grow(source, width=1.0)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), grown.state_dict().values()))


def test_two_steps_preserve_like_one():
    source = make("llama")
    once = growir.grow(source, width=2.0)
    twice = growir.grow(growir.grow(source, width=1.0), width=2.0)
    inputs = example_inputs("llama")
    assert torch.allclose(outputs(once, inputs)[0], outputs(twice, inputs)[0], atol=1e-5)
    assert growir.grow(once, width=2.0).config.hidden_size == 128


def test_head_dim_growth_exact_with_explicit_scale():
    source = make("bert")
    grown = growir.grow(source, width={"hidden": 64, "ffn": 128, "head_dim": 16})
    assert grown.config.num_attention_heads == 4 and grown.config.hidden_size == 64
    assert grown.growir_record.exact
    assert_preserves(source, grown, "bert")


def test_save_and_load_roundtrip(tmp_path):
    grown = growir.grow(make("llama"), width=2.0)
    grown.save_pretrained(tmp_path)
    loaded = type(grown).from_pretrained(tmp_path).eval()
    inputs = example_inputs("llama")
    assert torch.equal(outputs(grown.eval(), inputs)[0], outputs(loaded, inputs)[0])


def test_graph_module_runs_on_new_shapes():
    grown = growir.grow(make("nanogpt"), width=2.0, depth=2, example_inputs=example_inputs("nanogpt"))
    assert isinstance(grown, torch.fx.GraphModule)
    assert grown(torch.randint(0, 100, (5, 11))).shape == (5, 11, 100)


def test_source_untouched_even_in_training_mode():
    source = make("bert").train()
    snap = snapshot(source)
    growir.grow(source, width=2.0)
    assert source.training and same_state(source, snap)


def test_grown_tensors_are_not_shared_with_the_source():
    source = make("gpt2")
    snap = snapshot(source)
    grown = growir.grow(source, width=1.0)
    with torch.no_grad():
        for p in grown.parameters():
            p.add_(1.0)
    assert same_state(source, snap)


@pytest.mark.parametrize("tied", [True, False])
def test_masked_lm_head_with_square_transform(tied):
    """A hidden -> hidden transform contracts and writes the same group: only its input axis is split."""
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    source = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=100, tie_word_embeddings=tied)).eval()
    grown = growir.grow(source, width=2.0, strict=True)  # the exact copies (auto fills a post-norm residual)
    assert grown.growir_record.exact and grown.growir_record.deviation < TOL
