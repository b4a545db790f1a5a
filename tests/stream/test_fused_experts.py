"""Streaming MoE folders whose experts transformers fuses at load: per-expert tensors on disk
(``experts.0.down_proj.weight``), one fused tensor in the model (``experts.down_proj``), read through
transformers' own conversion mapping; mixed stacks grown deeper by runs of one kind (first-k-dense) or by
whole periods (a sparse step), each checked block by block (``verify=True``).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

import growir
from growir.analysis.blocks import Blocks
from growir.frontend.folder import Checkpoint, load_config, meta_model, state_names


def _keys(folder) -> set:
    out = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            out |= set(h.keys())
    return out


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A float32 DeepSeek-V3 of three layers, the first dense (``first_k_dense_replace=1``), four routed experts."""
    torch.manual_seed(0)
    config = DeepseekV3Config(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1,
                              vocab_size=100, architectures=["DeepseekV3ForCausalLM"])
    model = DeepseekV3ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("src") / "deepseek"
    model.save_pretrained(folder)
    keys = _keys(folder)
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.1.mlp.experts.down_proj" not in keys
    return folder, model


def test_checkpoint_reads_per_expert_keys_as_the_fused_tensor(deepseek):
    folder, model = deepseek
    meta = meta_model(*load_config(folder))
    ck = Checkpoint(folder, state_names(meta), meta)
    for name, tensor in model.state_dict().items():
        assert ck.has(name), name
        assert ck.meta(name).shape == tensor.shape and torch.equal(ck.read(name), tensor), name
    assert not Checkpoint(folder, state_names(meta)).has("model.layers.1.mlp.experts.down_proj")  # no model given


@pytest.mark.parametrize("depth", [1.0, 2.0], ids=["x2", "x2-depth2"])
def test_first_k_dense_moe_streams_exactly_and_equals_in_memory(deepseek, tmp_path, depth):
    folder, model = deepseek
    report = growir.grow_checkpoint(folder, tmp_path / "out", width=2.0, depth=depth, verify=True)
    assert report.exact and report.check.preserved
    assert growir.verify_checkpoint(folder, tmp_path / "out", width=2.0, depth=depth).preserved
    grown = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert grown.config.num_hidden_layers == 3 * depth and grown.config.first_k_dense_replace == depth
    memory = growir.grow(model, width=2.0, depth=depth)
    for name, tensor in memory.state_dict().items():
        assert torch.equal(grown.state_dict()[name], tensor), name
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_streaming_grows_by_the_layout_the_config_states(deepseek, tmp_path, monkeypatch):
    """With whole periods tried first (``[d, m, m, d, m, m]``, which ``first_k_dense_replace`` cannot state), the
    config rebuild falls back to runs of one kind, and the full lists must grow by that layout too."""
    folder, model = deepseek
    default = Blocks.layouts.fget
    monkeypatch.setattr(Blocks, "layouts", property(lambda b: tuple(sorted(default(b), key=lambda x: x != "period"))))
    report = growir.grow_checkpoint(folder, tmp_path / "out", width=2.0, depth=2.0, verify=True)
    assert report.exact and report.check.preserved and "each run of one kind" in report.layers["model.layers"][2]


def _mixtral():
    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                           architectures=["MixtralForCausalLM"])
    return MixtralForCausalLM(config)


def _qwen2_moe_sparse_step():
    """Dense and MoE layers alternating (``decoder_sparse_step=2``): depth grows by whole periods."""
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=2, vocab_size=100,
                                              architectures=["Qwen2MoeForCausalLM"]))


@pytest.mark.parametrize("build, shard", [(_mixtral, "200KB"), (_qwen2_moe_sparse_step, "40KB")],
                         ids=["mixtral", "qwen2-moe-step2"])
def test_sharded_bf16_moe_streams_exactly(tmp_path, build, shard):
    torch.manual_seed(0)
    model = build().to(torch.bfloat16).eval()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size=shard)
    assert len(list(src.glob("*.safetensors"))) > 1 and "model.layers.1.mlp.experts.down_proj" not in _keys(src)
    layers = model.config.num_hidden_layers
    report = growir.grow_checkpoint(src, tmp_path / "out", width=2.0, depth=2.0, verify=True)
    assert report.exact and report.check.preserved, report
    grown = type(model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert grown.config.num_hidden_layers == 2 * layers and grown.config.hidden_size == 2 * model.config.hidden_size
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, model.float()(ids).logits, rtol=1e-5, atol=1e-5)
