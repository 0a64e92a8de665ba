"""Training data: files of raw bytes -> contract-cut chunks, a held-out split, shuffling.

Every file is one *document*, cut exactly as the chain cuts the data it scores (SPEC §2,
`soma_models.v1.tokenizer`): `max_seq_len` chunks, global byte offsets as positions,
one EOS after the last byte of a short final chunk, then PAD. Training therefore sees
the same kind of rows that scoring sees, EOS/PAD tails and large positions included.

The held-out split is deterministic:

* ``"file"``: a file is held out when the hash of its relative path falls below
  `val_fraction` (stable when files are added or removed; at least one file each side);
* ``"bytes"``: the last `val_fraction` of every file's bytes is held out.

Chunks are never materialised all at once: a chunk is a `(document, chunk index)` pair
and its row is built when a batch needs it, so memory is one byte per corpus byte.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from soma_models.v1.tokenizer import ArrayBatch, allocate_rows, write_rows

SPLITS = ("file", "bytes")


class DataError(ValueError):
    """The training data cannot be used (missing path, nothing to read, empty split)."""


@dataclass(frozen=True)
class Document:
    """One file's bytes (or part of them). `name` is its path relative to the input root."""

    name: str
    data: bytes


def find_files(paths: Sequence[str | os.PathLike]) -> list[tuple[str, Path]]:
    """Every regular file under `paths` (folders recursively), as `(name, path)` sorted by name.

    Hidden files and folders (names starting with '.') and `__pycache__` are skipped: they
    are caches and VCS internals, not corpus text.
    """
    if not paths:
        raise DataError("no data paths given")
    found: dict[str, Path] = {}
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise DataError(f"{root}: no such file or folder")
        # Names are relative to the given root (prefixed by the root's own name when there
        # are several roots), never absolute: the file split must not depend on where the
        # corpus sits on disk.
        prefix = "" if len(paths) == 1 else f"{root.resolve().name}/"
        if root.is_file():
            found[root.name] = root
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames
                                 if not d.startswith(".") and d != "__pycache__")
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                path = Path(dirpath) / filename
                if path.is_file():
                    name = path.relative_to(root).as_posix()
                    found[prefix + name] = path
    return sorted(found.items())


def read_documents(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """Read every file under `paths`; empty files are dropped. Raises DataError if none remain."""
    files = find_files(paths)
    documents = []
    for name, path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if data:
            documents.append(Document(name, data))
    if not documents:
        where = ", ".join(str(p) for p in paths)
        raise DataError(f"{where}: no data (found {len(files)} file(s), all empty)"
                        if files else f"{where}: no files found")
    return documents


def _path_fraction(name: str) -> float:
    """A stable number in [0, 1) from a file name (blake2b, not Python's salted hash)."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def split_documents(documents: Sequence[Document], val_fraction: float,
                    split: str = "bytes") -> tuple[list[Document], list[Document]]:
    """Deterministic `(train, validation)` documents. See the module docstring."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split == "file":
        if len(documents) < 2:
            raise DataError(f"split 'file' needs at least 2 non-empty files, found "
                            f"{len(documents)}; use split 'bytes'")
        ranked = sorted(documents, key=lambda d: _path_fraction(d.name))
        held = [d for d in ranked if _path_fraction(d.name) < val_fraction]
        held = held or ranked[:1]
        if len(held) == len(ranked):
            held = held[:-1]
        names = {d.name for d in held}
        train = [d for d in documents if d.name not in names]
        return train, [d for d in documents if d.name in names]
    train, val = [], []
    for doc in documents:
        cut = len(doc.data) - int(len(doc.data) * val_fraction)
        if cut > 0:
            train.append(Document(doc.name, doc.data[:cut]))
        if cut < len(doc.data):
            val.append(Document(doc.name, doc.data[cut:]))
    if not train or not val:
        raise DataError(f"split 'bytes' with val_fraction {val_fraction} left the "
                        f"{'training' if not train else 'validation'} set empty")
    return train, val


def join_documents(documents: Iterable[Document]) -> bytes:
    """The held-out documents as one byte string: what `score` evaluates, like the chain."""
    return b"".join(d.data for d in documents)


class ChunkTable:
    """All contract chunks of a list of documents, addressable by one flat index."""

    def __init__(self, documents: Sequence[Document], max_seq_len: int):
        if max_seq_len < 1:
            raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.documents = list(documents)
        self.max_seq_len = max_seq_len
        counts = [-(-len(d.data) // max_seq_len) for d in self.documents]
        # chunk i belongs to document doc_of[i]; it is that document's chunk i - first[doc].
        self.first_chunk = np.concatenate(([0], np.cumsum(counts)))[:-1].astype(np.int64)
        self.doc_of = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        self.num_bytes = sum(len(d.data) for d in self.documents)
        self._flat = [np.frombuffer(d.data, dtype=np.uint8) for d in self.documents]

    def __len__(self) -> int:
        return len(self.doc_of)

    def rows(self, indices: Sequence[int]) -> ArrayBatch:
        """The rows of chunks `indices`, stacked in that order, built by the contract's
        own `soma_models.v1.tokenizer.write_rows` (row i is the row `iter_batches` gives
        for that chunk of its document)."""
        tokens, targets, pos = allocate_rows(len(indices), self.max_seq_len)
        for row, index in enumerate(indices):
            doc = int(self.doc_of[index])
            write_rows(self._flat[doc], int(index - self.first_chunk[doc]),
                       tokens[row:row + 1], targets[row:row + 1], pos[row:row + 1])
        return ArrayBatch(tokens, targets, pos)


class ChunkStream:
    """An endless stream of chunk indices: each epoch is a fresh seeded permutation.

    The stream's state is one integer, `position` (chunks consumed so far), so resuming
    is exact: epoch = position // len, offset = position % len, and the permutation of
    an epoch depends only on `(seed, epoch)`.
    """

    def __init__(self, num_chunks: int, seed: int, shuffle: bool = True):
        if num_chunks < 1:
            raise DataError("the training set has no chunks")
        self.num_chunks = num_chunks
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._cached_epoch = -1
        self._order = np.arange(num_chunks)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                self._order = rng.permutation(self.num_chunks)
            self._cached_epoch = epoch
        return self._order

    @property
    def epoch(self) -> float:
        return self.position / self.num_chunks

    def take(self, count: int) -> np.ndarray:
        """The next `count` chunk indices (crossing epoch boundaries as needed)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, offset = divmod(self.position + i, self.num_chunks)
            out[i] = self._epoch_order(epoch)[offset]
        self.position += count
        return out
