"""Corrupt weights are refused by name, before anything is written: a NaN or Inf in a tensor, a truncated shard, a
garbage header, an index that names a missing shard, a stored dtype the config does not declare."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.cli import main
from growir.frontend.folder import INDEX_FILE, CorruptWeightsError

BF16 = torch.bfloat16
TENSOR = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A 2-layer bf16 Llama saved in several shards."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         architectures=["LlamaForCausalLM"])).to(BF16)
    folder = tmp_path_factory.mktemp("src") / "llama"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture
def src(pristine, tmp_path):
    """A copy of the pristine folder to damage; the test's tmp_path holds nothing else."""
    folder = tmp_path / "src"
    shutil.copytree(pristine, folder)
    return folder


def shard_of(folder, name: str):
    return folder / json.loads((folder / INDEX_FILE).read_text())["weight_map"][name]


def poison(folder, name: str = TENSOR, value: float = float("nan")):
    """Set one value of the stored tensor ``name`` to ``value``, in place in its shard; returns the shard."""
    path = shard_of(folder, name)
    tensors = load_file(path)
    tensors[name][3, 5] = value
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("how", [[], ["--verify"], ["--in-memory", "--verify"]], ids=["stream", "verify", "memory"])
def test_a_non_finite_source_weight_is_refused_naming_file_and_tensor(src, tmp_path, capsys, value, how):
    path = poison(src, value=value)
    before = snapshot(src)
    code = main(["grow", str(src), str(tmp_path / "out"), "--width", "2", *how])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    named = src if "--in-memory" in how else path  # from_pretrained reads every shard at once
    assert f"{named}: `{TENSOR}` holds 1 NaN or Inf values" in err
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no OUT, no staging folder beside it
    assert snapshot(src) == before


def test_a_non_finite_grown_weight_fails_the_block_check_by_name(pristine, tmp_path):
    out = tmp_path / "out"
    growir.grow_checkpoint(pristine, out, width=2.0, max_shard_size="40KB")
    path = poison(out, "model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(CorruptWeightsError, match=f"{path}: `model.layers.0.self_attn.q_proj.weight` holds 1 NaN"):
        growir.verify_checkpoint(pristine, out, width=2.0)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "{shard}: not a readable safetensors file (truncated or malformed?)"),
    ("garbage", "{shard}: not a readable safetensors file (truncated or malformed?)"),
    ("missing shard", "{index}: names the shard {name}, which is not in {src}"),
    ("bad index", "{index}: not a safetensors index"),
    ("dtype", "is stored as torch.bfloat16 but config.json declares torch.float16"),
])
def test_malformed_folders_are_refused_naming_the_file(src, tmp_path, capsys, damage, message):
    shard = shard_of(src, TENSOR)
    index = src / INDEX_FILE
    if damage == "truncate":
        truncate(shard)
    elif damage == "garbage":
        shard.write_bytes(b"\x08" + b"\0" * 7 + b"{garbage")
    elif damage == "missing shard":
        shard.unlink()
    elif damage == "bad index":
        index.write_text("[1, 2]")
    else:
        config = json.loads((src / "config.json").read_text())
        config.pop("torch_dtype", None)
        config["dtype"] = "float16"
        (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptWeightsError) as caught:
        growir.grow_checkpoint(src, tmp_path / "out", width=2.0)
    assert message.format(shard=shard, index=index, name=shard.name, src=src) in str(caught.value)
    assert str(caught.value).startswith(str(src))
    code = main(["grow", str(src), str(tmp_path / "out"), "--width", "2"])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and str(src) in err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_a_float32_module_beside_a_narrower_declared_dtype_is_accepted(src, tmp_path):
    """Some classes keep modules in float32 in a bf16 checkpoint: float32 is never a corruption."""
    path = shard_of(src, TENSOR)
    tensors = load_file(path)
    tensors[TENSOR] = tensors[TENSOR].float()
    save_file(tensors, path, metadata={"format": "pt"})
    assert growir.grow_checkpoint(src, tmp_path / "out", width=2.0).check is None
