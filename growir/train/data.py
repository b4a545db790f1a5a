"""A small real-text corpus that every machine has offline: the Python standard library's own source.

Files are listed in sorted order (directories named ``test``, ``tests``, ``idlelib``, ``site-packages`` and
``__pycache__`` are skipped), taken until ``max_bytes``, and split *by file*: every ``val_every``-th file goes
to validation, so no validation text is seen in training. Tokens are bytes (ids 0..255); masked-LM adds one
special id, ``MASK_ID = 256``. The corpus depends on the Python version that runs it (its stdlib), so record
``corpus.files`` digest when comparing runs across machines.

>>> corpus = load_corpus(max_bytes=200_000)
>>> corpus.train.dtype, int(corpus.train.max()) < VOCAB
(torch.uint8, True)
>>> set(corpus.train_files).isdisjoint(corpus.val_files)
True
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass

import torch

VOCAB = 256          # byte values
MASK_ID = 256        # the [MASK] token of masked-LM runs
MLM_VOCAB = 257      # vocab size a masked-LM model needs
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """Byte streams of the train and validation files, and which files went where (paths relative to root)."""
    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]

    def digest(self) -> str:
        """A short hash of the file lists, to tell whether two runs used the same text.

        >>> len(load_corpus(max_bytes=50_000).digest())
        12
        """
        return hashlib.sha256("\n".join(self.train_files + self.val_files).encode()).hexdigest()[:12]


def stdlib_files(root: str | None = None) -> list[str]:
    """Sorted relative paths of the stdlib's ``.py`` files, skipping tests, IDLE and installed packages.

    >>> files = stdlib_files()
    >>> files == sorted(files) and not any(p.startswith("test/") for p in files)
    True
    """
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [s for s in subdirs if s not in SKIP_DIRS]
        found += [os.path.relpath(os.path.join(directory, n), root) for n in names if n.endswith(".py")]
    return sorted(found)


def load_corpus(max_bytes: int = 4_000_000, val_every: int = 10, root: str | None = None) -> Corpus:
    """Read stdlib files in sorted order until ``max_bytes``; file ``i`` is validation when ``i % val_every == val_every - 1``.

    >>> c = load_corpus(max_bytes=100_000)
    >>> len(c.val_files) >= 1 and c.val.numel() > 0
    True
    """
    root = root or sysconfig.get_paths()["stdlib"]
    chunks: dict[bool, list[bytes]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    total = 0
    for i, rel in enumerate(stdlib_files(root)):
        if total >= max_bytes and names[True]:  # at least one validation file, however small the cap
            break
        with open(os.path.join(root, rel), "rb") as f:
            text = f.read()
        is_val = i % val_every == val_every - 1
        chunks[is_val].append(text)
        names[is_val].append(rel)
        total += len(text)

    def stream(parts: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).clone()

    return Corpus(stream(chunks[False]), stream(chunks[True]), tuple(names[False]), tuple(names[True]))


def sample_windows(stream: torch.Tensor, seq: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` random windows of ``seq`` tokens (int64), start offsets drawn from ``generator``.

    >>> g = torch.Generator().manual_seed(0)
    >>> sample_windows(torch.arange(100, dtype=torch.uint8), seq=8, batch=4, generator=g).shape
    torch.Size([4, 8])
    """
    starts = torch.randint(0, stream.numel() - seq, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq] for s in starts.tolist()]).long()


def fixed_windows(stream: torch.Tensor, seq: int, count: int) -> torch.Tensor:
    """``count`` windows spread evenly over the stream: the same validation set on every call.

    >>> fixed_windows(torch.arange(100, dtype=torch.uint8), seq=10, count=3)[:, 0].tolist()
    [0, 45, 90]
    """
    last = stream.numel() - seq
    starts = torch.linspace(0, last, count).long() if count > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([stream[s:s + seq] for s in starts.tolist()]).long()


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM masking (as in bert2BERT's pre-training): ``rate`` of positions become targets; of those 80% -> [MASK], 10% random byte, 10% kept.

    Returns ``(input_ids, labels)`` with ``labels = -100`` at positions that are not predicted.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = mask_tokens(torch.full((4, 100), 65), g)
    >>> bool(((y == -100) | (y == 65)).all()), bool((x == MASK_ID).any())
    (True, True)
    """
    chosen = torch.rand(ids.shape, generator=generator) < rate
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = MASK_ID
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = torch.randint(0, VOCAB, ids.shape, generator=generator)[swap]
    return inputs, labels


@dataclass
class Batcher:
    """Seeded source of training batches and the fixed validation batches, for causal or masked LM.

    >>> b = Batcher(load_corpus(max_bytes=100_000), seq=16, batch=2, mlm=True, seed=0, val_windows=4)
    >>> sorted(b.next_batch())
    ['input_ids', 'labels']
    >>> len(b.val_batches(per_batch=2))
    2
    """
    corpus: Corpus
    seq: int
    batch: int
    mlm: bool = False
    seed: int = 0
    val_windows: int = 64
    device: str = "cpu"  # where batches are put (drawn on the CPU: the same batches on every device)

    def __post_init__(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def _pack(self, ids: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if not self.mlm:
            return {"input_ids": ids.to(self.device), "labels": ids.to(self.device)}
        inputs, labels = mask_tokens(ids, generator)
        return {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next training batch (``input_ids``, ``labels``)."""
        return self._pack(sample_windows(self.corpus.train, self.seq, self.batch, self.generator), self.generator)

    def val_batches(self, per_batch: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The validation set, identical on every call (its masks come from a fixed seed)."""
        ids = fixed_windows(self.corpus.val, self.seq, self.val_windows)
        g = torch.Generator().manual_seed(12345)
        per_batch = per_batch or self.batch
        return [self._pack(ids[i:i + per_batch], g) for i in range(0, ids.shape[0], per_batch)]
