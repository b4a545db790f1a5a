"""Writing model folders: safetensors shards streamed tensor by tensor, the index, side files, atomic output.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and the raw
bytes. With every shape known in advance the header is written first and each tensor's bytes follow as soon
as the tensor exists, so a shard never has to be held in memory.

>>> parse_size("5GB"), parse_size("500KB"), parse_size(1024)
(5000000000, 500000, 1024)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
SIDE_FILES = ("generation_config.json",) + TOKENIZER_FILES
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB" or "500MiB" (save_pretrained's units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size like 5GB, 500MB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass
class Layout:
    """Which tensors go to which shard file (``shard_layout``), and their total size in bytes."""
    files: dict  # shard file name -> tensor names in write order
    total: int

    def write_index(self, folder: Path) -> None:
        """``model.safetensors.index.json``, as save_pretrained writes it, when there is more than one shard."""
        if len(self.files) < 2:
            return
        weight_map = {n: f for f, names in self.files.items() for n in names}
        text = json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map}, indent=2)
        (folder / "model.safetensors.index.json").write_text(text + "\n")


def shard_layout(items: dict, max_bytes: int) -> Layout:
    """Tensors in order into shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, it in items.items():
        if current and size + it.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += it.nbytes
    shards.append(current)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return Layout(dict(zip(names, shards)), sum(it.nbytes for it in items.values()))


def write_shard(path: Path, items: list, make, advance=lambda n: None) -> None:
    """One safetensors file: the header from the items' shapes, then each ``make(item)``'s bytes in turn. A
    tensor is written by a background thread while the next one is made (file writes and torch's kernels both
    release the GIL), so at most two tensors are held: the one being written and the one being made."""
    from concurrent.futures import ThreadPoolExecutor

    header, offset = {}, 0
    for it in items:
        header[it.name] = {"dtype": _DTYPE_NAMES[it.dtype], "shape": list(it.shape),
                           "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f, ThreadPoolExecutor(1, thread_name_prefix="growir-write") as writer:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        pending = None
        for it in items:
            t = make(it)
            if tuple(t.shape) != tuple(it.shape) or t.dtype != it.dtype:
                raise RuntimeError(f"`{it.name}` came out {tuple(t.shape)} {t.dtype}, planned {it.shape} {it.dtype}")
            if pending is not None:
                pending.result()  # the previous tensor is on disk (its error, if any, raised here)
            pending = writer.submit(_write_tensor, f, t.contiguous(), advance)
            del t
        if pending is not None:
            pending.result()


def _write_tensor(f, t: torch.Tensor, advance) -> None:
    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    advance(t.numel() * t.element_size())


def copy_side_files(src: Path, dst: Path) -> None:
    """The generation config and tokenizer files, unchanged (growth keeps the vocabulary)."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def write_atomically(out: Path, write, force: bool) -> None:
    """``write(staging)`` into a temporary folder beside ``out``, then move it to ``out`` (replacing it if
    ``force``): an interrupted write leaves no ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        write(staging)
        if out.exists() and not force:
            raise FileExistsError(f"{out}: already exists; pass --force to replace it")
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the move succeeded
