import numpy as np
import pytest

from soma_models.train.data import (
    ChunkStream,
    ChunkTable,
    DataError,
    Document,
    find_files,
    join_documents,
    read_documents,
    split_documents,
)
from soma_models.v1.tokenizer import iter_batches


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 100])
def test_chunk_rows_match_the_data_contract(length):
    data = bytes(np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8))
    expected = next(iter_batches(data, 32, batch_size=1000))
    table = ChunkTable([Document("d", data)], 32)
    order = np.arange(len(table))[::-1]                   # any order, one row at a time
    batch = table.rows(order)
    for name in ("token_ids", "targets", "pos_ids"):
        got, want = getattr(batch, name), getattr(expected, name)[order]
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_files_are_found_recursively_sorted_and_filtered(corpus):
    names = [name for name, _ in find_files([corpus])]
    assert names == ["a.txt", "b.md", "empty.txt", "sub/c.py", "sub/d.txt"]
    docs = read_documents([corpus])
    assert [d.name for d in docs] == ["a.txt", "b.md", "sub/c.py", "sub/d.txt"]  # empty dropped
    assert docs[2].data == (corpus / "sub" / "c.py").read_bytes()


def test_several_roots_give_location_independent_names(corpus):
    names = [name for name, _ in find_files([corpus / "sub", corpus / "a.txt"])]
    assert names == ["a.txt", "sub/c.py", "sub/d.txt"]


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        read_documents([tmp_path / "missing"])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "zero.bin").write_bytes(b"")
    with pytest.raises(DataError, match="all empty"):
        read_documents([tmp_path / "e"])


def test_file_split_is_deterministic_disjoint_and_complete(corpus):
    docs = read_documents([corpus])
    train, val = split_documents(docs, 0.3, "file")
    again = split_documents(list(reversed(docs)), 0.3, "file")
    assert {d.name for d in val} == {d.name for d in again[1]}
    assert train and val
    assert {d.name for d in train} | {d.name for d in val} == {d.name for d in docs}
    assert not {d.name for d in train} & {d.name for d in val}


def test_byte_split_holds_out_each_file_tail(corpus):
    docs = read_documents([corpus])
    train, val = split_documents(docs, 0.25, "bytes")
    for doc, head, tail in zip(docs, train, val, strict=True):
        assert head.data + tail.data == doc.data
        assert len(tail.data) == int(len(doc.data) * 0.25)


def test_chunk_table_addresses_every_chunk_of_every_document():
    docs = [Document("x", b"a" * 70), Document("y", b"b" * 10)]
    table = ChunkTable(docs, 32)
    assert len(table) == 3 + 1
    batch = table.rows([3, 0])
    np.testing.assert_array_equal(batch.token_ids[0],
                                  next(iter_batches(b"b" * 10, 32)).token_ids[0])
    np.testing.assert_array_equal(batch.pos_ids[1], np.arange(32))


def test_chunk_stream_resumes_exactly_and_covers_each_epoch():
    stream = ChunkStream(10, seed=5)
    first = np.concatenate([stream.take(3) for _ in range(7)])  # crosses two epochs
    assert sorted(first[:10]) == list(range(10))
    assert sorted(first[10:20]) == list(range(10))
    resumed = ChunkStream(10, seed=5)
    resumed.position = 9
    np.testing.assert_array_equal(resumed.take(12), first[9:21])


# ------------------------------------------------- memory-mapped documents and the stream

def _reference_rows(documents, split, seq):
    """Independent: every chunk's row, by `iter_batches` over each document's training
    bytes (split_documents' in-memory rule), in document order."""
    train, _ = split_documents(documents, 0.25, split)
    rows = []
    for doc in train:
        for batch in iter_batches(doc.data, seq, batch_size=1):
            rows.append((batch.token_ids[0], batch.targets[0], batch.pos_ids[0]))
    return rows


