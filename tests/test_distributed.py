"""A grown model trained by ``transformers.Trainer`` in two data-parallel processes on the CPU (gloo), with
bert2BERT's two-stage callback: the loss at step 0 is the source's, and the replicas stay identical.

The ranks run tests/ddp_worker.py. ``accelerate launch --cpu`` cannot start them: its CPU launcher starts one
process whatever ``--num_processes`` says (several only through ``mpirun``), and in that process
``TrainingArguments(ddp_backend="gloo")`` asks accelerate for a process group nobody initialized ("Default
process group has not been initialized"); ``accelerate launch --multi_gpu`` runs torchrun, which works on the
CPU with ``use_cpu=True`` (docs/savings.md, "Two processes on the CPU").
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import growir
from growir.verify.compare import TOLERANCE

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
TIMEOUT = 240  # seconds; the run takes about 15 on an idle 2-core machine


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small Llama and its exact growth (x2 width, x2 depth: identity blocks 1 and 3), saved."""
    root = tmp_path_factory.mktemp("ddp")
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, vocab_size=256,
                                          max_position_embeddings=32))
    grown = growir.grow(source, width=2.0, depth=2)
    assert grown.growir_record.exact
    source.save_pretrained(root / "src")
    grown.save_pretrained(root / "grown")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str) -> list[str]:
    if launcher == "torchrun":  # --standalone: the rendezvous takes a free port itself
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port())]


def kill_tree(pid: int) -> None:
    """Kill the launcher and every process below it: torchrun starts each rank in a session of its own, so the
    launcher's process group does not hold them (a rank left alone would keep the output pipe open forever)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def run(command: list[str]) -> subprocess.CompletedProcess:
    """Runs ``command`` in its own process group, killed whole (launcher and ranks) on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"{command[2]} ran past {TIMEOUT} s and was killed:\n{out[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out)


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_trainer_in_two_processes(folders, launcher, tmp_path):
    done = run(launch(launcher) + [WORKER, str(folders / "src"), str(folders / "grown"), str(tmp_path)])
    assert done.returncode == 0, done.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["world_size"] == 2 and r["steps"] == 4 and len(r["losses"]) == 4
        assert all(math.isfinite(x) for x in r["losses"])
        # step 0 runs a stage-1 sub-model: without the identity blocks it is still the source's function
        assert abs(r["grown_loss0"] - r["source_loss0"]) <= TOLERANCE * max(1.0, r["source_loss0"])
        assert r["identity_blocks"] == [1, 3]
        assert all({0, 2} <= set(k) for k in r["kept"][:2])  # stage 1 keeps the blocks the function needs
        assert r["kept"][2:] == [[], []]  # stage 2: the whole model
        assert r["changed"]
        assert r["checksums"][0] == r["checksums"][1]  # DDP kept the replicas identical
    assert ranks[0]["first_ids"] != ranks[1]["first_ids"]  # data parallel: each rank its own batch
    assert ranks[0]["kept"] == ranks[1]["kept"]  # every rank runs the same sub-model
