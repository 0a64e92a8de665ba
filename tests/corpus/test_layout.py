"""Opening a corpus: the checks of damaged, truncated and foreign corpora, and
`open_documents`' choice between a corpus and raw files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from soma_models.corpus import Corpus, CorpusError, prepare
from soma_models.corpus.documents import RawFiles, open_documents
from soma_models.corpus.layout import MANIFEST, shard_path


@pytest.fixture
def corpus_folder(tmp_path):
    (tmp_path / "raw").mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        (tmp_path / "raw" / f"f{i}").write_bytes(rng.integers(0, 256, 100 + 37 * i,
                                                              dtype=np.uint8).tobytes())
    prepare([tmp_path / "raw"], tmp_path / "c", shard_bytes=300, workers=1)
    return tmp_path / "c"


def test_documents_are_views_of_the_shards(corpus_folder):
    corpus = Corpus(corpus_folder)
    assert len(corpus.shards) == 3 and len(corpus) == 6
    raw = RawFiles([corpus_folder.parent / "raw"])
    for i in range(6):
        view = corpus.document(i)
        assert not view.flags.owndata and not view.flags.writeable  # a view of the map
        np.testing.assert_array_equal(corpus.document(i), raw.document(i))
    np.testing.assert_array_equal(corpus.keys(1, 5), raw.keys(1, 5))
    np.testing.assert_array_equal(corpus.sizes(0, 6), raw.sizes(0, 6))
    with pytest.raises(IndexError):
        corpus.document(6)


def test_a_truncated_shard_is_refused_at_open(corpus_folder):
    path = shard_path(corpus_folder, 1, "bin")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CorpusError, match=r"shard-00001.bin: \d+ bytes, the manifest says \d+ "
                                          r"\(truncated or corrupt"):
        Corpus(corpus_folder)


def test_a_corrupt_index_is_refused_at_open_and_corrupt_bytes_by_verify(corpus_folder):
    corpus = Corpus(corpus_folder)
    corpus.verify()
    bin_path = shard_path(corpus_folder, 0, "bin")
    data = bytearray(bin_path.read_bytes())
    data[5] ^= 1
    bin_path.write_bytes(bytes(data))
    Corpus(corpus_folder)  # same size: open does not read the document bytes
    with pytest.raises(CorpusError, match="shard-00000.bin: its SHA-256 does not match"):
        Corpus(corpus_folder).verify()
    idx = shard_path(corpus_folder, 2, "idx")
    offsets = np.fromfile(idx, "<i8")
    offsets[1] += 1
    offsets.tofile(idx)
    with pytest.raises(CorpusError, match="shard-00002.idx: its SHA-256 does not match"):
        Corpus(corpus_folder)


def test_missing_files_other_versions_and_non_corpora(corpus_folder, tmp_path):
    shard_path(corpus_folder, 2, "key").unlink()
    with pytest.raises(CorpusError, match="shard-00002.key: missing"):
        Corpus(corpus_folder)
    manifest = json.loads((corpus_folder / MANIFEST).read_text())
    manifest["layout_version"] = 2
    (corpus_folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match="layout version 2, this soma-models reads version 1;"
                                          " prepare the corpus again"):
        Corpus(corpus_folder)
    with pytest.raises(CorpusError, match="not a corpus .no soma-corpus.json.; make one with"):
        Corpus(tmp_path / "raw")


def test_open_documents_takes_a_corpus_alone_or_raw_files(corpus_folder, tmp_path):
    assert isinstance(open_documents([corpus_folder]), Corpus)
    assert isinstance(open_documents([tmp_path / "raw"]), RawFiles)
    with pytest.raises(CorpusError, match="a prepared corpus must be the only data path"):
        open_documents([corpus_folder, tmp_path / "raw"])
