"""The shard writer (``growir.stream.writer``): a tensor written in pieces (one expert at a time of a fused expert
tensor, as upcycling makes them) is the tensor written whole, byte for byte; pieces that do not add up to the
plan are refused naming the tensor; a write's error reaches the caller; and what waits for the writing thread
stays within its budget."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from growir.stream import writer as writer_module
from growir.stream.writer import DirectFile, Writer, reused_heap, write_shards


@dataclass
class Item:
    name: str
    shape: tuple
    dtype: torch.dtype = torch.bfloat16

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def experts(n=4, ffn=6, hidden=5) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {"mlp.experts.gate_up_proj": torch.randn(n, ffn, hidden, generator=gen).to(torch.bfloat16),
            "mlp.router.weight": torch.randn(n, hidden, generator=gen).to(torch.bfloat16)}


def test_a_tensor_written_in_pieces_is_the_tensor_written_whole(tmp_path):
    tensors = experts()
    items = [Item(n, tuple(t.shape)) for n, t in tensors.items()]
    (tmp_path / "whole").mkdir()
    (tmp_path / "pieces").mkdir()
    write_shards(tmp_path / "whole", {"model.safetensors": items}, lambda it: tensors[it.name])

    def one_expert_at_a_time(it):  # a generator: the fused tensor is never held whole
        t = tensors[it.name]
        return (t[e].clone() for e in range(len(t))) if t.dim() == 3 else t
    write_shards(tmp_path / "pieces", {"model.safetensors": items}, one_expert_at_a_time)
    whole, pieces = (tmp_path / d / "model.safetensors" for d in ("whole", "pieces"))
    assert whole.read_bytes() == pieces.read_bytes()
    loaded = load_file(pieces)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


@pytest.mark.parametrize("pieces, says", [
    (lambda t: [t[0], t[1]], "pieces of 60 values, planned (4, 6, 5)"),  # too few
    (lambda t: [t[0], t[1], t[2], t[3], t[3]], "pieces of 150 values or more"),  # too many
    (lambda t: [t[0].float()], "torch.float32, planned (4, 6, 5) torch.bfloat16"),  # another dtype
    (lambda t: t[:2], "(2, 6, 5) torch.bfloat16, planned (4, 6, 5)"),  # a whole tensor, wrong shape
])
def test_pieces_that_do_not_make_the_planned_tensor_are_refused(tmp_path, pieces, says):
    t = experts()["mlp.experts.gate_up_proj"]
    with pytest.raises(RuntimeError, match="`w` came out.*" + re.escape(says)):
        write_shards(tmp_path, {"model.safetensors": [Item("w", tuple(t.shape))]}, lambda it: pieces(t))


class SlowFile:
    """A file that takes its time and records how many bytes the writer held at once, or fails when told."""

    def __init__(self, writer_ref, fail_at=None):
        self.writer_ref, self.fail_at, self.writes, self.most = writer_ref, fail_at, 0, 0

    def write(self, data):
        self.most = max(self.most, self.writer_ref[0].waiting)
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError("No space left on device")
        time.sleep(0.002)

    def close(self):
        pass


def test_what_waits_for_the_writer_stays_within_its_budget():
    ref = []
    f = SlowFile(ref)
    with Writer(budget=10 * 4) as writer:
        ref.append(writer)
        for n in [4, 4, 8, 2, 10, 1, 1, 1, 3, 7] * 5:
            writer.put(f, torch.zeros(n, dtype=torch.float32))
    assert f.writes == 50 and 0 < f.most <= 40 and writer.waiting == 0
    assert not any(t.name == "growir-write" for t in threading.enumerate())


def test_a_write_error_reaches_the_caller_and_stops_the_writer():
    ref = []
    f = SlowFile(ref, fail_at=3)
    with pytest.raises(OSError, match="No space left"):
        with Writer(budget=8) as writer:
            ref.append(writer)
            for _ in range(100):
                writer.put(f, torch.zeros(2))
    assert f.writes == 3 and not any(t.name == "growir-write" for t in threading.enumerate())


def test_an_exception_in_the_caller_drops_what_waits():
    ref = []
    f = SlowFile(ref)
    with pytest.raises(KeyboardInterrupt):
        with Writer(budget=1 << 20) as writer:
            ref.append(writer)
            for _ in range(50):
                writer.put(f, torch.zeros(2))
            raise KeyboardInterrupt  # a signal's Interrupted, say
    assert f.writes < 50 and not any(t.name == "growir-write" for t in threading.enumerate())


def test_memory_freed_inside_the_reused_heap_is_taken_again():
    """The same values either way: only where the bytes live changes."""
    with reused_heap():
        sums = [float(torch.full((1 << 22,), float(i)).sum()) for i in range(3)]
    assert sums == [0.0, float(1 << 22), float(2 << 22)]


@pytest.mark.parametrize("refused", ["at fcntl", "at the first write", "never"])
def test_direct_writes_and_their_fallback_write_the_same_bytes(tmp_path, monkeypatch, refused):
    """Past the page cache where the filesystem takes O_DIRECT, ordinary writes where it does not (refused when
    set, or only when written): the same file either way, whatever the sizes written (chunk and block edges)."""
    gen = torch.Generator().manual_seed(0)
    data = [bytes(torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).tolist())
            for n in (3, 4093, 4096, 1, 100_000, 7)]
    monkeypatch.setattr(DirectFile, "CHUNK", 8192)
    if refused == "at fcntl":
        monkeypatch.setattr(writer_module, "_set_direct", lambda fd, on: False)
    elif refused == "at the first write":
        write = os.write

        def einval_when_direct(fd, buf):
            if os.O_DIRECT & writer_module.fcntl.fcntl(fd, writer_module.fcntl.F_GETFL):
                raise OSError(errno.EINVAL, "Invalid argument")
            return write(fd, buf)
        monkeypatch.setattr(writer_module.os, "write", einval_when_direct)
    f = DirectFile(tmp_path / "f")
    for chunk in data:
        f.write(chunk)
    f.close()
    assert (tmp_path / "f").read_bytes() == b"".join(data)
    f.discard()  # closing twice does nothing
