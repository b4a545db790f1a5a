"""The growir command line: happy paths on a tiny saved BertModel, and every bad input refused on one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import onnx
import pytest
import torch
from transformers import BertConfig, BertModel

from growir.cli import CliError, main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer BertModel saved with save_pretrained, plus a tokenizer vocabulary to be carried along."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny"
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    return folder


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def grown_dir(tiny_dir, tmp_path_factory):
    """``growir grow --width 2 --verify`` of the tiny model (an exact growth, streamed and verified block by block),
    with its exit status and output."""
    out = tmp_path_factory.mktemp("grown") / "big"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["grow", str(tiny_dir), str(out), "--width", "2", "--verify"])
    return out, code, stdout.getvalue(), stderr.getvalue()


def test_grow_writes_a_wider_model_with_its_tokenizer(grown_dir):
    out, code, stdout, stderr = grown_dir
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["config.json", "growir.json", "model.safetensors", "vocab.txt"]
    assert sorted(os.listdir(out.parent)) == ["big"]  # no staging folder left beside OUT
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 128)
    assert stderr == ""
    assert "parameters:" in stdout and "hidden" in stdout
    assert "block check: preserved" in stdout  # streamed: verified block by block from the shards


def test_check_passes_on_the_grown_model_and_fails_on_a_tampered_one(capsys, tiny_dir, grown_dir):
    """Block by block, the grow arguments read from growir.json (or given); --onnx compares the whole models."""
    out = grown_dir[0]
    code, stdout, err = run(capsys, "check", tiny_dir, out)
    assert code == 0 and stdout.startswith("block check: preserved;"), err
    code, stdout, _ = run(capsys, "check", tiny_dir, out, "--onnx", "--samples", "2")
    assert code == 0 and stdout.splitlines()[0] == "growir check: PRESERVED"
    tampered = out.parent / "tampered"
    shutil.copytree(out, tampered)
    (tampered / "growir.json").unlink()
    model = BertModel.from_pretrained(tampered, local_files_only=True)
    with torch.no_grad():
        model.pooler.dense.bias[0] += 0.05
    model.save_pretrained(tampered)
    capsys.readouterr()  # the load's and save's own progress bars
    code, _, err = run(capsys, "check", tiny_dir, tampered)
    assert code == 1
    assert_one_line_error(err, f"growir check: {tampered}: no growir.json says how it was grown; pass the grow "
                               "arguments (--width, --depth or --layers), or --onnx")
    code, stdout, _ = run(capsys, "check", tiny_dir, tampered, "--width", "2")
    assert code == 1 and stdout.startswith("block check: NOT preserved from `outputs (after pooler")
    code, stdout, _ = run(capsys, "check", tiny_dir, tampered, "--onnx", "--samples", "2")
    assert code == 1 and "NOT PRESERVED (pooler_output)" in stdout


def test_plan_prints_the_groups(capsys, tiny_dir):
    code, stdout, _ = run(capsys, "plan", tiny_dir)
    assert code == 0
    assert "hidden" in stdout and "blocks `encoder.layer`: 2 x post-norm" in stdout


def test_export_writes_a_checked_single_file(capsys, tiny_dir, tmp_path):
    target = tmp_path / "tiny.onnx"
    code, stdout, _ = run(capsys, "export", tiny_dir, target)
    assert code == 0 and stdout.startswith(f"wrote {target}")
    assert os.listdir(tmp_path) == ["tiny.onnx"]
    model = onnx.load(str(target))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    code, _, err = run(capsys, "export", tiny_dir, target)
    assert code == 1
    assert_one_line_error(err, "already exists; pass --force")


def test_grow_force_replaces_an_existing_output_and_grows_depth(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run(capsys, "grow", tiny_dir, out, "--width", "2")
    assert code == 1
    assert_one_line_error(err, f"{out}: already exists; pass --force")
    assert os.listdir(out) == ["stale.txt"]
    code, _, err = run(capsys, "grow", tiny_dir, out, "--width", "2", "--force")  # not a model folder: kept
    assert code == 1 and os.listdir(out) == ["stale.txt"]
    assert_one_line_error(err, f"{out}: OUT is not a model folder (1 entry: stale.txt)")
    shutil.copytree(tiny_dir, out, dirs_exist_ok=True)  # a model folder (an earlier growth, say) is replaced
    code, stdout, err = run(capsys, "grow", tiny_dir, out, "--width", "2", "--depth", "2", "--force")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert "stale.txt" not in os.listdir(out) and (config["hidden_size"], config["num_hidden_layers"]) == (64, 4)
    assert "blocks `encoder.layer`: 2 -> 4" in stdout
    assert_one_line_error(err, "growir grow: warning: the grown model is not function-preserving")
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A copy of the tiny model folder to break."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    return folder


@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors: not a readable safetensors file (truncated or malformed?)"),
    ("garbage", "model.safetensors: not a readable safetensors file (truncated or malformed?)"),
    ("no weights", "no weights (*.safetensors)"),
    ("unknown type", "cannot load the model: The checkpoint you are trying to load has model type `foonet`"),
    ("no config", "no config.json here"),
])
def test_broken_sources_are_refused_on_one_line_and_nothing_is_written(capsys, broken, tmp_path, damage, message):
    weights = broken / "model.safetensors"
    if damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 100)
    elif damage == "garbage":
        weights.write_bytes(b"\0" * 64)
    elif damage == "no weights":
        weights.unlink()
    elif damage == "unknown type":
        config = json.loads((broken / "config.json").read_text())
        config.update(model_type="foonet", architectures=["FooNetModel"])
        (broken / "config.json").write_text(json.dumps(config))
    else:
        (broken / "config.json").unlink()
    code, stdout, err = run(capsys, "grow", broken, tmp_path / "out", "--width", "2")
    assert code == 1 and stdout == ""
    assert_one_line_error(err, f"growir grow: {broken}", message)
    assert sorted(os.listdir(tmp_path)) == ["broken"]


@pytest.mark.parametrize("argv, message", [
    (["--width", "0.5"], "argument --width: must be a number at least 1 (growir only grows), got '0.5'"),
    (["--width", "two"], "argument --width: must be a number at least 1, got 'two'"),
    (["--depth", "nan"], "argument --depth: must be a number at least 1"),
    (["--layers", "0"], "argument --layers: must be at least 1, got 0"),
])
def test_bad_growth_arguments_are_usage_errors(capsys, tiny_dir, tmp_path, argv, message):
    code, _, err = run(capsys, "grow", tiny_dir, tmp_path / "out", *argv)
    assert code == 2
    assert_one_line_error(err, "growir grow: ", message)
    assert not (tmp_path / "out").exists()


def test_missing_folder_and_debug_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "check", tmp_path / "nope", tmp_path)
    assert code == 1
    assert_one_line_error(err, f"growir check: {tmp_path / 'nope'}: no such folder")
    with pytest.raises(CliError, match="no such folder"):
        main(["check", str(tmp_path / "nope"), str(tmp_path), "--debug"])


def test_growth_errors_from_the_library_are_one_line(capsys, tiny_dir, tmp_path):
    code, _, err = run(capsys, "grow", tiny_dir, tmp_path / "out", "--width-method", "magic")
    assert code == 1
    assert_one_line_error(err, "growir grow: unknown width_method 'magic'")
    assert not (tmp_path / "out").exists()


def test_python_dash_m_runs_the_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "growir", "grow", str(tmp_path / "nope"), str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"growir grow: {tmp_path / 'nope'}: no such folder "
                                     "(expected a Hugging Face model folder with config.json)")


def test_role_specs_grow_the_groups_named(capsys, tiny_dir, tmp_path):
    code, stdout, err = run(capsys, "grow", tiny_dir, tmp_path / "out", "--width", " ffn=96")
    assert code == 0, err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]) == (32, 96, 4)
    assert json.loads((tmp_path / "out" / "growir.json").read_text())["spec"]["width"] == {"ffn": 96}
    code, _, err = run(capsys, "grow", tiny_dir, tmp_path / "o2", "--width", "hidden=64,hiden=64")
    assert code == 1
    assert_one_line_error(err, "growir grow: unknown width role(s) ['hiden']")


@pytest.mark.parametrize("width", ["hidden=", "hidden=6.5", "hidden=64,hidden=96", "=64", "hidden=0"])
def test_malformed_role_specs_are_usage_errors(capsys, tiny_dir, tmp_path, width):
    code, _, err = run(capsys, "grow", tiny_dir, tmp_path / "out", "--width", width)
    assert code == 2
    assert_one_line_error(err, "argument --width: must be a factor (2) or sizes by role")


@pytest.mark.parametrize("argv", [["grow"], ["grow", "src"], ["check", "a", "b", "--width", "0.5"], ["frobnicate"]])
def test_usage_errors_come_before_torch_is_imported(argv):
    """A usage error is reported without importing torch or the core: a fraction of a second, not 7-12 s."""
    code = ("import sys; from growir.cli import main; code = main(sys.argv[1:]); "
            "print(code, sorted(m for m in ('torch', 'transformers', 'growir.api') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "2 []", result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "(see growir" in result.stderr


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """A tiny Llama saved in bfloat16 in 3 shards, a 4-expert top-2 Mixtral config of its sizes, and ``growir grow
    SRC OUT --into MOE --verify`` of the two (in memory: experts are not streamed), with its exit status and output."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig
    from zoo import randomize_norms

    root = tmp_path_factory.mktemp("upcycle")
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-6, head_dim=8,
                 rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})  # the classes' defaults differ
    torch.manual_seed(0)
    randomize_norms(LlamaForCausalLM(LlamaConfig(**sizes))).to(torch.bfloat16).save_pretrained(
        root / "src", max_shard_size="20KB")
    (root / "src" / "vocab.txt").write_text("[PAD]\n")
    target = MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2)
    target.architectures = ["MixtralForCausalLM"]
    target.save_pretrained(root / "moe")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["grow", str(root / "src"), str(root / "out"), "--into", str(root / "moe"), "--verify"])
    return root, code, stdout.getvalue(), stderr.getvalue()


