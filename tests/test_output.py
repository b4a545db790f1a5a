"""What a user reads: growir's own messages only (no library warnings or log lines), one summary per grow."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import growir

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def tiny_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=100, max_position_embeddings=32))


def grow_recording(*args, **kwargs):
    """``growir.grow`` with every warning recorded (pytest's config ignores FutureWarnings: not here)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grown = growir.grow(*args, **kwargs)
    return grown, [f"{w.category.__name__}: {w.message}" for w in caught]


def test_an_exact_grow_warns_nothing_and_its_record_is_the_summary():
    big, caught = grow_recording(tiny_llama(), width=2.0, depth=2)
    assert caught == []
    text = str(big.growir_record)
    for fragment in ("hidden", "32", "64", "blocks `model.layers`: 2 -> 4 (identity)", "preservation: exact",
                     "measured deviation", "grown in"):
        assert fragment in text, text
    rec = big.growir_record
    assert f"parameters: {rec.params_before:,} -> {rec.params_after:,}" in text
    assert rec.seconds > 0


def test_an_inexact_grow_warns_once_and_only_growir_speaks():
    _, caught = grow_recording(tiny_bert(), width=2.0, depth=2)
    assert len(caught) == 1 and caught[0].startswith("UserWarning: growir: "), caught
    assert "measured deviation" in caught[0]


def test_onnx_export_logs_no_torchvision_lines(tmp_path):
    """torch.onnx's registry warns that torchvision ops are skipped: not the user's concern, hidden per call."""
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            growir.export_onnx(torch.nn.Linear(3, 2), tmp_path / "lin.onnx", (torch.randn(4, 3),))
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "torchvision" in m]
    assert not [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
    assert logger.level == logging.NOTSET  # restored after the call


def test_cli_grow_prints_only_growirs_summary(tmp_path):
    """A real process: stderr (where library logs and bars go) stays empty; stdout is growir's summary."""
    tiny_bert().save_pretrained(tmp_path / "tiny")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("TRANSFORMERS_VERBOSITY", None)  # as a user's shell has it
    done = subprocess.run([sys.executable, "-m", "growir", "grow", tmp_path / "tiny", tmp_path / "big",
                           "--width", "2", "--verify"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("grew ") and "preservation: exact" in done.stdout
    assert any(line.startswith("block check: preserved") for line in lines)  # a folder streams: verified block by block


def test_version(capsys):
    from growir.cli import main
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"growir {growir.__version__}"
