"""Sub-models of a grown model (growir/train/blocks.py, schedule.py): which blocks the function does not need,
and the two-stage schedule's sub-models that keep the function (``"whole"``) against the paper's (``"prefix"``)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from growir.train.blocks import find_blocks, identity_blocks, sliced_blocks, stack_blocks
from growir.train.schedule import TwoStage

torch.set_num_threads(1)


def llama(layers=4):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=256,
                                        max_position_embeddings=32))


def batch(n=2, seq=8, vocab=256):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def with_identities(layers=4, identities=(1, 3)):
    """A Llama whose blocks ``identities`` write nothing to the residual, as growir's exact depth growth adds."""
    m = llama(layers=layers)
    for i in identities:
        block = m.model.layers[i]
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    return m.eval()


def test_identity_blocks_are_the_ones_the_function_does_not_need():
    assert identity_blocks(with_identities()) == [1, 3]
    assert identity_blocks(llama(layers=3)) == []
    stacked = with_identities(layers=2, identities=(1,))
    stack_blocks(stacked, 4)  # the copy of an identity block is one too
    assert identity_blocks(stacked) == [1, 3]


def test_whole_submodels_compute_the_models_function_and_prefix_ones_do_not():
    m, b = with_identities(), batch()
    with torch.no_grad():
        full = m(**b).logits
        whole, prefix = TwoStage(block_size=1, stage1_steps=1), TwoStage(block_size=1, stage1_steps=1,
                                                                         submodels="prefix")
        assert whole.depths(m) == [2, 3, 4] and whole.order == [0, 2, 1, 3] and prefix.depths(m) == [1, 2, 3, 4]
        for depth in whole.depths(m):
            with sliced_blocks(m, whole.order[:depth]):
                assert torch.allclose(m(**b).logits, full, rtol=0, atol=1e-6)
        with sliced_blocks(m, 2):  # the paper's bottom half: block 2 dropped, block 1 (an identity) kept
            assert float((m(**b).logits - full).abs().max()) > 1e-2


def test_whole_submodels_train_the_blocks_they_add_last():
    m = with_identities()
    cb = TwoStage(block_size=1, stage1_steps=20, seed=0)
    seen = {}
    for step in range(20):
        m.zero_grad(set_to_none=True)
        cb.on_step_begin(m, step)
        assert {0, 2} <= set(cb.kept) and len(find_blocks(m).blocks) == cb.depth == len(cb.kept)
        assert cb.trained_blocks == [cb.order[cb.depth - 1]]
        m(**batch()).loss.backward()
        cb.on_step_end(m, step)
        seen[cb.depth] = cb.trained_blocks
    assert seen == {2: [2], 3: [1], 4: [3]}


def test_a_submodel_is_numbered_for_the_cache_and_restored():
    m = with_identities()
    ids = batch()["input_ids"]
    with sliced_blocks(m, [0, 2]) as kept:
        assert [b.self_attn.layer_idx for b in kept] == [0, 1] and m.config.num_hidden_layers == 2
        out = m(input_ids=ids, use_cache=True)  # a cache sized for two blocks
        assert len(out.past_key_values.layers) == 2
    assert [b.self_attn.layer_idx for b in m.model.layers] == [0, 1, 2, 3] and m.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="outside the 4 blocks"):
        with sliced_blocks(m, [0, 4]):
            pass
    with pytest.raises(ValueError, match="choose one of whole, prefix"):
        TwoStage(block_size=1, stage1_steps=1, submodels="top")
