"""The V1 data contract (SPEC §2): raw bytes -> token_ids, targets, pos_ids.

Bytes are their own token ids. The data is cut into `max_seq_len` chunks; only the final
chunk, and only when it is shorter than `max_seq_len`, gets one EOS right after its last
byte, then PAD up to `max_seq_len`. Positions are global byte offsets; every EOS/PAD
position repeats the offset just past the data (it does not keep counting). Targets are
each row's token_ids shifted left by one with PAD as the last target. Consecutive chunks
are grouped into batches of `batch_size`; the last batch may be smaller.

Three forms:

* `tokenize(data)` -> list of `Batch` with nested Python lists (the product page's API);
* `tokenize_sequences(data)` -> list of `TokenizedSequence`, one per chunk (the form of
  the published soma-models 0.1.7, whose `tokenize` returned it);
* `iter_batches(data)` -> lazy iterator of `ArrayBatch` with NumPy arrays, which never
  builds Python lists and holds one batch at a time (use it for large data).

`write_rows` is the contract itself, written once: `iter_batches` and the trainer's
chunk table (`soma_models.train.data.ChunkTable`) both build their rows with it.

`tokenize` and `tokenize_sequences` return `[]` for empty data, as the published package
does; `iter_batches`, and so scoring, refuses it, as the runtime does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from soma_models.v1.configs import (
    V1_BATCH_SIZE,
    V1_EOS_TOKEN_ID,
    V1_MAX_SEQ_LEN,
    V1_PAD_TOKEN_ID,
)

BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Batch:
    """One batch as nested lists, each `[batch, seq_len]`."""

    token_ids: list[list[int]]
    targets: list[list[int]]
    pos_ids: list[list[int]]


#: The published soma-models 0.1.1's name for `Batch`.
ByteSequenceBatch = Batch


class TokenizedSequence(NamedTuple):
    """One chunk (one row of a batch) as lists, each `[seq_len]`; unpacks as a tuple."""

    token_ids: list[int]
    targets: list[int]
    pos_ids: list[int]


@dataclass(frozen=True)
class ArrayBatch:
    """One batch as NumPy arrays, each `[batch, seq_len]`: the form every array consumer
    (scoring, training, both frameworks) takes.

    `token_ids` and `targets` are int32 (ids < 264), `pos_ids` int64 (global offsets can
    exceed 2**31 for large data). `start_chunk` is the index of the batch's first chunk
    when its rows are consecutive chunks of one stream (`iter_batches`), else None (rows
    picked from several documents, as the trainer's chunk table does).
    """

    token_ids: np.ndarray
    targets: np.ndarray
    pos_ids: np.ndarray
    start_chunk: int | None = None

    def to_batch(self) -> Batch:
        return Batch(self.token_ids.tolist(), self.targets.tolist(), self.pos_ids.tolist())

    @property
    def num_data_tokens(self) -> int:
        """Positions whose target is not PAD (what the cross-entropy sums over)."""
        return int(np.count_nonzero(self.targets != V1_PAD_TOKEN_ID))


def _as_byte_view(data: object) -> memoryview:
    if isinstance(data, str):
        raise TypeError("data must be bytes-like, got str; encode it first (e.g. text.encode())")
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise TypeError(f"data as a NumPy array must have dtype uint8, got {data.dtype}")
        return memoryview(np.ascontiguousarray(data).reshape(-1))
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, bytearray or memoryview, got {type(data).__name__}")
    view = memoryview(data)
    if view.itemsize != 1 or view.ndim != 1:
        view = view.cast("B")
    return view


def _check_sizes(max_seq_len: object, batch_size: object) -> None:
    for name, value in (("max_seq_len", max_seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def num_chunks(num_bytes: int, max_seq_len: int = V1_MAX_SEQ_LEN) -> int:
    return -(-num_bytes // max_seq_len)


def num_batches(num_bytes: int, max_seq_len: int = V1_MAX_SEQ_LEN,
                batch_size: int = V1_BATCH_SIZE) -> int:
    return -(-num_chunks(num_bytes, max_seq_len) // batch_size)


def allocate_rows(rows: int, seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """token_ids, targets (int32) and pos_ids (int64) `[rows, seq]` in one allocation.

    One block of several MB per batch lets the allocator hand out huge pages; three
    separate arrays per batch made the page faults of fresh memory cost more than the
    copies themselves (measured: ~150 vs ~1000+ MB/s in benchmarks/bench_tokenizer.py).
    """
    n = rows * seq
    block = np.empty(16 * n, dtype=np.uint8)
    pos = block[: 8 * n].view(np.int64).reshape(rows, seq)
    tokens = block[8 * n : 12 * n].view(np.int32).reshape(rows, seq)
    targets = block[12 * n :].view(np.int32).reshape(rows, seq)
    return tokens, targets, pos


@lru_cache(maxsize=16)
def _relative_offsets(rows: int, seq: int) -> np.ndarray:
    """Offsets of every position of `rows` consecutive chunks from their first byte."""
    out = np.arange(rows * seq, dtype=np.int64).reshape(rows, seq)
    out.setflags(write=False)
    return out


def write_rows(flat: np.ndarray, first_chunk: int, tokens: np.ndarray, targets: np.ndarray,
               pos: np.ndarray, pos_offset: int = 0) -> None:
    """The data contract, once: fill `tokens`, `targets`, `pos` `[rows, seq]` (C-contiguous)
    with chunks `first_chunk .. first_chunk + rows - 1` of the bytes `flat` (uint8).

    Bytes, then EOS only after a short final chunk, then PAD; positions are global
    offsets (plus `pos_offset`), every EOS/PAD position clamped to the offset just past
    the data; targets are each row shifted left with PAD last. The chunks must exist
    (the last may be short).
    """
    rows, seq = tokens.shape
    for array in (tokens, targets, pos):
        if not array.flags.c_contiguous:
            raise ValueError("write_rows needs C-contiguous output arrays")
    n = len(flat)
    start = first_chunk * seq
    stop = min(n, start + rows * seq)
    tail = stop - (first_chunk + rows - 1) * seq  # bytes in the last row
    if start >= n or tail <= 0:
        raise IndexError(f"chunks {first_chunk}..{first_chunk + rows - 1} of {seq} bytes are "
                         f"past the end of {n} bytes")
    np.add(_relative_offsets(rows, seq), pos_offset + start, out=pos)
    tokens.reshape(-1)[: stop - start] = flat[start:stop]
    if tail < seq:
        # Final short chunk: EOS right after the data, PAD after that, and every
        # EOS/PAD position clamped to the offset just past the data.
        tokens[-1, tail] = V1_EOS_TOKEN_ID
        tokens[-1, tail + 1 :] = V1_PAD_TOKEN_ID
        pos[-1, tail:] = pos_offset + stop
    # Shift the whole block left as one flat copy (much faster than row by row), then
    # overwrite each row's last target, which must be PAD, not the next row's.
    targets.reshape(-1)[:-1] = tokens.reshape(-1)[1:]
    targets[:, -1] = V1_PAD_TOKEN_ID


def iter_batches(
    data: BytesLike,
    max_seq_len: int = V1_MAX_SEQ_LEN,
    batch_size: int = V1_BATCH_SIZE,
    *,
    pos_offset: int = 0,
) -> Iterator[ArrayBatch]:
    """Lazily yield the contract's batches as NumPy arrays (`write_rows` builds them).

    `pos_offset` shifts every position (training on a slice of a larger stream that
    should see the stream's global offsets); scoring uses 0.
    Raises ValueError on empty data, as the runtime does.
    """
    view = _as_byte_view(data)
    _check_sizes(max_seq_len, batch_size)
    n = len(view)
    if n == 0:
        raise ValueError("data is empty: the runtime refuses it "
                         "('data loader produced no batches')")
    flat = np.frombuffer(view, dtype=np.uint8)
    total_chunks = num_chunks(n, max_seq_len)
    for first in range(0, total_chunks, batch_size):
        rows = min(batch_size, total_chunks - first)
        tokens, targets, pos = allocate_rows(rows, max_seq_len)
        write_rows(flat, first, tokens, targets, pos, pos_offset)
        yield ArrayBatch(tokens, targets, pos, first)


def tokenize(
    data: BytesLike,
    max_seq_len: int = V1_MAX_SEQ_LEN,
    batch_size: int = V1_BATCH_SIZE,
) -> list[Batch]:
    """Apply the data contract and return every batch as nested lists (`[]` if empty)."""
    if len(_as_byte_view(data)) == 0:
        _check_sizes(max_seq_len, batch_size)
        return []
    return [b.to_batch() for b in iter_batches(data, max_seq_len, batch_size)]


def tokenize_sequences(
    data: BytesLike, max_seq_len: int = V1_MAX_SEQ_LEN
) -> list[TokenizedSequence]:
    """Apply the data contract and return every chunk as a `TokenizedSequence` (`[]` if empty).

    The same rows as `tokenize`, not grouped into batches: what the published 0.1.7's
    `tokenize(data, max_seq_len)` returned, so code written for it needs one change,
    `tokenize(...)` -> `tokenize_sequences(...)`.
    """
    if len(_as_byte_view(data)) == 0:
        _check_sizes(max_seq_len, 1)
        return []
    return [TokenizedSequence(*rows)
            for batch in iter_batches(data, max_seq_len)
            for rows in zip(batch.token_ids.tolist(), batch.targets.tolist(),
                            batch.pos_ids.tolist())]
