"""Model folders written: which tensors go to which shard (``shard_layout``), the index, side files, atomic output
(the shards' bytes: ``writer``).

Writing never destroys anything (``write_atomically``): OUT is never the source, inside it or around it; an
existing OUT is replaced only when it is a model folder, and only once the new one is complete (written
beside it as ``.OUT.growir-tmp-<pid>``, then swapped in); SIGTERM, SIGHUP and SIGINT during the write remove
the temporary folder and raise ``Interrupted``; a temporary folder left by a killed run is cleaned by the next.

>>> parse_size("5GB"), parse_size("500KB"), parse_size(1024)
(5000000000, 500000, 1024)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError, warn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja")
SIDE_FILES = ("generation_config.json",) + TOKENIZER_FILES
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}



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


def copy_side_files(src: Path, dst: Path) -> None:
    """The generation config and tokenizer files, unchanged (growth keeps the vocabulary)."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def source_shard_size(folder: Path) -> int | None:
    """The largest safetensors file of a sharded folder, in bytes (the grown model is sharded like it); None
    for a folder of one file (the grown model is one file too, up to 50GB)."""
    sizes = [f.stat().st_size for f in Path(folder).glob("*.safetensors")]
    return max(sizes) if len(sizes) > 1 else None


TMP_TAG, OLD_TAG = "growir-tmp", "growir-old"  # .OUT.growir-tmp-<pid>: the next run can tell whose it is
_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """A signal stopped a write: the temporary folder is gone and OUT is as it was. A KeyboardInterrupt, so
    that no ``except Exception`` on the way swallows it; ``signum`` gives the exit status (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def is_model_folder(folder: Path) -> bool:
    """A folder growir may replace: a growir output (``growir.json``), or ``config.json`` and weights."""
    folder = Path(folder)
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return (folder / "growir.json").is_file() or ((folder / "config.json").is_file() and weights)


def check_output(out, force: bool, src=None) -> None:
    """Refuse an output that would destroy something: OUT that is SRC, is inside SRC or contains it (symlinks
    resolved), a symlink, an existing OUT without ``force``, or anything but a model folder (or an empty
    folder) with it. A refusal is a SpecError that says what is there.

    >>> import tempfile; from pathlib import Path
    >>> parent = Path(tempfile.mkdtemp()); (parent / "src").mkdir(); _ = (parent / "thesis.txt").write_text("...")
    >>> check_output(parent, True, parent / "src")
    Traceback (most recent call last):
    growir.errors.SpecError: ... contains the source folder ...; write the grown model somewhere else
    >>> check_output(parent, True)
    Traceback (most recent call last):
    growir.errors.SpecError: ... is not a model folder (2 entries: src/, thesis.txt); growir replaces only ...
    """
    out = Path(out)
    if src is not None:
        source, target = Path(src).resolve(), out.resolve()
        where = ("is the source folder" if target == source else "is inside the source folder " + str(src)
                 if source in target.parents else "contains the source folder " + str(src)
                 if target in source.parents else None)
        if where:
            raise SpecError(f"{out}: OUT {where}; write the grown model somewhere else")
    if out.is_symlink():
        raise SpecError(f"{out}: OUT is a symbolic link (to {os.readlink(out)}); name a real folder")
    if not out.exists():
        return
    if not force:
        raise SpecError(f"{out}: already exists; pass --force (force=True) to replace it")
    if not out.is_dir():
        raise SpecError(f"{out}: OUT is a file, not a model folder; growir replaces only a model folder")
    if any(out.iterdir()) and not is_model_folder(out):
        raise SpecError(f"{out}: OUT is not a model folder ({_listing(out)}); growir replaces only a folder with "
                        f"config.json and weights, or a growir output: move it away or choose another OUT")


def _listing(folder: Path) -> str:
    names = sorted(p.name + "/" * p.is_dir() for p in folder.iterdir())
    more = f", and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: " + ", ".join(names[:3]) + more


def clean_stale(out: Path) -> list:
    """Temporary folders beside ``out`` left by a killed run: a dead run's staging folder is removed, a
    replaced model set aside is put back (when OUT is missing) or removed; each is named in a warning. One of
    a live run is refused (two runs on one OUT). Returns what was done, one line each."""
    out, done = Path(out), []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({TMP_TAG}|{OLD_TAG})-(\d+)")
    for path in sorted(out.parent.iterdir()) if out.parent.is_dir() else []:
        m = pattern.fullmatch(path.name)
        if m is None:
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _alive(pid):
            raise SpecError(f"{path}: another growir run (pid {pid}) is writing {out}; wait for it, or remove "
                            f"that folder if no such run exists")
        if m.group(1) == OLD_TAG and not out.exists():
            os.replace(path, out)  # killed mid-swap: the model it replaced goes back
            done.append(f"{path}: put back as {out} (a killed run had set it aside)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"{path}: removed (left by a killed run, pid {pid})")
    for line in done:
        warn(f"growir: {line}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM, SIGHUP and SIGINT raise ``Interrupted`` (the first; later ones wait for the cleanup), or are
    held while ``state["hold"]`` (the swap) and re-sent once the previous handlers are back."""
    state = {"fired": None, "hold": False}

    def handler(signum, frame):
        if state["fired"] is None:
            state["fired"] = signum
            if not state["hold"]:
                raise Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.signal(s, handler) for s in _SIGNALS} if main else {}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)
    if state["hold"] and state["fired"] is not None:
        signal.raise_signal(state["fired"])  # the output is complete; the signal now does what it would have


def write_atomically(out: Path, write, force: bool, src=None) -> None:
    """``write(staging)`` into ``.OUT.growir-tmp-<pid>`` beside ``out``, then swap it in: an existing OUT
    (a model folder, with ``force``: ``check_output``) is renamed aside, the new one renamed in, the old one
    removed. An error or a signal during the write removes the temporary folder and leaves OUT as it was."""
    out = Path(out)
    check_output(out, force, src)
    out.parent.mkdir(parents=True, exist_ok=True)  # mkdir, not mkdtemp: the user's umask, not 0700
    clean_stale(out)
    staging = out.parent / f".{out.name}.{TMP_TAG}-{os.getpid()}"
    with _signals_raise() as state:
        try:  # the mkdir inside: a signal between it and the try would leave the folder behind
            staging.mkdir()
            write(staging)
            state["hold"] = True  # a signal now would leave OUT half-swapped: held until the swap is done
            _swap(staging, out, force, src)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already when the swap succeeded


def _swap(staging: Path, out: Path, force: bool, src) -> None:
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    check_output(out, force, src)  # again: OUT may have appeared or changed during the write
    old = out.parent / f".{out.name}.{OLD_TAG}-{os.getpid()}"
    os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)  # what is left, the next run on OUT removes