@pytest.mark.parametrize("split", ["bytes", "file"])
def test_corpus_and_raw_files_give_the_contract_rows_of_the_split(corpus, tmp_path, split):
    from soma_models.corpus import prepare
    from soma_models.train.data import open_training_data

    # A file named after a sub-folder's files but walked before them: both orders are by name.
    (corpus / "z.txt").write_text("zebra " * 30)
    prepare([corpus], tmp_path / "c", shard_bytes=500, workers=1)
    expected = _reference_rows(read_documents([corpus]), split, 48)
    for paths in ([corpus], [tmp_path / "c"]):
        data = open_training_data(paths, 0.25, split)
        table = data.table(48)
        assert len(table) == len(expected)
        order = np.random.default_rng(1).permutation(len(table))
        table.prefetch([order[:5], order[5:10]])  # a hint to the kernel: rows unchanged
        batch = table.rows(order)
        for row, index in enumerate(order):
            for got, want in zip((batch.token_ids, batch.targets, batch.pos_ids),
                                 expected[index], strict=True):
                np.testing.assert_array_equal(got[row], want)
        train, val = split_documents(read_documents([corpus]), 0.25, split)
        assert data.split.heldout() == join_documents(val)
        assert data.split.heldout(max_bytes=50) == join_documents(val)[:50]
        assert data.split.train_bytes == sum(len(d.data) for d in train)


def test_permutation_is_a_bijection_for_every_size():
    from soma_models.train.data import permutation

    for size in (1, 2, 3, 7, 64, 65, 1000, 4097):
        order = permutation(np.arange(size), size, seed=3, epoch=1)
        assert sorted(order.tolist()) == list(range(size))
    first = permutation(np.arange(1000), 1000, seed=3, epoch=0)
    assert not np.array_equal(first, permutation(np.arange(1000), 1000, seed=3, epoch=1))
    assert not np.array_equal(first, permutation(np.arange(1000), 1000, seed=4, epoch=0))
    # Shuffled: hardly any position keeps its neighbour.
    assert np.mean(np.abs(np.diff(first)) == 1) < 0.05
    # A slice of a huge domain costs only what is asked for.
    big = permutation(np.arange(10**6, 10**6 + 5), 10**11, seed=0, epoch=0)
    assert big.min() >= 0 and big.max() < 10**11 and len(set(big.tolist())) == 5


def test_stream_state_dict_resumes_and_refuses_another_stream():
    stream = ChunkStream(37, seed=2)
    stream.take(50)
    state = stream.state_dict()
    expected = stream.take(40)
    again = ChunkStream(37, seed=2)
    again.load_state_dict(state)
    np.testing.assert_array_equal(again.take(40), expected)
    with pytest.raises(DataError, match="data position of another stream"):
        ChunkStream(38, seed=2).load_state_dict(state)
    np.testing.assert_array_equal(ChunkStream(5, 0, shuffle=False).take(7), [0, 1, 2, 3, 4, 0, 1])


def test_step_shares_are_disjoint_and_cover_the_step():
    from soma_models.train.data import process_rows, step_share

    step = np.arange(100, 124)
    shares = [step_share(step, rank, 3, 2) for rank in range(3)]
    assert all(len(s) == 4 for s in shares)  # accumulation 4 = 24 / (2 x 3)
    flat = np.concatenate([m for s in shares for m in s])
    assert sorted(flat.tolist()) == step.tolist()
    np.testing.assert_array_equal(shares[1][0], [102, 103])  # micro-batch 1 -> rank 1
    np.testing.assert_array_equal(shares[0][1], [106, 107])  # micro-batch 3 -> rank 0
    blocks = [process_rows(step, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(blocks), step)
    with pytest.raises(ValueError, match="do not split"):
        step_share(step, 0, 5, 2)


def test_raw_files_keep_the_fingerprint_older_checkpoints_recorded(corpus):
    import hashlib

    from soma_models.train.data import open_training_data

    train, _ = split_documents(read_documents([corpus]), 0.2, "file")
    digest = hashlib.blake2b(digest_size=16)  # the trainer's formula before corpora
    for doc in train:
        digest.update(doc.name.encode("utf-8") + b"\0" + len(doc.data).to_bytes(8, "little"))
    assert open_training_data([corpus], 0.2, "file").fingerprint() == digest.hexdigest()
