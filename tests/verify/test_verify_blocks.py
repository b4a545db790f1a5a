"""Block-by-block verification of a streamed growth (``grow_checkpoint(verify=True)``, ``growir grow --verify``):
source and grown run from their shards one module's tensors at a time, in float32, compared at every block
boundary through the plan's index maps; an exact growth passes, a perturbed grown tensor is caught and its block
named, and nothing is written."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.stream import grow as stream
from growir.cli import main
from growir.errors import PreservationError
from zoo import randomize_norms


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tied 3-layer Llama in bf16, in several shards."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    folder = tmp_path_factory.mktemp("src") / "llama"
    randomize_norms(LlamaForCausalLM(config)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def test_x2_depth2_passes_every_block(sharded, tmp_path):
    report = growir.grow_checkpoint(sharded, tmp_path / "out", width=2.0, depth=2.0, verify=True)
    check = report.check
    assert report.exact and check.preserved and check.exact
    names = list(check.deviations)
    assert names[0].startswith("input of `model.layers`") and "model.embed_tokens" in names[0]
    assert names[1:-1] == [f"model.layers.{i} (from source block {i // 2})" for i in range(6)]
    assert names[-1].startswith("outputs") and "model.norm" in names[-1]
    assert check.worst[1] < 1e-6 and check.worst[0] in names
    assert 0 < check.peak_bytes < 4 * 64 * 128 * 3  # one module's float32 tensors at a time, never a model
    assert "block check: preserved" in str(report)
    # a tensor of the grown folder changed afterwards: verify_checkpoint (the same spec, no weights loaded) names it
    _perturb(tmp_path / "out", "model.layers.4.self_attn.o_proj.weight")
    check = growir.verify_checkpoint(sharded, tmp_path / "out", width=2.0, depth=2.0)
    assert not check.preserved and check.first_failing == "model.layers.4 (from source block 2)"
    assert all(check.deviations[f"model.layers.{i} (from source block {i // 2})"] < 1e-6 for i in range(4))


def test_a_rescaled_residual_stream_is_mapped_back(sharded, tmp_path):
    """x1.5 repeat-and-fill multiplies the grown residual stream by c = 1/sqrt(n·d/d') (passes/rescale.py): the
    check divides it out; written in float32 (no bf16 rounding of the rescaled values) the growth is exact."""
    report = growir.grow_checkpoint(sharded, tmp_path / "out", width=1.5, dtype=torch.float32, verify=True)
    assert report.exact and report.check.preserved
    assert max(report.check.deviations.values()) < 1e-6


def _perturb(folder, name: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            if name not in h.keys():
                continue
        tensors = load_file(f)
        tensors[name] = tensors[name] + 0.05
        save_file(tensors, f, metadata={"format": "pt"})
        return
    raise AssertionError(f"{name} not in {folder}")


def test_perturbed_grown_tensor_is_caught_and_its_block_named(sharded, tmp_path, monkeypatch):
    made = stream.make_tensor

    def perturbed(it, *args):
        t = made(it, *args)
        return t + 0.05 if it.name == "model.layers.3.mlp.down_proj.weight" else t
    monkeypatch.setattr(stream, "make_tensor", perturbed)
    with pytest.raises(PreservationError, match=r"departs from the source at `model.layers.3 \(from source block 1\)`"):
        growir.grow_checkpoint(sharded, tmp_path / "out", width=2.0, depth=2.0, verify=True)
    assert os.listdir(tmp_path) == []


def test_cli_verify_streams_block_by_block_and_keeps_hf_bars(sharded, tmp_path, capsys):
    transformers.utils.logging.enable_progress_bar()
    assert main(["grow", str(sharded), str(tmp_path / "out"), "--width", "2", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "block check: preserved; worst `" in out and "model.layers.2" in out and "onnxruntime" not in out
    assert transformers.utils.logging.is_progress_bar_enabled()  # turned off only while growir ran
