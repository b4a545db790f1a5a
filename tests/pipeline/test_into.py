"""growir.grow(model, into=target): every growth derived from the two graphs, the target's config reached exactly
(in memory, streamed, from the shell), or a SpecError naming the field no growth reaches."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

import growir
from growir.cli import main
from growir.pipeline.target import bookkeeping, derive, load_target

# SmolLM2-135M -> SmolLM2-360M: hidden 576 -> 960, heads 9 -> 15, kv heads 3 -> 5, FFN 1536 -> 2560 (x5/3,
# head_dim 64 in both); fewer layers and a smaller vocabulary keep the test fast
SAME = dict(hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=True, vocab_size=256, bos_token_id=0,
            eos_token_id=0, max_position_embeddings=2048)
SMOLLM_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                   num_hidden_layers=2)
SMOLLM_360M = dict(hidden_size=960, intermediate_size=2560, num_attention_heads=15, num_key_value_heads=5,
                   num_hidden_layers=3)


def narrow(sizes: dict, head_dim: int = 8) -> dict:
    """The same shape with head_dim 8 instead of 64 (the widths' ratios kept): for the slower paths."""
    k = 64 // head_dim
    return dict(sizes, hidden_size=sizes["hidden_size"] // k, intermediate_size=sizes["intermediate_size"] // k)


def differing(a, b) -> dict:
    a, b = a.to_dict(), b.to_dict()
    return {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if not bookkeeping(k) and a.get(k) != b.get(k)}


def deviation(small, big) -> float:
    ids = torch.randint(0, SAME["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = small(ids).logits, big(ids).logits
    return float((a - b).abs().max() / a.abs().max())


def test_smollm2_135m_into_360m_in_memory():
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(**SMOLLM_135M, **SAME))
    target = LlamaConfig(**SMOLLM_360M, **dict(SAME, bos_token_id=1))
    big = growir.grow(small, into=target)
    assert type(big) is LlamaForCausalLM
    assert differing(big.config, target) == {"bos_token_id": (0, 1)}  # not a growth's: the source's is kept
    assert any("bos_token_id=0 (target: 1)" in n for n in big.growir_record.notes)
    assert big.growir_record.exact
    assert deviation(small, big) <= 1e-5


def test_derived_spec_and_the_forms_of_a_target(tmp_path):
    source = dict(narrow(SMOLLM_135M), **SAME)
    with torch.device("meta"):
        small = LlamaForCausalLM(LlamaConfig(**source))
    target = LlamaConfig(**narrow(SMOLLM_360M), **SAME)
    target.save_pretrained(tmp_path / "target")
    for form in (tmp_path / "target", str(tmp_path / "target" / "config.json")):
        config, cls = load_target(form)
        assert (differing(config, target), cls) == ({}, None)  # a bare config names no class: the source's
    into = derive(small, tmp_path / "target")
    assert (into.width, into.layers, into.cls) == ({"hidden": 120, "heads": 15, "kv_heads": 5, "ffn": 320}, 3,
                                                   LlamaForCausalLM)
    same = derive(small, LlamaConfig(**source))  # into its own config: nothing grows
    assert (same.width, same.layers) == ({}, None)


def test_head_dim_is_derived_too():
    with torch.device("meta"):
        small = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                             num_key_value_heads=2, num_hidden_layers=2, vocab_size=100))
    into = derive(small, LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                     num_key_value_heads=2, num_hidden_layers=2, vocab_size=100, head_dim=32))
    assert into.width == {"head_dim": 32}


@pytest.mark.parametrize("change, says", [
    (dict(vocab_size=300), "vocab_size is 300"),
    (dict(narrow(SMOLLM_135M), num_attention_heads=6, num_key_value_heads=2), "num_key_value_heads is 2, smaller"),
    (dict(intermediate_size=100), "intermediate_size is 100, smaller"),
    (dict(num_hidden_layers=1), "num_hidden_layers is 1, fewer"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_refuses_a_field_no_growth_reaches(change, says):
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(**narrow(SMOLLM_135M), **SAME))
    target = LlamaConfig(**{**narrow(SMOLLM_360M), **SAME, **change})
    with pytest.raises(growir.SpecError, match=says):
        growir.grow(small, into=target)


def test_refuses_another_class_and_a_spec_beside_into():
    small = LlamaForCausalLM(LlamaConfig(**narrow(SMOLLM_135M), **SAME))
    with pytest.raises(growir.SpecError, match="MistralForCausalLM from a LlamaForCausalLM.*diverge"):
        growir.grow(small, into=MistralConfig(**narrow(SMOLLM_360M), **SAME))
    with pytest.raises(growir.SpecError, match="leave width, depth and layers out"):
        growir.grow(small, width=2.0, into=LlamaConfig(**narrow(SMOLLM_360M), **SAME))


def test_streamed_and_from_the_shell(tmp_path, capsys):
    torch.manual_seed(0)
    small = LlamaForCausalLM(LlamaConfig(**narrow(SMOLLM_135M), **SAME))
    small.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    target = LlamaConfig(**narrow(SMOLLM_360M), **SAME)
    target.save_pretrained(tmp_path / "target")
    report = growir.grow_checkpoint(tmp_path / "src", tmp_path / "out", into=tmp_path / "target", verify=True)
    assert report.exact and report.check.preserved
    big = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert differing(big.config, target) == {}
    assert deviation(small, big) <= 1e-5
    assert main(["grow", str(tmp_path / "src"), str(tmp_path / "cli"), "--into",
                 str(tmp_path / "target" / "config.json")]) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["num_key_value_heads"] == 5
    assert "preservation: exact" in capsys.readouterr().out


def test_streamed_refusal_writes_nothing(tmp_path):
    LlamaForCausalLM(LlamaConfig(**narrow(SMOLLM_135M), **SAME)).save_pretrained(tmp_path / "src")
    with pytest.raises(growir.SpecError, match="vocab_size"):
        growir.grow_checkpoint(tmp_path / "src", tmp_path / "out",
                               into=LlamaConfig(**{**narrow(SMOLLM_360M), **SAME, "vocab_size": 512}))
    assert not (tmp_path / "out").exists()


def test_a_group_with_no_role_follows_the_config():
    """BERT's pooler output is a group no role names: the rebuilt config sizes it, so it does not refuse."""
    from transformers import BertConfig, BertModel

    sizes = dict(num_hidden_layers=2, vocab_size=100)
    with torch.device("meta"):
        small = BertModel(BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, **sizes))
    into = derive(small, BertConfig(hidden_size=64, num_attention_heads=8, intermediate_size=128, **sizes))
    assert (into.width, into.layers) == ({"hidden": 64, "heads": 8, "ffn": 128}, None)
