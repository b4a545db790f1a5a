"""Dense -> mixture of experts: ``growir.grow(dense, into=moe_config)`` returns the target's class computing the
source's function (fresh inputs, float32, <= 1e-5) for every router convention, by the construction the router
makes exact; a SpecError naming where the two graphs diverge when they do not correspond outside the FFNs."""

import pytest
import torch
import transformers as T

import growir
from growir.analysis.align import align
from growir.frontend.export import capture
from zoo import VOCAB, randomize_norms, logits_deviation as deviation

# the fields the two classes must share for the graphs to correspond outside the FFN (their defaults differ)
SAME = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6,
            max_position_embeddings=256, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
MLA = dict(SAME, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
           v_head_dim=8, intermediate_size=64, moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2,
           n_group=2, topk_group=1, routed_scaling_factor=2.5, num_hidden_layers=2)

PAIRS = {  # name: (dense model, MoE target config, the construction expected, its factor)
    "llama-mixtral": (lambda: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=64, num_hidden_layers=2, **SAME)),
                      T.MixtralConfig(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                                      num_hidden_layers=2, **SAME), "copies", 1.0),
    "qwen3-moe": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=64, head_dim=8, num_hidden_layers=1,
                                                           **SAME)),
                  T.Qwen3MoeConfig(moe_intermediate_size=64, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                   norm_topk_prob=True, num_hidden_layers=1, **SAME), "copies", 1.0),
    "qwen2-moe": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=64, num_hidden_layers=1, **SAME)),
                  T.Qwen2MoeConfig(moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                                   num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=1, **SAME),
                  "shared", 0.5),
    # a dense DeepSeek-V3 (every layer in the first-k-dense part) into one with its second layer an MoE
    "deepseek-v3": (lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(first_k_dense_replace=2, **MLA)),
                    T.DeepseekV3Config(first_k_dense_replace=1, **MLA), "copies", 2.5),
}


def dense(name: str):
    torch.manual_seed(0)
    return randomize_norms(PAIRS[name][0]().eval())


@pytest.mark.parametrize("name", list(PAIRS))
def test_dense_into_moe_is_exact_for_its_router(name):
    small = dense(name)
    _, config, construction, factor = PAIRS[name]
    big = growir.grow(small, into=config, strict=True)
    assert type(big) is T.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    assert deviation(small, big) <= 1e-5
    record = big.growir_record
    assert record.exact and record.deviation <= 1e-5, record.reasons
    assert record.notes and all(f": {construction} (factor {factor:g})" in n for n in record.notes), record.notes
    if name == "qwen2-moe":  # the shared expert carries the FFN behind a zero gate: sigmoid(0) = 1/2
        mlp, ffn = big.model.layers[0].mlp, small.model.layers[0].mlp
        assert big.config.norm_topk_prob is False
        assert torch.equal(mlp.shared_expert_gate.weight, torch.zeros_like(mlp.shared_expert_gate.weight))
        assert torch.equal(mlp.shared_expert.down_proj.weight, 2 * ffn.down_proj.weight)
        assert not mlp.experts.down_proj.any()
    if name == "deepseek-v3":  # routed copies with down_proj / routed_scaling_factor; layer 0 stays dense
        mlp, ffn = big.model.layers[1].mlp, small.model.layers[1].mlp
        assert torch.allclose(mlp.experts.down_proj[3], ffn.down_proj.weight / 2.5)
        assert not mlp.shared_experts.down_proj.weight.any()
        assert torch.equal(big.model.layers[0].mlp.down_proj.weight, small.model.layers[0].mlp.down_proj.weight)
        assert len(record.notes) == 1 and "sigmoid" in record.notes[0]


def test_gate_and_up_are_read_from_the_fused_tensor_and_the_router_is_seeded():
    small = dense("llama-mixtral")
    config = PAIRS["llama-mixtral"][1]
    a, b = growir.grow(small, into=config, seed=1), growir.grow(small, into=config, seed=2)
    ffn, experts = small.model.layers[1].mlp, a.model.layers[1].mlp.experts
    intermediate = ffn.gate_proj.weight.shape[0]
    for e in range(4):  # the graph's chunk(2, -1) puts gate first, then up
        assert torch.equal(experts.gate_up_proj[e, :intermediate], ffn.gate_proj.weight)
        assert torch.equal(experts.gate_up_proj[e, intermediate:], ffn.up_proj.weight)
        assert torch.equal(experts.down_proj[e], ffn.down_proj.weight)
    router = lambda m: m.model.layers[0].mlp.gate.weight.detach()
    assert not torch.equal(router(a), router(b))
    assert torch.equal(router(a), router(growir.grow(small, into=config, seed=1)))  # seeded
    fan_in = router(a).shape[1]  # drawn at N(0, 1/fan_in), not the class's std 0.02: a decisive choice
    assert abs(float(torch.cat([router(a), a.model.layers[1].mlp.gate.weight.detach()]).std()) * fan_in ** 0.5 - 1) < 0.25
    assert "softmax -> topk" in a.growir_record.notes[0] and "N(0, 1/fan_in)" in a.growir_record.notes[0]


def test_parameters_outside_the_ffn_pair_by_position():
    small = dense("qwen2-moe")
    big = T.Qwen2MoeForCausalLM(PAIRS["qwen2-moe"][1]).eval()
    al = align(capture(small).gm, capture(big).gm)
    assert len(al.regions) == 1
    assert al.params["model.layers.0.self_attn.q_proj.weight"] == "model.layers.0.self_attn.q_proj.weight"
    assert not any("mlp" in name for name in al.params)


