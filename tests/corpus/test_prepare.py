"""`prepare`: every input kind, document order, the manifest, whole-or-nothing output and
the one-line errors of bad input (the reader's own checks are in test_layout.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soma_models.cli import main
from soma_models.corpus import Corpus, CorpusError, prepare
from soma_models.corpus.inputs import name_key, row_keys
from soma_models.corpus.layout import MANIFEST

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def documents(corpus: Corpus) -> list[bytes]:
    return [corpus.document(i).tobytes() for i in range(len(corpus))]


def write_inputs(root: Path) -> list[bytes]:
    """Raw files, a JSONL file and a Parquet file; returns the documents in corpus order."""
    (root / "raw" / "sub").mkdir(parents=True)
    (root / "raw" / "a.txt").write_bytes(b"alpha\n")
    (root / "raw" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    (root / "raw" / "empty").write_bytes(b"")
    (root / "raw" / ".hidden").write_bytes(b"never")
    lines = [{"text": f"line {i} \u00e9\u4e16", "id": i} for i in range(7)]
    with open(root / "raw" / "c.jsonl", "w") as fh:
        for i, line in enumerate(lines):
            fh.write(json.dumps(line) + "\n" + ("\n" if i == 2 else ""))  # a blank line too
    texts = [f"row {i}" for i in range(11)] + [""]
    blobs = [bytes([i]) * (i + 1) for i in range(12)]
    pq.write_table(pa.table({"text": texts, "blob": blobs}), root / "t.parquet",
                   row_group_size=4)
    return ([b"alpha\n"] + [line["text"].encode() for line in lines] + [bytes(range(256))]
            + [t.encode() for t in texts if t])


@pytest.mark.parametrize("workers,shard_bytes", [(1, 1 << 20), (2, 8)])
def test_every_input_kind_in_order_whatever_the_sharding(tmp_path, workers, shard_bytes):
    expected = write_inputs(tmp_path)
    result = prepare([tmp_path / "raw", tmp_path / "t.parquet"], tmp_path / "corpus",
                     workers=workers, shard_bytes=shard_bytes)
    corpus = Corpus(tmp_path / "corpus")
    corpus.verify()
    assert documents(corpus) == expected
    assert (result.documents, result.bytes) == (len(expected), sum(map(len, expected)))
    assert result.empty_skipped == 2  # the empty raw file and the empty Parquet row
    manifest = json.loads((tmp_path / "corpus" / MANIFEST).read_text())
    assert manifest["documents"] == len(expected)
    assert [s["inputs"] for s in manifest["sources"]] == [{"raw": 3, "jsonl": 1},
                                                          {"parquet": 1}]
    assert sum(s["documents"] for s in manifest["shards"]) == len(expected)
    # Split keys: a raw file's is the hash of its relative name (as the trainer has always
    # used); rows mix their file's key with their row (line) number.
    keys = corpus.keys(0, len(corpus))
    assert keys[0] == name_key("raw/a.txt")
    assert keys[8] == name_key("raw/sub/b.bin")
    np.testing.assert_array_equal(keys[1:4], row_keys(name_key("raw/c.jsonl"), 0, 3))
    assert keys[4] == row_keys(name_key("raw/c.jsonl"), 4, 1)[0]  # line 4 is blank
    np.testing.assert_array_equal(keys[9:], row_keys(name_key("t.parquet"), 0, 11))
    np.testing.assert_array_equal(corpus.sizes(0, len(corpus)), list(map(len, expected)))


def test_binary_parquet_column_is_taken_as_it_is(tmp_path):
    write_inputs(tmp_path)
    prepare([tmp_path / "t.parquet"], tmp_path / "c", column="blob", workers=1)
    assert documents(Corpus(tmp_path / "c")) == [bytes([i]) * (i + 1) for i in range(12)]


def test_a_datasets_folder_is_read_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"document {i}" * (i % 3 + 1) for i in range(25)]
    datasets.Dataset.from_dict({"text": texts, "n": list(range(25))}).save_to_disk(
        str(tmp_path / "ds"))
    prepare([tmp_path / "ds"], tmp_path / "c", shard_bytes=64, workers=2)
    corpus = Corpus(tmp_path / "c")
    assert documents(corpus) == [t.encode() for t in texts]
    np.testing.assert_array_equal(corpus.keys(0, 25), row_keys(name_key("ds"), 0, 25))
    with pytest.raises(CorpusError, match=r"ds: no column 'body' \(columns: 'text', 'n'\)"):
        prepare([tmp_path / "ds"], tmp_path / "d", column="body")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match="DatasetDict.*give one split's folder"):
        prepare([tmp_path / "dd"], tmp_path / "d")


@pytest.mark.parametrize("content,message", [
    ('{"body": "x"}\n', r"c.jsonl:1: no field 'text' \(fields: 'body'\); pass --text-field"),
    ('{"text": "x"}\n{"text": 5}\n', r"c.jsonl:2: field 'text' is int, expected a string"),
    ('{"text": null}\n', r"c.jsonl:1: field 'text' is null"),
    ('{"text": "x"}\n{"text": \n', r"c.jsonl:2: not JSON"),
    ('["text"]\n', r"c.jsonl:1: a JSON list, expected an object with field 'text'"),
])
def test_bad_jsonl_is_one_line_and_writes_nothing(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=message) as info:
        prepare([tmp_path / "c.jsonl"], tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]  # no output, no temporary left


def test_bad_parquet_is_one_line_and_writes_nothing(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}), tmp_path / "p.parquet")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 not really")
    cases = [(["p.parquet"], {}, r"p.parquet: row 1: column 'text' is null"),
             (["p.parquet"], {"column": "n"}, r"p.parquet: column 'n' holds int64, expected "
                                              r"strings or bytes"),
             (["p.parquet"], {"column": "z"}, r"no column 'z' \(columns: 'text', 'n'\)"),
             (["x.parquet"], {}, r"x.parquet: not a readable Parquet file")]
    for names, options, message in cases:
        with pytest.raises(CorpusError, match=message):
            prepare([tmp_path / n for n in names], tmp_path / "out", **options)
        assert sorted(os.listdir(tmp_path)) == ["p.parquet", "x.parquet"]


def test_empty_inputs_and_missing_paths(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "zero").write_bytes(b"")
    with pytest.raises(CorpusError, match=r"no documents \(1 input\(s\), every document empty"):
        prepare([tmp_path / "e"], tmp_path / "out")
    with pytest.raises(CorpusError, match="missing: no such file or folder"):
        prepare([tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path):
    write_inputs(tmp_path)
    prepare([tmp_path / "t.parquet"], tmp_path / "c")
    with pytest.raises(CorpusError, match="already holds a corpus; pass --overwrite"):
        prepare([tmp_path / "raw"], tmp_path / "c")
    prepare([tmp_path / "raw"], tmp_path / "c", overwrite=True)
    assert len(Corpus(tmp_path / "c")) == 9


def test_cli_prepare_prints_a_summary_and_one_line_errors(tmp_path, capsys):
    write_inputs(tmp_path)
    assert main(["prepare", str(tmp_path / "raw"), "-o", str(tmp_path / "c"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["documents"] == 9 and summary["shards"] == 3  # raw, jsonl, raw
    assert main(["prepare", str(tmp_path / "t.parquet"), "-o", str(tmp_path / "d"),
                 "--column", "n"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.parquet: no column 'n'" in err


KILLED_PREPARE = """
import sys, time
from soma_models.corpus import inputs, prepare
slow = inputs.read_raw
def read_raw(source, sink):
    slow(source, sink)
    print("wrote", source.name, flush=True)
    time.sleep(60)
inputs.read_raw = read_raw
prepare([sys.argv[1]], sys.argv[2], workers=1)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_prepare_leaves_no_corpus_and_a_rerun_starts_over(tmp_path, signum):
    write_inputs(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    child = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(tmp_path / "raw"),
                              str(tmp_path / "c")], stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout.readline().startswith("wrote")  # mid-way: one shard written
    child.send_signal(signum)
    child.wait(timeout=30)
    child.stdout.close()
    assert not (tmp_path / "c").exists()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".c.")]
    assert bool(left) == (signum == signal.SIGKILL)  # SIGKILL cannot be caught
    prepare([tmp_path / "raw"], tmp_path / "c")      # the rerun removes the dead one's folder
    assert len(Corpus(tmp_path / "c")) == 9
    assert [n for n in os.listdir(tmp_path) if n.startswith(".c.")] == []
