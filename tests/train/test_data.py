import numpy as np
import pytest

from soma_models.train.data import (
    ChunkStream,
    ChunkTable,
    DataError,
    Document,
    find_files,
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