@pytest.mark.parametrize("change, says", [
    (dict(rms_norm_eps=1e-5), r"diverge at the model's `add_\d+` \(aten.add\) in module "
                              r"`model.layers.0.input_layernorm`.*1e-06"),
    (dict(hidden_size=48), r"diverge at the model's parameter `model.embed_tokens.weight` \(100, 32\)"),
    (dict(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}), "rotary_emb.inv_freq.*rope_parameters"),
])
def test_refuses_graphs_that_differ_outside_the_ffn(change, says):
    small = dense("llama-mixtral")
    config = T.MixtralConfig(**{**PAIRS["llama-mixtral"][1].to_dict(), **change})
    with pytest.raises(growir.SpecError, match=says):
        growir.grow(small, into=config)


def test_no_renormalisation_and_no_shared_expert_zero_the_router_in_bfloat16():
    """Top-k without renormalisation sums to a varying k-subset of p: copies are off, no shared expert can carry
    the FFN; a zero router gives p = 1/E, so the copies' sum k/E = 1/2 is undone on down_proj (exact while the
    router stays zero). bfloat16 weights are upcycled in float32 and stored back."""
    torch.manual_seed(0)
    small = T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=64, head_dim=8, num_hidden_layers=1, **SAME))
    small = randomize_norms(small.eval()).to(torch.bfloat16)
    config = T.Qwen3MoeConfig(moe_intermediate_size=64, head_dim=8, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=False, num_hidden_layers=1, **SAME)
    big = growir.grow(small, into=config, strict=True)
    assert big.dtype == torch.bfloat16 and big.config.norm_topk_prob is False
    assert ": uniform router (factor 0.5)" in big.growir_record.notes[0]
    assert not big.model.layers[0].mlp.gate.weight.any()
    assert deviation(small, big) <= 1e-5


def test_copies_without_renormalisation_warn_with_the_deviation(monkeypatch):
    """With the exact constructions taken away, Qwen2-MoE's top-k without renormalisation leaves copies off by the
    varying sum of the chosen probabilities: a warning with the measured deviation, NotExactError under strict."""
    import growir.pipeline.upcycle as upcycle

    monkeypatch.setattr(upcycle, "CONSTRUCTIONS", upcycle.CONSTRUCTIONS[:1])
    small = dense("qwen2-moe")
    config = T.Qwen2MoeConfig(**{**PAIRS["qwen2-moe"][1].to_dict(), "moe_intermediate_size": 64})  # copies fit
    with pytest.warns(UserWarning, match=r"upcycling is not exact: .*no construction is exact .*per-token miss"):
        big = growir.grow(small, into=config)
    assert not big.growir_record.exact and big.growir_record.deviation > 1e-3
    with pytest.raises(growir.NotExactError, match="copies: per-token miss"):
        growir.grow(small, into=config, strict=True)


def test_streaming_an_upcycling_says_it_is_in_memory_only(tmp_path):
    small = dense("llama-mixtral")
    small.save_pretrained(tmp_path / "src")
    PAIRS["llama-mixtral"][1].save_pretrained(tmp_path / "moe")
    with pytest.raises(growir.SpecError, match=r"MixtralForCausalLM makes experts .* in memory only"):
        growir.grow_checkpoint(tmp_path / "src", tmp_path / "out", into=tmp_path / "moe")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("top_k", [4, 2])
def test_fine_grained_experts_from_neuron_shards(top_k):
    """Experts of a quarter of the FFN's width: expert e holds shard e mod 4 of copy e // 4, the router rows of a
    copy tied, the factor 4 on down_proj alone. Exact where top-k chooses whole copies (4 of 8); with top-2 a
    copy's shards are split: warned with the measured deviation, NotExactError under strict."""
    small = dense("llama-mixtral")
    config = T.MixtralConfig(**{**PAIRS["llama-mixtral"][1].to_dict(), "intermediate_size": 16,
                                "num_local_experts": 8, "num_experts_per_tok": top_k})
    if top_k == 2:
        with pytest.warns(UserWarning, match=r"not exact: .*shards: per-token miss .*multiple of the shards"):
            big = growir.grow(small, into=config)
        assert not big.growir_record.exact and deviation(small, big) > 1e-3
        with pytest.raises(growir.NotExactError, match="shards"):
            growir.grow(small, into=config, strict=True)
        return
    big = growir.grow(small, into=config, strict=True)
    assert type(big) is T.MixtralForCausalLM and deviation(small, big) <= 1e-5
    assert all(": shards (factor 1)" in n for n in big.growir_record.notes), big.growir_record.notes
    ffn, mlp = small.model.layers[1].mlp, big.model.layers[1].mlp
    for e in range(8):
        rows = slice((e % 4) * 16, (e % 4 + 1) * 16)
        assert torch.equal(mlp.experts.gate_up_proj[e, :16], ffn.gate_proj.weight[rows])
        assert torch.equal(mlp.experts.gate_up_proj[e, 16:], ffn.up_proj.weight[rows])
        assert torch.equal(mlp.experts.down_proj[e], 4 * ffn.down_proj.weight[:, rows])
        assert torch.equal(mlp.gate.weight[e], mlp.gate.weight[e - e % 4])
