"""soma_models.v1.inputs: one reader for data files, target embeddings and keys, used by
the CLI and by screening."""

from __future__ import annotations

import json

import base58
import numpy as np
import pytest

from soma_models.v1.inputs import (
    finite_or_none,
    keys_for,
    load_targets,
    map_file,
    parse_key_arg,
    parse_target,
    read_data,
)

ROWS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]


def write(path, text):
    path.write_text(text)
    return path


def test_read_data_maps_the_file_and_refuses_missing_or_empty(tmp_path):
    data = tmp_path / "d.bin"
    data.write_bytes(b"abc")
    view = read_data(str(data))
    assert isinstance(view, memoryview) and view.readonly and bytes(view) == b"abc"
    with pytest.raises(FileNotFoundError, match=r"^--data .*nope: no such data file$"):
        read_data(str(tmp_path / "nope"))
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="e.bin: data is empty: the runtime refuses it"):
        read_data(str(tmp_path / "e.bin"))
    with pytest.raises(ValueError, match="e.bin: file is empty"):
        map_file(tmp_path / "e.bin")


@pytest.mark.parametrize("form", ["npy", "json", "numbers"])
def test_one_target_in_every_format_reads_the_same_everywhere(tmp_path, form):
    """A one-target file works for `score --target` and `screen --targets` alike."""
    vector = np.array(ROWS[1], dtype=np.float32)
    if form == "npy":
        path = tmp_path / "t.npy"
        np.save(path, vector)
    elif form == "json":
        path = write(tmp_path / "t.json", json.dumps(ROWS[1:]))  # a list of one list
    else:
        path = write(tmp_path / "t.txt", "4, 5\n6.5\n")          # any separators, any lines
    np.testing.assert_array_equal(parse_target(str(path)), vector)
    np.testing.assert_array_equal(load_targets(path), vector[None, :])
    assert load_targets(path).dtype == parse_target(str(path)).dtype == np.float32


def test_several_targets_and_the_inline_form(tmp_path):
    np.testing.assert_array_equal(load_targets(write(tmp_path / "t.json", json.dumps(ROWS))),
                                  ROWS)
    np.save(tmp_path / "t.npy", np.array(ROWS))
    np.testing.assert_array_equal(load_targets(tmp_path / "t.npy"), ROWS)
    np.testing.assert_array_equal(parse_target("1,2,3"), [1, 2, 3])
    np.testing.assert_array_equal(parse_target("0.5"), [0.5])
    with pytest.raises(ValueError, match="must be a non-empty vector, got shape \\[2, 3\\]"):
        parse_target(str(tmp_path / "t.npy"))  # two targets where one is expected


def test_bad_targets_are_one_line_naming_the_file(tmp_path):
    ragged = write(tmp_path / "ragged.json", "[[1, 2], [3]]")
    with pytest.raises(ValueError, match="ragged.json: targets must be a .npy array or a JSON "
                                         "list of lists of numbers, all of the same length$"):
        load_targets(ragged)
    with pytest.raises(ValueError, match=r"^--target .*ragged.json: not a JSON list of numbers$"):
        parse_target(str(ragged))
    words = write(tmp_path / "words.txt", "one two")
    with pytest.raises(ValueError, match="words.txt: targets must be .* or numbers separated"):
        load_targets(words)
    with pytest.raises(ValueError, match="words.txt: not a list of numbers$"):
        parse_target(str(words))
    with pytest.raises(ValueError, match="'nope': no such file, and not a comma-separated list"):
        parse_target("nope")
    with pytest.raises(ValueError, match="is a directory, expected a file or a list"):
        parse_target(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.npy: no such targets file"):
        load_targets(tmp_path / "nope.npy")
    np.save(tmp_path / "c.npy", np.array([1j, 2j]))
    with pytest.raises(ValueError, match="c.npy: targets must be real numbers, got dtype"):
        load_targets(tmp_path / "c.npy")
    with pytest.raises(ValueError, match="targets must be \\[n, embedding_dim\\] with n >= 1"):
        load_targets(write(tmp_path / "empty.json", "[]"))


def test_keys_stay_bytes():
    raw = bytes(range(32))
    assert parse_key_arg(raw.hex()) == parse_key_arg(base58.b58encode(raw).decode()) == raw
    assert parse_key_arg(None) is None
    assert keys_for(["a", "b", "c"], [raw.hex(), "none", "-"]) == [raw, None, None]
    assert keys_for(["a"], None) == [None]
    with pytest.raises(ValueError, match="got 1 --key for 2 weights file"):
        keys_for(["a", "b"], [raw.hex()])
    with pytest.raises(ValueError, match="^--key #2: decryption key"):
        keys_for(["a", "b"], ["none", "xyz"])


def test_finite_or_none_is_json_safe():
    assert [finite_or_none(x) for x in (1.5, np.float32(2), float("nan"), float("inf"), None)] \
        == [1.5, 2.0, None, None, None]
    assert isinstance(finite_or_none(np.float32(2)), float)
