"""``growir.grow(dense, experts=E, top_k=k)`` without ``into``: the transformers mixture-of-experts class whose graph
is the model's with FFNs made experts, found by search (no table of classes), upcycled exactly (fresh inputs,
float32, <= 1e-5) into that class; a SpecError naming what was tried where none aligns; the search cached per
config; the same from the shell. And mixed dense/MoE layouts in ``into=``: dense layers copied, MoE layers
upcycled."""

import json

import pytest
import torch
import transformers as T

import growir
import growir.pipeline.moe_search as search
from growir.cli import main
from zoo import VOCAB, randomize_norms, logits_deviation as deviation

SAME = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, rms_norm_eps=1e-6,
            max_position_embeddings=256)
DENSE = {  # name: (dense model, the class the search must find, the fields it must set, the construction)
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=64, num_hidden_layers=2, **SAME)),
              T.MixtralForCausalLM, {"num_local_experts": 6, "num_experts_per_tok": 3}, "copies"),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=64, num_hidden_layers=2, **SAME)),
              T.Qwen2MoeForCausalLM, {"num_experts": 6, "num_experts_per_tok": 3, "moe_intermediate_size": 64,
                                      "shared_expert_intermediate_size": 64}, "shared"),
}


def dense(name: str):
    torch.manual_seed(0)
    return randomize_norms(DENSE[name][0]().eval())


@pytest.mark.parametrize("name", list(DENSE))
def test_experts_and_top_k_find_the_moe_class(name, monkeypatch):
    small = dense(name)
    _, cls, fields, construction = DENSE[name]
    # 6 experts: no size of the model's tensors, so only the expert count's field may take it (not a width's)
    big = growir.grow(small, experts=6, top_k=3, strict=True)
    assert type(big) is cls
    assert {k: getattr(big.config, k) for k in fields} == fields
    assert deviation(small, big) <= 1e-5
    record = big.growir_record
    assert record.exact and record.deviation <= 1e-5, record.reasons
    assert record.notes[0].startswith(f"experts=6, top_k=3: {cls.__name__} found by search"), record.notes[0]
    assert all(f": {construction} (factor" in n for n in record.notes[1:]), record.notes
    # the search is cached per config: a second model of the config does not search again
    monkeypatch.setattr(search, "_Source", lambda model: pytest.fail("searched again"))
    assert search.find_moe(dense(name), 6, 3).cls is cls


def test_no_class_aligns_names_what_was_tried(monkeypatch):
    small = dense("llama")
    with pytest.raises(growir.SpecError, match="1 <= top_k <= experts"):
        growir.grow(small, experts=2, top_k=3)
    with pytest.raises(growir.SpecError, match="leave width out"):
        growir.grow(small, experts=4, top_k=2, width=2.0)
    with pytest.raises(growir.SpecError, match="give top_k= too"):
        growir.grow(small, experts=4)
    # only a class whose attention differs (a norm on q and k): the graphs diverge, the error says so
    monkeypatch.setattr(search, "_ranked", lambda model, source: [(T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM)])
    with pytest.raises(growir.SpecError, match=r"experts=4, top_k=1: no transformers class .*"
                                               r"Qwen3MoeForCausalLM: the two graphs diverge.*into="):
        growir.grow(small, experts=4, top_k=1)


def test_from_the_shell(tmp_path, capsys):
    dense("llama").save_pretrained(tmp_path / "src")
    assert main(["grow", str(tmp_path / "src"), str(tmp_path / "out"), "--experts", "6", "--top-k", "3",
                 "--verify"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["architectures"], config["num_local_experts"], config["num_experts_per_tok"]) == \
        (["MixtralForCausalLM"], 6, 3)
    out = capsys.readouterr().out
    assert "reload check: preserved" in out, out
    assert main(["check", str(tmp_path / "src"), str(tmp_path / "out")]) == 0


MIXED = {  # name: (dense model, MoE config with some layers dense, the layers that stay dense, the construction)
    "qwen2-sparse-step": (
        lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=64, num_hidden_layers=3, **SAME)),
        T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=3,
                         decoder_sparse_step=2, **SAME), [0, 2], "shared"),
    "qwen2-mlp-only": (
        lambda: T.Qwen2ForCausalLM(T.Qwen2Config(intermediate_size=64, num_hidden_layers=3, **SAME)),
        T.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=3,
                         mlp_only_layers=[0], **SAME), [0], "shared"),
    "qwen3-mlp-only": (
        lambda: T.Qwen3ForCausalLM(T.Qwen3Config(intermediate_size=64, head_dim=8, num_hidden_layers=3, **SAME)),
        T.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=64, head_dim=8, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=3, mlp_only_layers=[1],
                         **SAME), [1], "copies"),
}


@pytest.mark.parametrize("name", list(MIXED))
def test_mixed_dense_and_moe_layers(name):
    """A dense layer after an MoE one pairs with its own FFN (``analysis/align.py``): copied; the others upcycled."""
    make, config, kept, construction = MIXED[name]
    torch.manual_seed(0)
    small = randomize_norms(make().eval())
    big = growir.grow(small, into=config, strict=True)
    assert type(big) is T.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    layers = range(config.num_hidden_layers)
    assert [i for i in layers if not hasattr(big.model.layers[i].mlp, "experts")] == kept
    for i in kept:
        for proj in ("gate_proj", "up_proj", "down_proj"):
            a, b = getattr(small.model.layers[i].mlp, proj), getattr(big.model.layers[i].mlp, proj)
            assert torch.equal(a.weight, b.weight)
    notes = big.growir_record.notes
    assert len(notes) == config.num_hidden_layers - len(kept)
    assert all(f": {construction} (factor" in n for n in notes), notes
    assert deviation(small, big) <= 1e-5