def test_into_a_mixture_of_experts_grows_a_sharded_bf16_folder_in_memory(upcycled):
    root, code, stdout, stderr = upcycled
    assert code == 0, stderr
    out = root / "out"
    assert stdout.startswith("growir grow: in memory") and "besides the imports" in stdout.splitlines()[0]
    assert "preservation: exact" in stdout and "peak memory:" in stdout
    assert "reload check: preserved" in stdout  # --verify: the folder loaded back against the source
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["num_local_experts"], config["dtype"]) == (
        ["MixtralForCausalLM"], 4, "bfloat16")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "vocab.txt").is_file()  # sharded, side files
    assert json.loads((out / "growir.json").read_text())["spec"]["into"] == str(root / "moe")
    assert sorted(os.listdir(root)) == ["moe", "out", "src"]  # atomic: no staging folder left beside OUT


def test_experts_doubled_from_the_shell_and_both_checked(capsys, upcycled, tmp_path):
    """``--experts 2.0`` on the upcycled folder (top-k grows with it), and ``growir check`` on both growths:
    the whole models compared (no block map describes experts), a tampered expert caught."""
    root = upcycled[0]
    code, stdout, err = run(capsys, "grow", root / "out", tmp_path / "more", "--experts", "2.0")
    assert code == 0, err
    config = json.loads((tmp_path / "more" / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (8, 4)
    for src, grown in ((root / "src", root / "out"), (root / "out", tmp_path / "more")):
        code, stdout, err = run(capsys, "check", src, grown)
        assert code == 0 and stdout.startswith("reload check: preserved"), err
    from safetensors.torch import load_file, save_file

    for shard in (tmp_path / "more").glob("*.safetensors"):
        tensors = load_file(shard)
        tensors = {k: v + 0.5 if ".experts.5." in k else v for k, v in tensors.items()}  # one new expert changed
        save_file(tensors, shard, metadata={"format": "pt"})
    code, stdout, _ = run(capsys, "check", root / "out", tmp_path / "more")
    assert code == 1 and stdout.startswith("reload check: NOT preserved")
