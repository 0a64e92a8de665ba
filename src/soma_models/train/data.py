"""Training data: documents -> contract-cut chunks, a held-out split, a shuffled stream,
one share of every step per process. NumPy only: the torch and the Flax trainers share it.

Documents come from `soma_models.corpus.documents.open_documents`: a prepared corpus
folder (`soma-models prepare`) or files of raw bytes, both memory-mapped, so resident
memory does not grow with the corpus. Every document is cut exactly as the chain cuts
the data it scores (SPEC §2), by the contract's own `soma_models.v1.tokenizer.write_rows`:
`max_seq_len` chunks, global byte offsets as positions, one EOS after the last byte of a
short final chunk, then PAD. Training therefore sees the rows scoring sees.

The held-out split is deterministic, by document (`Split`):

* ``"file"``: a document is held out when its split key / 2**64 falls below
  `val_fraction` (a raw file's key is the hash of its relative path, so the split is
  stable when files are added or removed; at least one document each side);
* ``"bytes"``: the last `val_fraction` of every document's bytes is held out.

Nothing here is O(number of chunks) in memory:

* `ChunkTable` maps a flat chunk index to (document, chunk) through the cumulative
  chunk count per document, which lives in a memory-mapped temporary file;
* `ChunkStream`'s shuffle is a keyed pseudo-random permutation (a Feistel network with
  cycle walking) computed for the indices asked for, never stored; its state is one
  integer, so resuming is exact.

Processes: global micro-batch `m` of a step goes to process `m % world_size`
(`step_share`), so every process reads a disjoint share of every step's rows and N
processes see the rows one process would.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from soma_models.corpus.documents import (
    Document,
    Documents,
    InMemoryDocuments,
    RawFiles,
    open_documents,
)
from soma_models.corpus.inputs import mix64, find_sources
from soma_models.corpus.layout import CorpusError
from soma_models.v1.tokenizer import ArrayBatch, allocate_rows, write_rows

SPLITS = ("file", "bytes")
_BLOCK = 1 << 20  # documents per block when scanning sizes and keys
_ROUNDS = 6       # Feistel rounds of the shuffle

#: The data cannot be used (missing path, nothing to read, empty split, damaged corpus).
DataError = CorpusError


def _as_documents(documents: Documents | Sequence[Document]) -> Documents:
    if isinstance(documents, (list, tuple)):
        return InMemoryDocuments(documents)
    return documents


def _blocks(count: int) -> Iterable[tuple[int, int]]:
    for start in range(0, count, _BLOCK):
        yield start, min(count, start + _BLOCK)


class Split:
    """The held-out rule applied to `documents`: which bytes of each document train, which
    are held out. Computed per block of documents when asked, never stored per document.
    """

    def __init__(self, documents: Documents | Sequence[Document], val_fraction: float,
                 rule: str = "bytes"):
        if rule not in SPLITS:
            raise DataError(f"unknown split {rule!r}; choose one of {', '.join(SPLITS)}")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.documents = docs = _as_documents(documents)
        self.val_fraction, self.rule = val_fraction, rule
        count = len(docs)
        # "file": at least one document each side. Find the lowest and highest keys (the
        # documents moved across when one side would be empty).
        self._force_held = self._force_train = -1
        if rule == "file":
            if count < 2:
                raise DataError(f"split 'file' needs at least 2 non-empty documents, found "
                                f"{count}; use split 'bytes'")
            held, low, high = 0, (2**64, -1), (-1, -1)
            for start, stop in _blocks(count):
                keys = docs.keys(start, stop)
                held += int(np.count_nonzero(self._held(keys)))
                i, j = int(np.argmin(keys)), int(np.argmax(keys))
                low = min(low, (int(keys[i]), start + i))
                high = max(high, (int(keys[j]), start + j))
            if held == 0:
                self._force_held = low[1]
            elif held == count:
                self._force_train = high[1]
        self.train_bytes = self.val_bytes = 0
        self.train_documents = self.val_documents = 0
        for start, stop in _blocks(count):
            train = self.train_lengths(start, stop)
            sizes = docs.sizes(start, stop)
            self.train_bytes += int(train.sum())
            self.val_bytes += int((sizes - train).sum())
            self.train_documents += int(np.count_nonzero(train))
            self.val_documents += int(np.count_nonzero(sizes - train))
        if not self.train_bytes or not self.val_bytes:
            raise DataError(f"split {rule!r} with val_fraction {val_fraction} left the "
                            f"{'training' if not self.train_bytes else 'validation'} set empty")

    def _held(self, keys: np.ndarray) -> np.ndarray:
        # key / 2**64 < f  <=>  key < f * 2**64 (exact in float64 for the comparison here)
        return keys.astype(np.float64) < self.val_fraction * 2.0**64

    def train_lengths(self, start: int, stop: int) -> np.ndarray:
        """Training bytes of documents `start..stop-1` (a prefix of each), `[n]` int64."""
        sizes = self.documents.sizes(start, stop)
        if self.rule == "bytes":
            return sizes - (sizes * self.val_fraction).astype(np.int64)
        held = self._held(self.documents.keys(start, stop))
        if start <= self._force_held < stop:
            held[self._force_held - start] = True
        if start <= self._force_train < stop:
            held[self._force_train - start] = False
        return np.where(held, 0, sizes)

    def train_length(self, index: int) -> int:
        return int(self.train_lengths(index, index + 1)[0])

    def heldout(self, max_bytes: int | None = None) -> bytes:
        """The held-out bytes of every document, in document order, joined (what `score`
        evaluates, as the chain does); only the first `max_bytes` when given."""
        parts, total = [], 0
        limit = max_bytes if max_bytes is not None else self.val_bytes
        for start, stop in _blocks(len(self.documents)):
            train = self.train_lengths(start, stop)
            sizes = self.documents.sizes(start, stop)
            for i in np.flatnonzero(sizes > train):
                if total >= limit:
                    return b"".join(parts)
                doc = self.documents.document(start + int(i))
                piece = doc[int(train[i]):][:limit - total]
                parts.append(piece.tobytes())
                total += len(piece)
        return b"".join(parts)

    def describe(self) -> dict[str, int | str]:
        return {"documents": len(self.documents), "train_documents": self.train_documents,
                "val_documents": self.val_documents, "train_bytes": self.train_bytes,
                "val_bytes": self.val_bytes}


def _spill(blocks: Iterable[np.ndarray], count: int, dtype: np.dtype) -> np.ndarray:
    """`count` values from `blocks` in a read-only memory map of an unnamed temporary file:
    pages are read back only where looked up, so they do not stay resident."""
    with tempfile.TemporaryFile(prefix="soma-chunks-") as fh:
        for block in blocks:
            fh.write(np.ascontiguousarray(block, dtype).tobytes())
        fh.flush()
        # The map keeps the file alive after it is closed (and unlinked).
        return np.memmap(fh, dtype, "r", shape=(count,))


class ChunkTable:
    """Every contract chunk of the training part of `documents`, addressable by one flat
    index. Chunk `c` is chunk `c - cum[d]` of document `d`, where `cum` (memory-mapped,
    `[documents + 1]`) counts the chunks before each document.

    `ChunkTable(split, max_seq_len)` takes the training side of a `Split`;
    `ChunkTable(documents, max_seq_len)` takes every byte of every document.
    """

    def __init__(self, source: Split | Documents | Sequence[Document], max_seq_len: int):
        if max_seq_len < 1:
            raise DataError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.split = source if isinstance(source, Split) else None
        self.documents = source.documents if self.split else _as_documents(source)
        self.max_seq_len = max_seq_len
        count = len(self.documents)
        self.num_bytes = 0
        total = 0

        def cumulative() -> Iterable[np.ndarray]:
            nonlocal total
            yield np.zeros(1, np.int64)
            for start, stop in _blocks(count):
                lengths = self._lengths(start, stop)
                self.num_bytes += int(lengths.sum())
                counts = np.cumsum(-(-lengths // max_seq_len)) + total
                total = int(counts[-1]) if len(counts) else total
                yield counts

        self.first_chunk = _spill(cumulative(), count + 1, np.dtype(np.int64))
        self.num_chunks = total

    def _lengths(self, start: int, stop: int) -> np.ndarray:
        if self.split is not None:
            return self.split.train_lengths(start, stop)
        return self.documents.sizes(start, stop)

    def __len__(self) -> int:
        return self.num_chunks

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(document, chunk within it)` of flat chunk `indices`, each `[n]` int64."""
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_chunks):
            raise IndexError(f"chunk index out of range 0..{self.num_chunks - 1}")
        docs = np.searchsorted(self.first_chunk, indices, side="right") - 1
        return docs, indices - self.first_chunk[docs]

    def prefetch(self, indices: Sequence[int] | np.ndarray | list[np.ndarray]) -> None:
        """Start reading the bytes of chunks `indices` (any shape) in the background (where the
        documents can: a prepared corpus), so that `rows` later finds them in memory: on
        a corpus larger than the page cache, reads overlap the step instead of stalling it."""
        will_need = getattr(self.documents, "will_need", None)
        if will_need is None:
            return
        docs, chunks = self.locate(np.asarray(indices, np.int64).reshape(-1))
        seq = self.max_seq_len
        for doc, chunk in zip(docs.tolist(), chunks.tolist(), strict=True):
            will_need(doc, chunk * seq, (chunk + 1) * seq)

    def rows(self, indices: Sequence[int] | np.ndarray) -> ArrayBatch:
        """The rows of chunks `indices`, stacked in that order, built by the contract's
        own `soma_models.v1.tokenizer.write_rows` (row i is the row `iter_batches` gives
        for that chunk of its document's training bytes)."""
        docs, chunks = self.locate(np.asarray(indices, np.int64))
        tokens, targets, pos = allocate_rows(len(docs), self.max_seq_len)
        for row, (doc, chunk) in enumerate(zip(docs.tolist(), chunks.tolist(), strict=True)):
            data = self.documents.document(doc)
            if self.split is not None:
                data = data[:self.split.train_length(doc)]
            write_rows(data, chunk, tokens[row:row + 1], targets[row:row + 1],
                       pos[row:row + 1])
        return ArrayBatch(tokens, targets, pos)


