"""State-space layers grow like any other: a chunked scan pads the sequence to a multiple of its chunk and cuts it
into chunks (a reshape whose split is of the padded sequence, equal to its parts only at every size, not as
polynomials), SSM heads, their channels and the state are width groups, and the gated RMSNorm over the inner width
is a norm. Mamba2 and Jamba (attention, Mamba and MoE layers) grow x2 exactly in their own classes; Jamba's depth
x2 keeps its layer pattern (tests/passes/test_mixed_depth.py has the mechanism on small modules).
"""

from __future__ import annotations

import pytest
import sympy
import torch

import growir
from zoo import ChunkedSum
from growir.ir.axes import divides, same_size

CHUNK = 3


def test_padded_lengths_are_equal_at_every_size():
    s = sympy.Symbol("s", integer=True, positive=True)
    padded = s + sympy.Mod(4 - sympy.Mod(s, 4), 4)
    chunks = sympy.floor(padded / 4)
    assert same_size(chunks * sympy.floor(padded / chunks), padded) and divides(chunks, padded)
    assert not same_size(padded, s) and not divides(chunks, s)


def test_a_padded_chunked_scan_grows_exactly():
    torch.manual_seed(0)
    model = ChunkedSum(CHUNK).eval()
    big = growir.grow(model, width=2.0, example_inputs=(torch.randint(0, 50, (2, 7)),))
    assert big.growir_record.exact, big.growir_record.reasons
    assert big.state_dict()["up.weight"].shape == (48, 32)
    for seq in (5, 8, 10):
        ids = torch.randint(0, 50, (3, seq))
        torch.testing.assert_close(big(ids), model(ids), rtol=1e-5, atol=1e-5)


def _mamba2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # chunk 3: the traced length (8) is no multiple of it, so the traced graph pads, as most lengths do
    config = transformers.Mamba2Config(hidden_size=16, num_hidden_layers=1, vocab_size=100, state_size=6, expand=2,
                                       num_heads=8, head_dim=4, n_groups=2, chunk_size=CHUNK)
    return transformers.Mamba2ForCausalLM(config).eval()


def test_mamba2_grows_x2_exactly_in_its_class():
    model = _mamba2()
    big = growir.grow(model, width=2.0)
    record, cfg = big.growir_record, big.config
    # groups of heads (kv_heads, 2) x heads per group (4); per-head channels (4, by the gated norm) and the state
    # (6, contracted between C and B) are head_dims, kept like attention's at x2; the residual stream is hidden
    roles = sorted((g.role, g.size, g.per_kv) for g in record.plan.groups if g.role)
    assert roles == [("head_dim", 4, False), ("head_dim", 6, False), ("heads", 4, True), ("hidden", 16, False),
                     ("kv_heads", 2, False)], roles
    assert record.exact and type(big).__name__ == "Mamba2ForCausalLM"
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.state_size, cfg.n_groups) == (32, 16, 4, 6, 2)
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(big(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_mamba2_depth_x2_keeps_a_pair_as_long_as_the_stack():
    """Two layers and a (min, max) time-step limit: a list as long as the block count that holds no value per block.
    Reordered by the depth schedule it would clamp every time step to 0; the rebuilt model's outputs tell."""
    model = _mamba2()
    model = type(model)(type(model.config)(**{**model.config.to_dict(), "num_hidden_layers": 2})).eval()
    big = growir.grow(model, width=2.0, depth=2)
    assert big.growir_record.exact and type(big).__name__ == "Mamba2ForCausalLM"
    assert big.config.num_hidden_layers == 4 and list(big.config.time_step_limit) == [0.0, float("inf")]
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(big(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_jamba_grows_x2_and_depth_x2_exactly_in_its_class():
    """Jamba's layers are a Mamba layer with a dense MLP and an attention layer with MoE: two kinds, period 2.
    Sizes are chosen apart so that no config field holds another field's size by chance."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.JambaConfig(
        hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=5,
        vocab_size=100, num_experts=3, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=1, mamba_d_state=6, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=7)
    model = transformers.JambaForCausalLM(config).eval()
    big = growir.grow(model, width=2.0, depth=2)
    assert big.growir_record.exact and type(big).__name__ == "JambaForCausalLM"
    c = big.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.mamba_dt_rank) == (80, 144, 4, 14)
    assert c.layers_block_type == ["mamba", "attention"] * 2
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(big(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def _hybrid(name: str):
    """A tiny Bamba (Mamba2 and attention layers) or Falcon-H1 (Mamba2 and attention side by side in every layer,
    no norm over the SSM's inner width). Both derive the attention's head_dim as hidden / heads and validate
    SSM heads x head size against the inner width, so the grown config changes fields in pairs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, mamba_n_heads=8, mamba_d_head=4, mamba_n_groups=2,
                  mamba_d_state=6, mamba_expand=2, mamba_chunk_size=CHUNK)
    if name == "bamba":
        return transformers.BambaForCausalLM(transformers.BambaConfig(**common, attn_layer_indices=[1])).eval()
    config = transformers.FalconH1Config(**common, mamba_d_ssm=32, head_dim=4)
    return transformers.FalconH1ForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["bamba", "falcon_h1"])
def test_mamba2_hybrids_grow_x2_exactly_in_their_class(name):
    model = _hybrid(name)
    big = growir.grow(model, width=2.0)
    record, c = big.growir_record, big.config
    assert record.exact and type(big).__name__ == type(model).__name__, record.reasons
    # the SSM's per-head channels are a head_dim with or without a norm over them: heads double, channels stay
    mixer = {g.role for g in record.plan.groups if any(".mamba.in_proj" in pa.param for pa in g.producers)}
    assert "head_dim" in mixer and "ffn" not in mixer, mixer
    assert (c.hidden_size, c.mamba_n_heads, c.mamba_d_head, c.mamba_n_groups) == (32, 16, 4, 2)
    assert (c.num_attention_heads, c.num_key_value_heads) == (8, 4)
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(big(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
