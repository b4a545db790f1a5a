"""Writing safetensors files as their tensors are made: one background thread writes while the next tensors are
made (``Writer``), past the page cache where the filesystem allows it (``DirectFile``); a tensor may come in
pieces (``pieces``), and the memory freed by one tensor is taken again by the next (``reused_heap``).

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and the raw
bytes. With every shape known in advance the header is written first and each tensor's bytes follow as soon
as the tensor exists, so a shard never has to be held in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import mmap
import os
import threading
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no O_DIRECT either
    fcntl = None

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_shards(folder: Path, files: dict, make, advance=lambda n: None, metadata=None) -> None:
    """The safetensors files ``files`` (file name -> items, in order) in ``folder``: each header from the items'
    shapes, then each ``make(item)``'s bytes in turn. ``make`` returns the tensor, or its pieces: tensors of
    its dtype whose bytes follow each other in the tensor (consecutive slices of its first axis, as one expert
    each of a fused expert tensor), so that a tensor made from several rules is never held whole. One background
    thread writes, across files, while the next tensors are made (file writes and torch's kernels both release
    the GIL); at most the largest tensor's bytes wait for it (``Writer``), so memory stays bounded."""
    budget = max((it.nbytes for items in files.values() for it in items), default=0)
    opened = []
    try:
        with Writer(budget) as writer:
            for name, items in files.items():
                f = DirectFile(Path(folder) / name)
                opened.append(f)
                f.write(_header(items, metadata))
                for it in items:
                    _queue(writer, f, it, make, advance)
                writer.put(f, None)  # closes the file once its bytes are written
    finally:
        for f in opened:
            f.discard()