def permutation(positions: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """Where `positions` (each in 0..size-1) go under the pseudo-random permutation of
    `range(size)` that `(seed, epoch)` picks: a balanced Feistel network on the smallest
    even number of bits covering `size`, cycle-walked back into range. O(len(positions))
    time and memory, whatever `size`."""
    positions = np.asarray(positions, np.uint64)
    if size <= 1:
        return np.zeros(len(positions), np.int64)
    bits = max(2, (size - 1).bit_length())
    half = (bits + 1) // 2
    mask = np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, np.uint64)

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(half), x & mask
        for key in keys:
            left, right = right, left ^ (mix64(right ^ key) & mask)
        return (left << np.uint64(half)) | right

    out = feistel(positions)
    outside = np.flatnonzero(out >= np.uint64(size))
    while len(outside):  # cycle walking: a permutation of the larger range, restricted
        out[outside] = feistel(out[outside])
        outside = outside[out[outside] >= np.uint64(size)]
    return out.astype(np.int64)


class ChunkStream:
    """An endless stream of chunk indices: each epoch is a fresh seeded permutation.

    The stream's state is one integer, `position` (chunks consumed so far), so resuming
    is exact: epoch = position // len, offset = position % len, and the permutation of
    an epoch depends only on `(seed, epoch)` (`permutation`, never materialised).
    """

    def __init__(self, num_chunks: int, seed: int, shuffle: bool = True):
        if num_chunks < 1:
            raise DataError("the training set has no chunks")
        self.num_chunks = num_chunks
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0

    @property
    def epoch(self) -> float:
        return self.position / self.num_chunks

    def peek(self, count: int, position: int | None = None) -> np.ndarray:
        """The `count` chunk indices from `position` (default: the current one)."""
        start = self.position if position is None else position
        absolute = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(absolute, self.num_chunks)
        if not self.shuffle:
            return offsets
        out = np.empty(count, np.int64)
        for epoch in np.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = permutation(offsets[here], self.num_chunks, self.seed, epoch)
        return out

    def take(self, count: int) -> np.ndarray:
        """The next `count` chunk indices (crossing epoch boundaries as needed)."""
        out = self.peek(count)
        self.position += count
        return out

    def state_dict(self) -> dict[str, int | bool]:
        return {"position": self.position, "num_chunks": self.num_chunks, "seed": self.seed,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue from `state`; refuses a state of another stream (other data or seed)."""
        mine = self.state_dict()
        other = {k: state.get(k) for k in ("num_chunks", "seed", "shuffle")}
        if any(other[k] != mine[k] for k in other):
            raise DataError(f"data position of another stream: {other}, this one "
                            f"{ {k: mine[k] for k in other} }")
        self.position = int(state["position"])


def step_share(indices: np.ndarray, rank: int, world_size: int,
               micro_batch_size: int) -> list[np.ndarray]:
    """This process's micro-batches of one step's global `indices`: global micro-batch `m`
    (rows `m * micro_batch_size ...`) goes to process `m % world_size`, so the shares are
    disjoint and cover the step. `[accumulation]` arrays of `[micro_batch_size]`."""
    per_step = micro_batch_size * world_size
    if len(indices) % per_step or not 0 <= rank < world_size:
        raise ValueError(f"{len(indices)} rows do not split into micro-batches of "
                         f"{micro_batch_size} over {world_size} processes (rank {rank})")
    micro = np.asarray(indices).reshape(-1, world_size, micro_batch_size)
    return list(micro[:, rank])


def process_rows(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """One process's contiguous block of a step's global rows (a JAX mesh whose batch axis
    spans processes in order: `jax.process_index()`, `jax.process_count()`)."""
    if len(indices) % process_count or not 0 <= process_index < process_count:
        raise ValueError(f"{len(indices)} rows do not split over {process_count} processes")
    size = len(indices) // process_count
    return np.asarray(indices)[process_index * size:(process_index + 1) * size]


@dataclass
class TrainingData:
    """What a trainer needs: the documents, their split, and the held-out bytes."""

    documents: Documents
    split: Split

    def table(self, max_seq_len: int) -> ChunkTable:
        return ChunkTable(self.split, max_seq_len)

    def fingerprint(self) -> str:
        """Names the training data (resume checks). Raw files: blake2b of each training
        document's name and training size (the trainer's fingerprint before corpora, so
        older checkpoints still resume); a corpus: its shard hashes."""
        names = getattr(self.documents, "names", None)
        if names is None:
            return self.documents.fingerprint()
        digest = hashlib.blake2b(digest_size=16)
        for start, stop in _blocks(len(self.documents)):
            lengths = self.split.train_lengths(start, stop).tolist()
            for name, length in zip(names[start:stop], lengths, strict=True):
                if length:
                    digest.update(name.encode("utf-8") + b"\0" + length.to_bytes(8, "little"))
        return digest.hexdigest()

    def describe(self) -> dict[str, int | str]:
        return {**self.split.describe(), "fingerprint": self.fingerprint()}


def open_training_data(paths: Sequence[str | os.PathLike], val_fraction: float,
                       split: str = "bytes") -> TrainingData:
    """Open `paths` (a corpus folder, or raw files) and apply the split."""
    documents = open_documents(paths)
    return TrainingData(documents, Split(documents, val_fraction, split))


# ----------------------------------------------------- in-memory forms (small data, tests)

def find_files(paths: Sequence[str | os.PathLike]) -> list[tuple[str, os.PathLike]]:
    """Every file under `paths` (folders recursively) as `(name, path)`, sorted by name;
    hidden entries and `__pycache__` skipped."""
    if not paths:
        raise DataError("no data paths given")
    found = {s.name: s.path for s in find_sources(list(paths), classify=False)}
    return sorted(found.items())


def read_documents(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """Every non-empty file under `paths`, read into memory (small data only; the trainer
    maps files instead). Raises DataError if none remain."""
    docs = RawFiles(paths)
    return [Document(docs.names[i], docs.document(i).tobytes()) for i in range(len(docs))]


def split_documents(documents: Sequence[Document], val_fraction: float,
                    split: str = "bytes") -> tuple[list[Document], list[Document]]:
    """Deterministic `(train, validation)` documents in memory (`Split`'s rule)."""
    rule = Split(documents, val_fraction, split)
    train, val = [], []
    for i, doc in enumerate(rule.documents.documents):
        cut = rule.train_length(i)
        if cut > 0:
            train.append(Document(doc.name, doc.data[:cut]))
        if cut < len(doc.data):
            val.append(Document(doc.name, doc.data[cut:]))
    return train, val


def join_documents(documents: Iterable[Document]) -> bytes:
    """The held-out documents as one byte string: what `score` evaluates, like the chain."""
    return b"".join(d.data for d in documents)
