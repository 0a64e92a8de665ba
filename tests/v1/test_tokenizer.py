"""The data contract (SPEC §2), edge case by edge case."""

from __future__ import annotations

import numpy as np
import pytest

from soma_models.v1.configs import V1_EOS_TOKEN_ID as EOS
from soma_models.v1.configs import V1_PAD_TOKEN_ID as PAD
from soma_models.v1.tokenizer import iter_batches, num_batches, tokenize


def contract_rows(data: bytes, seq: int) -> list[tuple[list[int], list[int], list[int]]]:
    """An independent, position-by-position statement of SPEC §2 (slow on purpose)."""
    rows = []
    n = len(data)
    for start in range(0, n, seq):
        chunk = data[start:start + seq]
        tokens, pos = [], []
        for i in range(seq):
            if i < len(chunk):
                tokens.append(chunk[i])
                pos.append(start + i)
            else:
                final = start + seq >= n
                tokens.append(EOS if (final and i == len(chunk)) else PAD)
                pos.append(start + len(chunk))
        rows.append((tokens, tokens[1:] + [PAD], pos))
    return rows


@pytest.mark.parametrize("n, seq, batch", [
    (1, 8, 4),        # one byte
    (7, 8, 4),        # short single chunk
    (8, 8, 4),        # exact single chunk: no EOS
    (24, 8, 2),       # exact multiple, partial final batch
    (29, 8, 2),       # short final chunk in a partial final batch
    (64, 8, 4),       # exact multiple, full batches
    (100, 7, 3),      # odd sizes
])
def test_matches_the_contract_statement(n: int, seq: int, batch: int) -> None:
    data = bytes((i * 37 + 11) % 256 for i in range(n))
    rows = contract_rows(data, seq)
    batches = tokenize(data, max_seq_len=seq, batch_size=batch)
    assert len(batches) == num_batches(n, seq, batch) == -(-len(rows) // batch)
    flat = [(t, g, p) for b in batches for t, g, p in zip(b.token_ids, b.targets, b.pos_ids)]
    assert flat == rows
    assert all(len(b.token_ids) == batch for b in batches[:-1])


def test_eos_only_on_a_short_final_chunk() -> None:
    (short,) = tokenize(b"abc", max_seq_len=4, batch_size=1)
    assert short.token_ids == [[97, 98, 99, EOS]]
    assert short.targets == [[98, 99, EOS, PAD]]
    assert short.pos_ids == [[0, 1, 2, 3]]
    (exact,) = tokenize(b"abcd", max_seq_len=4, batch_size=1)
    assert EOS not in exact.token_ids[0]
    assert exact.targets == [[98, 99, 100, PAD]]


def test_pad_positions_are_clamped() -> None:
    (batch,) = tokenize(b"ab", max_seq_len=6, batch_size=1)
    assert batch.token_ids == [[97, 98, EOS, PAD, PAD, PAD]]
    assert batch.pos_ids == [[0, 1, 2, 2, 2, 2]]


def test_positions_past_two_to_the_sixteen() -> None:
    n = 2**16 + 1000
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    batches = list(iter_batches(data, max_seq_len=4096, batch_size=4))
    last = batches[-1]
    assert last.pos_ids.dtype == np.int64
    assert int(last.pos_ids[-1, 0]) == (n // 4096) * 4096
    data_len = n % 4096
    assert int(last.pos_ids[-1, data_len - 1]) == n - 1
    assert (last.pos_ids[-1, data_len:] == n).all()
    assert int(last.token_ids[-1, data_len]) == EOS
    # Global positions run on across batches without a reset.
    assert int(batches[1].pos_ids[0, 0]) == 4 * 4096


def test_array_form_equals_list_form() -> None:
    data = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    lists = tokenize(data, max_seq_len=64, batch_size=5)
    arrays = list(iter_batches(data, max_seq_len=64, batch_size=5))
    assert [a.to_batch() for a in arrays] == lists
    assert [a.start_chunk for a in arrays] == [5 * i for i in range(len(arrays))]


def test_accepts_bytes_like() -> None:
    data = b"hello world"
    want = tokenize(data, 4, 2)
    assert tokenize(bytearray(data), 4, 2) == want
    assert tokenize(memoryview(data), 4, 2) == want
    assert [b.to_batch() for b in iter_batches(np.frombuffer(data, np.uint8), 4, 2)] == want


def test_empty_data_gives_no_batches_but_the_array_form_refuses_it() -> None:
    # As the published package: tokenize(b"") is []; the runtime (and scoring, which
    # reads through iter_batches) refuses empty data.
    assert tokenize(b"") == []
    with pytest.raises(ValueError, match="empty"):
        next(iter_batches(b""))
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize(b"", max_seq_len=0)


@pytest.mark.parametrize("bad", ["text", None, 42, [1, 2, 3], np.zeros(3, np.int64)])
def test_non_bytes_raise_type_error_naming_the_type(bad: object) -> None:
    expected = type(bad).__name__ if not isinstance(bad, np.ndarray) else "uint8"
    with pytest.raises(TypeError, match=expected):
        tokenize(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"max_seq_len": 0}, {"batch_size": 0}, {"max_seq_len": -3}])
def test_sizes_below_one_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tokenize(b"abc", **kwargs)


def test_defaults_are_the_on_chain_ones() -> None:
    (batch,) = tokenize(b"x" * 10)
    assert len(batch.token_ids) == 1 and len(batch.token_ids[0]) == 1024  # revision "0.1.7"
