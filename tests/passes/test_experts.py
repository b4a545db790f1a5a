"""More experts on a mixture-of-experts model (issue 19, items 4 and 5): E -> mE with top-k -> mk is exact for every
router convention growir reads (softmax before the choice, renormalised or not, a sigmoid router with a 1/m on the
experts' outputs, a group-limited choice); keep_top_k and drop are measured and reported; noise cancels."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

import growir
from growir.analysis.moe import moe_layers
from growir.passes.experts import multiplier
from growir.pipeline.experts import EXPERTS
from growir.pipeline.manager import check_order, checking
from test_archs import assert_same, ids, make_moe


def grown_quietly(model, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(model, **kw)
    assert not [w for w in caught if "growir" in str(w.message)], [str(w.message) for w in caught]
    return grown


def deepseek(norm: bool) -> T.PreTrainedModel:
    """A dense first layer, then a sigmoid router with a bias, a group-limited choice (2 groups, 1 chosen) and a
    routed scaling factor; renormalised or not."""
    torch.manual_seed(0)
    return T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5, norm_topk_prob=norm)).eval()


@pytest.mark.parametrize("name, experts", [("mixtral", 8), ("qwen3_moe", 2.0), ("qwen2_moe", 2.0)])
def test_more_experts_exact_with_top_k_doubled(name, experts):
    source = make_moe(name)
    grown = grown_quietly(source, experts=experts)
    assert type(grown) is type(source)
    record = grown.growir_record
    assert record.exact and record.experts and set(record.experts.values()) == {(4, 8, 2, 4)}
    assert grown.config.num_experts_per_tok == 4
    assert_same(source, grown, [ids(2, 9, 11), ids(3, 5, 12)])
    src, new = source.state_dict(), grown.state_dict()
    router = next(k for k in src if k.endswith("layers.0.mlp.gate.weight"))
    assert torch.equal(new[router], torch.cat([src[router]] * 2))  # copy j of expert e at j*E + e
    if name == "qwen2_moe":  # the shared expert and its gate are not experts: untouched
        shared = [k for k in src if "shared_expert" in k]
        assert shared and all(torch.equal(new[k], src[k]) for k in shared)


def test_keep_top_k_warns_with_the_measured_deviation_and_strict_refuses():
    source = make_moe("mixtral")
    with pytest.warns(UserWarning, match=r"measured deviation .*keep_top_k=True keeps k=2 of 8 experts"):
        grown = growir.grow(source, experts=2.0, keep_top_k=True)
    record = grown.growir_record
    assert not record.exact and record.deviation > 1e-3
    assert grown.config.num_experts_per_tok == 2 and set(record.experts.values()) == {(4, 8, 2, 2)}
    with pytest.raises(growir.NotExactError, match="keep_top_k"):
        growir.grow(source, experts=2.0, keep_top_k=True, strict=True)


@pytest.mark.parametrize("norm", [False, True])
def test_sigmoid_router_with_groups_and_scaling(norm):
    """Without renormalisation each copy keeps its sigmoid weight: the experts' outputs are divided by m. Top-k x2
    needs the group counts x2 (the blocked copies repeat each group whole); the config that runs them is preferred
    to others that measure exact (one copy of the best group, k kept, would be exact under renormalisation)."""
    source = deepseek(norm)
    grown = grown_quietly(source, experts=2.0)
    plan = grown.growir_record.plan  # the source's
    layer, = moe_layers(plan.facts, plan.captured.gm)
    assert (layer.score, layer.renormalised, layer.scale, layer.experts) == ("sigmoid", norm, 2.5, 8)
    assert grown.growir_record.exact and grown.config.n_routed_experts == 16
    assert_same(source, grown, [ids(2, 9, 13), ids(1, 6, 14)])
    (old, new, k, new_k), = grown.growir_record.experts.values()
    assert (old, new, k, new_k) == (8, 16, 2, 4)
    assert (grown.config.n_group, grown.config.topk_group, grown.config.num_experts_per_tok) == (4, 2, 4)
    if not norm:
        down = next(k for k in source.state_dict() if k.endswith("experts.down_proj"))
        assert torch.allclose(grown.state_dict()[down][8:], source.state_dict()[down] / 2)


def test_noise_cancels_over_copies_and_breaks_their_symmetry():
    """Run with every pass checked against its declaration (what it reads, writes and mutates)."""
    source = make_moe("mixtral")
    check_order(EXPERTS, given=("model", "experts", "keep_top_k", "drop", "noise", "seed", "strict"))
    with checking():
        grown = grown_quietly(source, experts=2.0, noise=0.05)
    assert grown.growir_record.exact
    assert_same(source, grown, [ids(2, 9, 15)])
    down = grown.model.layers[0].mlp.experts.down_proj
    assert not torch.equal(down[0], down[4])  # copies differ
    assert torch.allclose(down[0] + down[4], 2 * source.model.layers[0].mlp.experts.down_proj[0], atol=1e-6)


def test_drop_upcycling_redraws_neurons_of_new_copies_and_says_so():
    source = make_moe("qwen3_moe")
    with pytest.warns(UserWarning, match="Drop-Upcycling"):
        grown = growir.grow(source, experts=2.0, drop=0.5)
    record = grown.growir_record
    assert not record.exact and record.deviation > 0
    src = source.model.layers[0].mlp.experts.down_proj.detach()  # (E, hidden, neurons)
    new = grown.model.layers[0].mlp.experts.down_proj.detach()
    assert torch.equal(new[:4], src)  # the originals keep their weights
    changed = (new[4:] != src).any(dim=1).sum(dim=-1)  # neurons drawn again, per new copy
    assert changed.tolist() == [16] * 4  # half of 32 neurons
    gate_up = grown.model.layers[0].mlp.experts.gate_up_proj.detach()  # (E, 2 x neurons, hidden): gate, then up
    rows = (gate_up[4:] != source.model.layers[0].mlp.experts.gate_up_proj.detach()).any(dim=-1)
    assert rows.sum(dim=-1).tolist() == [32] * 4 and torch.equal(rows[:, :32], rows[:, 32:])  # same neurons


def test_experts_and_width_together():
    source = make_moe("mixtral")
    grown = grown_quietly(source, experts=2.0, width=2.0)
    record = grown.growir_record
    assert record.exact and grown.config.hidden_size == 64 and grown.config.num_local_experts == 8
    assert record.params_before == sum(t.numel() for t in source.parameters())
    assert_same(source, grown, [ids(2, 9, 16)])


def test_experts_spec_errors():
    with pytest.raises(growir.SpecError, match="not whole"):
        growir.grow(torch.nn.Linear(2, 2), experts=1.5)
    with pytest.raises(growir.SpecError, match="keep_top_k and drop apply"):
        growir.grow(torch.nn.Linear(2, 2), keep_top_k=True)
    with pytest.raises(growir.SpecError, match="not a multiple"):
        multiplier(6, [4])
    assert multiplier(3.0, [4]) == 3 and multiplier(12, [4, 4]) == 3


def test_a_dense_model_has_no_experts_to_grow():
    torch.manual_seed(0)
    dense = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    with pytest.raises(growir.SpecError, match="no mixture-of-experts layer"):
        growir.grow(dense, experts=2.0)


def test_cli_grows_the_experts_of_a_folder(tmp_path, capsys):
    from growir.cli import main
    source = make_moe("mixtral")
    source.save_pretrained(tmp_path / "src")
    assert main(["grow", str(tmp_path / "src"), str(tmp_path / "out"), "--experts", "x2"]) == 0
    grown = T.MixtralForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert (grown.config.num_local_experts, grown.config.num_experts_per_tok) == (8, 4)
    assert_same(source, grown, [ids(2, 9, 17)])
