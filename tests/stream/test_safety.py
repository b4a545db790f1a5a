"""Writing can never destroy anything (issue 22): ``--force`` replaces only a model folder and never touches the
source, a signal or an error at any point of a streamed growth leaves the source byte-identical and OUT complete
or absent with no temporary folder, a killed run's leftovers are cleaned by the next, and every output holds
its record (``growir.json``, the shards' metadata) and is sharded like the source with the user's umask.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import event, example, given, settings, strategies as st
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.cli import main
from growir.errors import SpecError
from growir.stream import grow as stream
from growir.stream.shards import Interrupted

MAKE = stream.make_tensor

SIGNALS = [s for s in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, s)]


def save_llama(folder, shard="20KB", vocab=100):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size=shard)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tied-free 2-layer bf16 Llama in several 20KB shards."""
    return save_llama(tmp_path_factory.mktemp("safety") / "src")


def digest(folder) -> dict:
    """Every file under ``folder`` (relative path -> sha256 of its bytes, and its mode)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder) -> list:
    return [p.name for p in folder.iterdir() if "growir-tmp" in p.name or "growir-old" in p.name]


def grow(src, out, **kw):
    return main(["grow", str(src), str(out), "--width", "2", *kw.pop("extra", [])])


def test_force_never_deletes_the_source(tmp_path, capsys):
    parent = tmp_path / "parent"
    source = save_llama(parent / "src")
    before, _ = digest(parent), capsys.readouterr()  # save_pretrained's bar
    for out, memory in [(parent, False), (parent / "src", False), (parent / "src" / "grown", False),
                        (tmp_path, False), (parent, True), (parent / "src" / "grown", True)]:
        assert main(["grow", str(source), str(out), "--width", "2", "--force"] + ["--in-memory"] * memory) == 1
        err = capsys.readouterr().err
        assert "source folder" in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "link").symlink_to(parent)  # the same through a symbolic link
    assert main(["grow", str(tmp_path / "link" / "src"), str(tmp_path / "link"), "--force"]) == 1
    assert "contains the source folder" in capsys.readouterr().err
    assert digest(parent) == before and sorted(os.listdir(tmp_path)) == ["link", "parent"]


def test_force_replaces_only_a_model_folder(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.txt").write_text("four years")
    assert grow(src, out, extra=["--force"]) == 1
    err = capsys.readouterr().err
    assert f"{out}: OUT is not a model folder (1 entry: thesis.txt)" in err and len(err.splitlines()) == 1
    assert os.listdir(out) == ["thesis.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpecError, match="is a file"):
        growir.grow_checkpoint(src, tmp_path / "file", width=2.0, force=True)
    # a model folder (a previous growth) is replaced, once the new one is complete
    assert grow(src, tmp_path / "model") == 0
    assert grow(src, tmp_path / "model", extra=["--force", "--depth", "2"]) == 0
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and leftovers(tmp_path) == []


def test_an_in_memory_growth_holds_its_record(src, tmp_path, capsys):
    assert main(["grow", str(src), str(tmp_path / "out"), "--width", "2", "--in-memory"]) == 0
    record = json.loads((tmp_path / "out" / "growir.json").read_text())
    assert record["exact"] is True and record["spec"]["width"] == 2.0 and record["groups"]
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1  # sharded like the source


def test_every_output_holds_its_record_sharded_like_the_source(src, tmp_path):
    old = os.umask(0o027)
    try:
        report = growir.grow_checkpoint(src, tmp_path / "a" / "out", width=2.0, verify=True)
    finally:
        os.umask(old)
    out = tmp_path / "a" / "out"
    assert (out.stat().st_mode & 0o777, out.parent.stat().st_mode & 0o777) == (0o750, 0o750)  # not mkdtemp's 0700
    largest = max(f.stat().st_size for f in src.glob("*.safetensors"))
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) == report.shards > len(list(src.glob("*.safetensors")))
    assert all(f.stat().st_size <= largest or _tensors(f) == 1 for f in shards)
    record = json.loads((out / "growir.json").read_text())
    assert record["growir"] == growir.__version__ and record["source"] == str(src.resolve())
    assert len(record["source_digest"]) == 64 and record["spec"]["width"] == 2.0 and record["exact"] is True
    assert record["groups"] and all(v in ("zero", "mean", "random") or v.startswith("copies")
                                    for v in record["groups"].values())
    assert record["deviation"]["blocks"] <= 1e-5 and {"prepare", "write", "verify", "total"} <= set(record["seconds"])
    with safe_open(shards[0], "pt") as f:
        meta = f.metadata()
    assert meta["growir"] == growir.__version__ and meta["growir_exact"] == "true" and meta["format"] == "pt"
    assert json.loads(meta["growir_spec"])["width"] == 2.0
    one = growir.grow_checkpoint(src, tmp_path / "one", width=2.0, max_shard_size="10GB")
    assert one.shards == 1 and (tmp_path / "one" / "growir.json").is_file()


def _tensors(path) -> int:
    with safe_open(path, "pt") as f:
        return len(list(f.keys()))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_leftovers_are_cleaned_by_the_next(src, tmp_path):
    stale = tmp_path / f".out.growir-tmp-{dead_pid()}"
    stale.mkdir()
    (stale / "model-00001-of-00009.safetensors").write_bytes(b"partial")
    with pytest.warns(UserWarning, match=re.escape(f"{stale}: removed (left by a killed run")):
        growir.grow_checkpoint(src, tmp_path / "out", width=2.0)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # killed mid-swap: the model it had set aside goes back, and is not replaced without force
    aside = tmp_path / f".out.growir-old-{dead_pid()}"
    os.rename(tmp_path / "out", aside)
    with pytest.warns(UserWarning, match="put back"), pytest.raises(SpecError, match="already exists"):
        growir.grow_checkpoint(src, tmp_path / "out", width=2.0)
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "growir.json").is_file()
    live = tmp_path / f".out.growir-tmp-{os.getppid()}"  # a run still going: named, left alone
    live.mkdir()
    with pytest.raises(SpecError, match=f"another growir run .pid {os.getppid()}. is writing"):
        growir.grow_checkpoint(src, tmp_path / "out", width=2.0, force=True)
    assert live.is_dir()


@pytest.fixture(scope="module")
def prepared(src):
    """``stream.prepare`` run once: the interruption property below replays the write many times."""
    return stream.prepare(src, 2.0, 1.0, None, "auto", "auto", None, False)


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(at=st.integers(0, 25), how=st.sampled_from(["error"] + SIGNALS), force=st.booleans())
@example(at=99, how="SIGTERM", force=True).via("never interrupted: a complete OUT replaces the earlier one")
@example(at=99, how="error", force=False).via("never interrupted: a complete OUT")
def test_an_interruption_anywhere_leaves_the_source_and_no_partial_output(src, prepared, tmp_path_factory, at,
                                                                            how, force):
    """Stop the streamed growth before the ``at``-th tensor is made (an error, or a signal this process sends
    itself, handled as a signal from outside is): SRC byte-identical, OUT complete or absent, nothing else."""
    parent = tmp_path_factory.mktemp("interrupted")
    if force:  # replace an earlier output
        shutil.copytree(src, parent / "out")  # a model folder to replace
    before, earlier = digest(src), digest(parent)
    handlers = {s: signal.getsignal(getattr(signal, s)) for s in SIGNALS}
    made = []

    def faulty(*args):
        if len(made) == at:
            if how == "error":
                raise OSError("disk full")
            os.kill(os.getpid(), getattr(signal, how))
        made.append(1)
        return MAKE(*args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stream, "make_tensor", faulty)
        patch.setattr(stream, "prepare", lambda *a: dataclasses.replace(prepared, reasons=list(prepared.reasons)))
        try:
            growir.grow_checkpoint(src, parent / "out", width=2.0, force=force)
            finished = True
        except (OSError, Interrupted) as stop:
            finished = False
            assert isinstance(stop, OSError) == (how == "error")
    event(f"{how}: {'finished' if finished else 'stopped'}{', replacing' if force else ''}")
    assert digest(src) == before and leftovers(parent) == []
    assert {s: signal.getsignal(getattr(signal, s)) for s in SIGNALS} == handlers  # the handlers are restored
    assert finished == (at >= len(prepared.items))
    if finished:
        grown = LlamaForCausalLM.from_pretrained(parent / "out")
        assert grown.config.hidden_size == 64 and (parent / "out" / "growir.json").is_file()
    else:
        assert digest(parent) == earlier  # the earlier output untouched, or still no OUT


def test_sigterm_to_the_cli_leaves_nothing(tmp_path):
    """A real SIGTERM from outside, once the CLI is writing: one line, exit 128 + 15, no OUT, no temporary
    folder, the source byte-identical."""
    source = save_llama(tmp_path / "src", shard="2MB", vocab=20000)  # large enough to catch it writing
    before = digest(source)
    child = subprocess.Popen([sys.executable, "-m", "growir", "grow", str(source), str(tmp_path / "out"), "--width",
                              "2", "--verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not leftovers(tmp_path) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the growth finished before it could be interrupted"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines() == ["growir grow: stopped by SIGTERM; nothing was written"]
    assert sorted(os.listdir(tmp_path)) == ["src"] and digest(source) == before
