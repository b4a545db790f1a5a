"""The rebuilt config changes what the shapes or the numeric check require, and nothing else; where no
config computes the grown function, the rewritten GraphModule comes back with a warning (issue 11)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import growir
from zoo import SIZE_FIELDS, make

TOL = 1e-5


def tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, vocab_size=100)
    return model_cls(config_cls(**{**base, **kw})).eval()


def logits_error(source, grown, seq: int) -> float:
    ids = torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        a, b = source(input_ids=ids).logits, grown(input_ids=ids).logits
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_and_token_ids_are_kept(family):
    """sliding_window == a head count and token ids == old sizes: none of them may change, and the grown
    model stays exact beyond the window (issue 11: 8 -> 16 was off by 0.1 past 8 tokens)."""
    ids = dict(eos_token_id=32, bos_token_id=8, pad_token_id=64)
    if family == "mistral":
        source = tiny(T.MistralConfig, T.MistralForCausalLM, num_attention_heads=8, num_key_value_heads=4,
                      sliding_window=8, **ids)
        grown = growir.grow(source, width=2.0)
    else:
        source = tiny(T.Qwen2Config, T.Qwen2ForCausalLM, num_attention_heads=8, num_key_value_heads=4,
                      sliding_window=8, use_sliding_window=True, max_window_layers=0, **ids)
        assert set(source.config.layer_types) == {"sliding_attention"}
        grown = growir.grow(source, width=2.0, depth=2)
    cfg = grown.config
    assert cfg.sliding_window == 8
    assert (cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id) == (32, 8, 64)
    assert grown.generation_config.eos_token_id == 32 and grown.generation_config.bos_token_id == 8
    assert set(grown.growir_record.config_changes) <= SIZE_FIELDS
    assert grown.growir_record.config_changes["hidden_size"] == 64
    assert logits_error(source, grown, 20) <= TOL


def test_decoder_start_token_equal_to_a_head_count_is_kept():
    torch.manual_seed(0)
    source = T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                                     vocab_size=100, decoder_start_token_id=4, eos_token_id=32,
                                                     pad_token_id=0, tie_word_embeddings=False)).eval()
    grown = growir.grow(source, width=2.0)
    assert (grown.config.decoder_start_token_id, grown.config.eos_token_id) == (4, 32)
    assert set(grown.growir_record.config_changes) <= SIZE_FIELDS


def test_config_changes_list_every_changed_field():
    grown = growir.grow(make("llama"), width=2.0, depth=2)
    source = make("llama")
    changed = {k for k, v in grown.config.to_dict().items() if source.config.to_dict().get(k) != v}
    assert set(grown.growir_record.config_changes) == changed - {"transformers_version"}


def test_token_fields_are_never_candidates():
    from growir.materialize.config import is_token_field
    assert all(is_token_field(k) for k in ("eos_token_id", "pad_token_id", "decoder_start_token_id",
                                           "image_token_index"))
    assert not any(is_token_field(k) for k in SIZE_FIELDS)


def test_head_dim_growth_the_config_cannot_express_returns_the_graph():
    """OPT derives head_dim from hidden / heads: no config holds head_dim 16 with hidden 32."""
    with pytest.warns(UserWarning, match=r"returned the rewritten torch.fx.GraphModule.*materialize='hf'"):
        grown = growir.grow(make("opt"), width={"head_dim": 16})
    assert isinstance(grown, torch.fx.GraphModule)
    rec = grown.growir_record
    assert rec.exact and rec.deviation <= TOL and "GraphModule" in rec.notes[0]
    with pytest.raises(growir.MaterializeError, match="cannot express this growth.*materialize='graph'"):
        growir.grow(make("opt"), width={"head_dim": 16}, materialize="hf")


def test_materialize_graph_always_returns_the_graph():
    grown = growir.grow(make("llama"), width=2.0, materialize="graph")
    assert isinstance(grown, torch.fx.GraphModule) and grown.growir_record.exact
    with pytest.raises(growir.SpecError, match="unknown materialize"):
        growir.grow(make("llama"), materialize="onnx")


def test_pinned_group_left_by_a_multiplier_is_reported():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, norm_first=True, dropout=0.0).eval()
    with pytest.warns(UserWarning, match=r"width=2 left .*hidden.* at their size"):
        grown = growir.grow(layer, width=2.0, example_inputs=(torch.randn(2, 5, 16),))
    assert any("left" in n for n in grown.growir_record.notes)


def test_aki_that_applies_nowhere_says_so():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    with pytest.warns(UserWarning, match="every group grew by FPI"):
        grown = growir.grow(mlp, width=2.0, width_method="aki", example_inputs=(torch.randn(2, 8),))
    assert grown.growir_record.exact and "FPI" in grown.growir_record.notes[-1]


def test_exact_growth_warns_about_nothing():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="growir")
        growir.grow(make("llama"), width=2.0)


def test_a_config_with_per_stage_lists_is_refused_in_words_not_a_type_error():
    """ResNet's per-stage widths are list elements (``hidden_sizes[1]``) among the fields the search names; a
    bottleneck's inner width (out // reduction, a constant of the class) is no config field."""
    cfg = T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck")
    with pytest.raises(growir.MaterializeError, match=r"size fields \(.*hidden_sizes\[0\].*cannot express"):
        growir.grow(T.ResNetModel(cfg).eval(), width=2.0, depth=1, materialize="hf")


def test_many_size_fields_are_searched_one_at_a_time():
    """A config with more candidate fields than the exhaustive search tries (MoE sizes, experts, kv heads, a
    layer count sharing a size with a head count) still rebuilds its class: one field at a time."""
    cfg = T.AfmoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                        num_experts_per_tok=2, num_shared_experts=2, head_dim=8, num_dense_layers=1)
    torch.manual_seed(0)
    grown = growir.grow(T.AfmoeForCausalLM(cfg).eval(), width=2.0, materialize="hf")
    assert type(grown).__name__ == "AfmoeForCausalLM" and grown.config.hidden_size == 64
