"""The tokenizer's published forms: 0.1.7's `TokenizedSequence` rows, 0.1.1's batch name,
and `[]` for empty data (while scoring still refuses it)."""

from __future__ import annotations

import numpy as np
import pytest

from soma_models.v1.configs import V1_MAX_SEQ_LEN
from soma_models.v1.tokenizer import (
    Batch,
    ByteSequenceBatch,
    TokenizedSequence,
    iter_batches,
    tokenize,
    tokenize_sequences,
)


def test_sequences_are_the_rows_of_the_batches() -> None:
    data = bytes(np.random.default_rng(0).integers(0, 256, 100, dtype=np.uint8))
    rows = tokenize_sequences(data, max_seq_len=16)
    want = [row for b in tokenize(data, 16, 3) for row in zip(b.token_ids, b.targets, b.pos_ids)]
    assert [tuple(r) for r in rows] == want
    assert all(isinstance(r, TokenizedSequence) for r in rows)
    token_ids, targets, pos_ids = rows[-1]                  # unpacks like 0.1.7's NamedTuple
    assert token_ids[100 % 16] == 257 and targets[-1] == 256 and pos_ids[-1] == 100
    assert rows[-1].token_ids is token_ids and TokenizedSequence._fields == (
        "token_ids", "targets", "pos_ids")


def test_default_length_is_the_revisions() -> None:
    (row,) = tokenize_sequences(b"abc")
    assert len(row.token_ids) == V1_MAX_SEQ_LEN


def test_empty_data() -> None:
    assert tokenize(b"") == [] and tokenize_sequences(b"") == []
    assert tokenize_sequences(bytearray()) == []
    with pytest.raises(ValueError, match="empty"):
        next(iter_batches(b""))
    with pytest.raises(TypeError, match="str"):
        tokenize_sequences("")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_sequences(b"", max_seq_len=0)


def test_batch_name_of_0_1_1() -> None:
    assert ByteSequenceBatch is Batch
    (batch,) = tokenize(b"hello", 4, 2)
    assert isinstance(batch, ByteSequenceBatch) and batch.token_ids[1][:2] == [111, 257]
