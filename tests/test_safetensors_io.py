"""soma_models.safetensors_io: the one header reader, agreeing with the runtime's parser."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from soma_models.errors import WeightsFormatError
from soma_models.safetensors_io import (
    SafetensorsFile,
    bfloat16_to_float32,
    read_header,
    to_bytes,
    to_float32,
)

F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def raw_file(header: str, body_len: int) -> bytes:
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(body_len)


# (name, header JSON text, data buffer length). Text, not dicts: duplicated keys need it.
CASES = [
    ("good", json.dumps({"a": F32x2}), 8),
    ("duplicate key, last entry fits", '{"a":' + json.dumps(F32x2) + ',"a":'
     '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4),
    ("duplicate key, first entry fits", '{"a":' + json.dumps(F32x2) + ',"a":'
     '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 8),
    ("U16 (known to the format)", '{"a":{"dtype":"U16","shape":[2],"data_offsets":[0,4]}}', 4),
    ("BF16", '{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}', 4),
    ("unknown dtype", '{"a":{"dtype":"XX","shape":[2],"data_offsets":[0,4]}}', 4),
    ("non-string dtype", '{"a":{"dtype":["F32"],"shape":[2],"data_offsets":[0,8]}}', 8),
    ("dims overflow", ('{"a":{"dtype":"F32","shape":[9223372036854775808,2],'
     '"data_offsets":[0,8]}}'), 8),
    ("dim >= 2^63 times 0", ('{"a":{"dtype":"F32","shape":[9223372036854775808,0],'
     '"data_offsets":[0,0]}}'), 0),
    ("dim >= 2^64", ('{"a":{"dtype":"F32","shape":[18446744073709551616],'
     '"data_offsets":[0,8]}}'), 8),
    ("byte size overflows", ('{"a":{"dtype":"F64","shape":[2305843009213693952],'
     '"data_offsets":[0,8]}}'), 8),
    ("gap before", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', 12),
    ("trailing bytes", json.dumps({"a": F32x2}), 12),
    ("truncated", json.dumps({"a": F32x2}), 4),
    ("overlap", ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     '"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'), 12),
    ("size mismatch", '{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', 8),
    ("negative dim", '{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', 8),
    ("float dim", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8),
    ("metadata not strings", '{"__metadata__":{"k":1},' + json.dumps({"a": F32x2})[1:], 8),
    ("metadata strings", '{"__metadata__":{"k":"v"},' + json.dumps({"a": F32x2})[1:], 8),
    ("leading space", " " + json.dumps({"a": F32x2}), 8),
    ("unknown field", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', 8),
    ("missing field", '{"a":{"dtype":"F32","shape":[2]}}', 0),
    ("empty", "{}", 0),
    ("NaN literal", '{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', 8),
]


def crate_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="numpy"):
            return True
    except SafetensorError:
        return False


@pytest.mark.parametrize("name, header, body_len", CASES, ids=[c[0] for c in CASES])
def test_accepts_exactly_what_the_crate_accepts(name, header, body_len, tmp_path):
    raw = raw_file(header, body_len)
    path = tmp_path / "case.safetensors"
    path.write_bytes(raw)
    expected = crate_accepts(path)
    for source in (path, raw):
        try:
            problems = SafetensorsFile(source, strict=False).problems
        except WeightsFormatError as exc:
            problems = exc.problems
        assert (problems == []) == expected, (name, problems)
        for problem in problems:  # one line each, no Python repr noise
            assert "\n" not in problem and "unhashable" not in problem
    if not expected:
        with pytest.raises(WeightsFormatError) as exc:
            SafetensorsFile(path)
        assert str(path) in str(exc.value)


def problems_of(header: str, body_len: int) -> list[str]:
    return SafetensorsFile(raw_file(header, body_len), strict=False).problems


def test_problems_name_the_tensor_and_what_was_found():
    [mine, crate] = problems_of(CASES[6][1], 8)
    assert "tensor 'a': dtype must be a string, found ['F32']" == mine
    assert "safetensors parser" in crate
    assert any("tensor 'a'" in p and "overflows" in p for p in problems_of(CASES[7][1], 8))
    assert any("tensor 'a'" in p and "[0, 2^64)" in p for p in problems_of(CASES[9][1], 8))
    assert any("tensor 'b'" in p and "overlaps" in p for p in problems_of(CASES[14][1], 12))
    assert any("tensor 'a': 8 bytes for shape [3] F32, expected 12" in p
               for p in problems_of(CASES[15][1], 8))


def test_every_problem_is_reported_at_once():
    header = json.dumps({"a": {"dtype": 5, "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": "x", "data_offsets": [8, 16]},
                         "c": {"dtype": "F32", "shape": [2], "data_offsets": [99, 107]}})
    problems = problems_of(header, 16)
    assert [p for p in problems if "'a'" in p] and [p for p in problems if "'b'" in p]
    assert [p for p in problems if "'c'" in p and "outside" in p]


def test_duplicated_keys_last_entry_wins():
    weights = SafetensorsFile(raw_file(CASES[1][1], 4))
    assert weights.duplicates == {"a": 2}
    assert weights.tensors["a"].shape == (1,)
    assert SafetensorsFile(raw_file(CASES[0][1], 8)).duplicates == {}


def test_directory_and_missing_paths_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        SafetensorsFile(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        SafetensorsFile(tmp_path / "nope")


def test_read_header_reads_only_the_header(tmp_path):
    raw = to_bytes({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"k": "v"})
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    header, problems = read_header(path)
    assert problems == [] and header.tensors["x"].shape == (2, 3)
    assert header.metadata == {"k": "v"}
    # Through a decoding (here: XOR with a fixed byte, as a stand-in for a stream cipher).
    path.write_bytes(bytes(b ^ 0x5A for b in raw))
    seen = []

    def decode(data: bytes) -> bytes:
        seen.append(len(data))
        return bytes(b ^ 0x5A for b in data)

    header, problems = read_header(path, decode=decode)
    assert problems == [] and header.tensors["x"].shape == (2, 3)
    assert max(seen) < len(raw)  # the data buffer itself was never read
    # A file whose data were cut off: the header no longer matches the file's size.
    path.write_bytes(raw[:-4])
    _, problems = read_header(path)
    assert any("'x'" in p and "outside" in p for p in problems)
    with pytest.raises(WeightsFormatError, match="not a safetensors file"):
        read_header(path, decode=lambda data: bytes(b ^ 0xFF for b in data))


# --------------------------------------------------------------------------- conversions

def test_f64_rounds_to_nearest_even():
    values = np.array([0.1, 1 + 2.0**-24, 1 + 3 * 2.0**-24, -(2.0**-150), 1e39, -1e39, np.nan])
    got = to_float32(values, "F64")
    # Independent: struct's C double -> float conversion rounds to nearest; the overflow
    # case is what IEEE 754 round-to-nearest gives (infinity).
    for value, out in zip(values[:4], got[:4]):
        assert out.tobytes() == struct.pack("<f", value)
    assert got[4] == np.inf and got[5] == -np.inf and np.isnan(got[6])
    assert got.dtype == np.float32


def test_f16_and_bf16_widen_exactly():
    torch = pytest.importorskip("torch")
    source = torch.randn(1000, dtype=torch.float32) * 100
    for name, dtype in (("F16", torch.float16), ("BF16", torch.bfloat16)):
        narrow = source.to(dtype)
        stored = narrow.view(torch.int16).numpy().view("<u2") if name == "BF16" \
            else narrow.numpy()
        np.testing.assert_array_equal(to_float32(stored, name), narrow.float().numpy())
    assert bfloat16_to_float32(np.array([0x3F80, 0xFF80], dtype="<u2")).tolist() == [1.0,
                                                                                     -np.inf]


def test_integers_by_value_and_bool_as_zero_one():
    ints = np.array([0, -7, 2**24 + 1, 2**53, -(2**62)], dtype="<i8")
    assert to_float32(ints, "I64").tolist() == [float(np.float32(float(v))) for v in
                                                 [0, -7, 2**24, 2**53, -(2**62)]]
    assert to_float32(np.array([0, 255], dtype="u1"), "U8").tolist() == [0.0, 255.0]
    assert to_float32(np.array([0, 1, 2], dtype="u1"), "BOOL").tolist() == [0.0, 1.0, 1.0]


def test_float32_view_is_zero_copy(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(to_bytes({"x": np.arange(4, dtype=np.float32)}))
    weights = SafetensorsFile(path)
    assert np.shares_memory(weights.float32("x"), weights.storage("x"))