class DirectFile:
    """A new file written past the page cache (``O_DIRECT``), a block-aligned chunk at a time from a reused
    aligned buffer: the bytes go to the disk as they are written, at the disk's speed, and no dirty pages pile
    up for the kernel to throttle (on the shared test machine a buffered write of 1 GB took 11 s, a direct one
    1.4 s). The tail, less than a block, is written ordinarily at ``close``. Where the filesystem refuses
    ``O_DIRECT`` (tmpfs, some network filesystems), every write is an ordinary one.

    >>> import tempfile, os
    >>> path = tempfile.mkdtemp() + "/f"
    >>> f = DirectFile(path); f.write(b"x" * 5000); f.write(memoryview(b"yz")); f.close()
    >>> os.path.getsize(path), open(path, "rb").read()[-3:]
    (5002, b'xyz')
    """
    BLOCK, CHUNK = 1 << 12, 16 << 20  # the alignment O_DIRECT asks for (at most a page), and the buffer's size

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666 & ~umask, as open() does
        self.direct = _set_direct(self.fd, True)
        self.buf, self.fill = mmap.mmap(-1, self.CHUNK), 0  # anonymous mappings are page-aligned

    def write(self, data) -> None:
        """Append ``data`` (bytes or a buffer); full chunks go to the disk."""
        data = memoryview(data).cast("B")
        while len(data):
            n = min(len(data), self.CHUNK - self.fill)
            self.buf[self.fill:self.fill + n] = data[:n]
            self.fill, data = self.fill + n, data[n:]
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)

    def _flush(self, n: int) -> None:
        """Write the buffer's first ``n`` bytes (a multiple of BLOCK while direct); the rest moves to its start."""
        view, done = memoryview(self.buf), 0
        try:
            while done < n:
                try:
                    done += os.write(self.fd, view[done:n])
                except OSError as error:  # EINVAL: O_DIRECT accepted by fcntl, refused by the write: ordinary then
                    if not (self.direct and error.errno == errno.EINVAL):
                        raise
                    self.direct = _set_direct(self.fd, False)
            view[:self.fill - n] = view[n:self.fill]
            self.fill -= n
        finally:
            view.release()

    def close(self) -> None:
        """Write what is left (the whole blocks directly, the tail ordinarily) and close the file."""
        if self.fd is None:
            return
        whole = self.fill - self.fill % self.BLOCK
        if whole:
            self._flush(whole)
        if self.fill:
            self.direct = _set_direct(self.fd, False)
            self._flush(self.fill)
        self.discard()

    def discard(self) -> None:
        """Close the file without writing what waits (an abandoned output; nothing once closed)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.buf.close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; whether it is on (never where the system or filesystem lacks it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or fcntl is None:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on


def _queue(writer, f, it, make, advance) -> None:
    """``make(it)``'s pieces to the writer (in a function of its own: no piece stays referenced here while the
    next tensor is made)."""
    for piece in pieces(make(it), it):
        writer.put(f, piece, advance)


def _header(items: list, metadata) -> bytes:
    """The 8-byte length and the JSON header, padded so that the data starts 8-byte aligned."""
    header, offset = {}, 0
    for it in items:
        header[it.name] = {"dtype": _DTYPE_NAMES[it.dtype], "shape": list(it.shape),
                           "data_offsets": [offset, offset + it.nbytes]}
        offset += it.nbytes
    header["__metadata__"] = {**(metadata or {}), "format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def pieces(made, it):
    """The contiguous tensors whose bytes, in order, are the item ``it`` (``made``: the tensor, or an iterable
    of its pieces), each checked against the planned dtype, and all against the planned shape (a whole tensor)
    or size (pieces): a mismatch is a RuntimeError naming the tensor, raised before its bytes are written past
    the plan.

    >>> from types import SimpleNamespace
    >>> it = SimpleNamespace(name="w", shape=(2, 3), dtype=torch.float32)
    >>> [tuple(p.shape) for p in pieces(iter([torch.zeros(1, 3), torch.ones(1, 3)]), it)]
    [(1, 3), (1, 3)]
    >>> list(pieces([torch.zeros(3, 3)], it))
    Traceback (most recent call last):
    RuntimeError: `w` came out in pieces of 9 values or more, torch.float32, planned (2, 3) torch.float32
    """
    if isinstance(made, torch.Tensor):
        if tuple(made.shape) != tuple(it.shape) or made.dtype != it.dtype:
            raise RuntimeError(f"`{it.name}` came out {tuple(made.shape)} {made.dtype}, planned {it.shape} {it.dtype}")
        yield made.contiguous()
        return
    total, done = _numel(it.shape), 0
    for piece in made:
        done += piece.numel()
        if piece.dtype != it.dtype or done > total:
            raise RuntimeError(f"`{it.name}` came out in pieces of {done} values or more, {piece.dtype}, planned "
                               f"{it.shape} {it.dtype}")
        yield piece.contiguous()
    if done != total:
        raise RuntimeError(f"`{it.name}` came out in pieces of {done} values, planned {it.shape} {it.dtype}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Writer:
    """A background thread that writes tensors' bytes to open files in the order given (``put``), while the
    caller makes the next ones. Once ``budget`` bytes wait, ``put`` waits (one tensor is always taken, whatever
    its size), so at most that much is held for writing. A write's error is raised by the next ``put`` or at
    the end of the ``with`` block; leaving the block by an exception (a signal's ``Interrupted``) drops what
    waits and joins the thread once its current write is done.

    >>> import io
    >>> f = io.BytesIO()
    >>> with Writer(budget=8) as w:
    ...     w.put(f, torch.arange(4, dtype=torch.uint8)); w.put(f, torch.arange(2, dtype=torch.uint8))
    >>> f.getvalue()
    b'\\x00\\x01\\x02\\x03\\x00\\x01'
    """

    def __init__(self, budget: int):
        self.budget, self.waiting, self.jobs, self.error, self.stop = budget, 0, [], None, False
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="growir-write", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def put(self, f, t, advance=lambda n: None) -> None:
        """Queue ``t``'s bytes for ``f`` (``t`` None: close ``f`` once what is queued for it is written)."""
        n = 0 if t is None else t.numel() * t.element_size()
        with self.cv:
            while self.error is None and self.jobs and self.waiting + n > self.budget:
                self.cv.wait()
            self._raise()
            self.jobs.append((f, t, n, advance))
            self.waiting += n
            self.cv.notify_all()

    def __exit__(self, kind, value, tb) -> None:
        with self.cv:
            if kind is not None:
                self.jobs.clear()  # the output is abandoned: nothing more to write
            self.stop = True
            self.cv.notify_all()
        self.thread.join()
        if kind is None:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.jobs and not self.stop:
                    self.cv.wait()
                if not self.jobs:
                    return
                f, t, n, advance = self.jobs[0]
            try:
                if t is None:
                    f.close()
                else:
                    f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    advance(n)
            except BaseException as error:  # noqa: BLE001 - handed to the caller, which raises it
                with self.cv:
                    self.error, self.jobs = error, []
                    self.cv.notify_all()
                return
            with self.cv:
                if self.jobs:
                    self.jobs.pop(0)
                self.waiting -= n
                self.cv.notify_all()


def release_heap() -> None:
    """Hand the memory freed so far back to the system. glibc keeps freed heap pages mapped (resident) for
    reuse, and the proxy's export and growth free many small tensors: 200 MiB of RSS stayed after preparing a
    246M-parameter decoder, with no tensor alive, until ``malloc_trim``. Elsewhere (no glibc) nothing happens."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
WARM = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 64 << 20))  # glibc's own, warmed


@contextlib.contextmanager
def reused_heap():
    """Large tensors made in the block reuse the memory freed by earlier ones. glibc serves a large allocation
    (above a threshold that moves from 128 KiB up to 32 MiB) with a fresh mapping and unmaps it on free, so
    every page of every grown tensor, read source and float32 transient was faulted in and zeroed anew: 100-150
    ms per 92 MiB tensor on a virtual machine, as long as writing it. Inside, nothing is mapped apart
    (``M_MMAP_MAX`` 0) and nothing is trimmed, so freed blocks are taken again at no cost (the peak is what
    is live at once, as before). After, the free memory is handed back (``release_heap``) and glibc's settings
    are those its moving threshold reaches in a process that has freed a large block (any mallopt call fixes
    them). Elsewhere (no glibc) nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in WARM:
            mallopt(param, value)
        release_heap()
