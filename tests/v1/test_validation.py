"""validate(): every problem a weights file can have, each from a crafted file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from soma_models.safetensors_io import to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import file_metadata, param_specs
from soma_models.v1.transit import encrypt_weights
from soma_models.v1.validation import (
    Report,
    array_chunks,
    count_non_finite,
    file_chunks,
    validate,
)

CONFIG = ModelConfig(embedding_dim=8, num_heads=2, num_layers=1, pwff_hidden_dim=16)


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {s.key: rng.standard_normal(s.shape).astype(np.float32) for s in param_specs(CONFIG)}


def good_bytes() -> bytes:
    return to_bytes(arrays(), file_metadata(CONFIG))


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, body: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def check(raw: bytes, tmp_path, **kwargs) -> Report:
    """Validate both from bytes and from a file; the findings must agree."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    from_file = validate(path, **kwargs)
    from_bytes = validate(raw, **kwargs)
    assert (from_file.errors, from_file.warnings) == (from_bytes.errors, from_bytes.warnings)
    assert str(from_file).startswith(str(path))
    return from_file


def test_good_file_is_ok(tmp_path):
    report = check(good_bytes(), tmp_path)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.config == CONFIG
    assert "OK" in str(report)


@pytest.mark.parametrize("raw, message", [
    (b"", "empty"),
    (b"\x01\x02", "only 2 bytes"),
    (b"hello world, not weights", "does not fit"),
    (struct.pack("<Q", 5) + b"{bad}" + b"\0" * 8, "not JSON"),
])
def test_not_a_safetensors_file(raw, message, tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    report = validate(path)
    assert not report.ok and message in report.errors[0]


def test_missing_file():
    report = validate("/nonexistent/w.safetensors")
    assert not report.ok and "no such weights file" in report.errors[0]


def test_header_lying_about_offsets(tmp_path):
    header, body = split(good_bytes())
    header["final_norm.gamma"]["data_offsets"] = [len(body) - 4, len(body) + 28]
    report = check(join(header, body), tmp_path)
    assert not report.ok
    assert any("final_norm.gamma" in e and "outside" in e for e in report.errors)


def test_truncated_file(tmp_path):
    report = check(good_bytes()[:-100], tmp_path)
    assert not report.ok and any("outside" in e for e in report.errors)


def test_missing_keys_wrong_shapes_dtypes_and_extras_all_reported(tmp_path):
    weights = arrays()
    del weights["predictor.bias"]
    weights["final_norm.beta"] = np.zeros(9, dtype=np.float32)
    weights["encoder.layers.0.norm_1.gamma"] = weights["encoder.layers.0.norm_1.gamma"].astype(
        np.float64)
    weights["optimizer.step"] = np.zeros(1, dtype=np.float32)
    report = check(to_bytes(weights, file_metadata(CONFIG)), tmp_path)
    assert not report.ok
    text = str(report)
    assert any("missing" in e and "predictor.bias" in e for e in report.errors)
    assert any("final_norm.beta" in e and "[8]" in e and "[9]" in e for e in report.errors)
    # Another dtype the runtime maps is not refused: it is converted (a caveat).
    assert not any("norm_1.gamma" in e for e in report.errors)
    assert any("norm_1.gamma" in c and "F64" in c and "converted" in c for c in report.caveats)
    assert any("optimizer.step" in w for w in report.warnings)
    for problem in report.errors + report.caveats + report.warnings:
        assert problem in text


def test_extra_keys_are_only_a_warning(tmp_path):
    weights = arrays()
    weights["notes"] = np.ones(3, dtype=np.float32)
    report = check(to_bytes(weights, file_metadata(CONFIG)), tmp_path)
    assert report.ok and len(report.warnings) == 1 and "unused" in report.warnings[0]


def test_nan_and_inf_values_are_found(tmp_path):
    weights = arrays()
    weights["encoder.layers.0.pwff.linear_inner.weight"][3, 5] = np.nan
    weights["encoder.layers.0.pwff.linear_inner.weight"][6, 1] = np.inf
    weights["embedding.weight"][200, 2] = -np.inf
    report = check(to_bytes(weights, file_metadata(CONFIG)), tmp_path)
    # The runtime accepts the file; its loss is NaN: a caveat, not a refusal.
    assert report.ok and not report.clean and report.non_finite == 3
    assert any(c.startswith("encoder.layers.0.pwff.linear_inner.weight: 2 NaN/Inf value(s) "
                            "(as float32), first at index [3, 5]") for c in report.caveats)
    assert any(c.startswith("embedding.weight: 1 NaN/Inf value(s) (as float32), first at index "
                            "[200, 2]") for c in report.caveats)
    assert "loss will be NaN" in str(report)


def test_chunked_scan_counts_across_chunks(tmp_path):
    values = np.zeros(1000, dtype=np.float32)
    values[[7, 500, 999]] = [np.nan, np.inf, -np.inf]
    path = tmp_path / "values"
    path.write_bytes(b"head" + values.tobytes())
    for chunk in (1, 3, 64, 10_000):
        assert count_non_finite(array_chunks(values.reshape(10, 100), chunk)) == (3, 7)
        with open(path, "rb") as fh:
            chunks = file_chunks(fh, 4, 1000, np.dtype("<f4"), chunk)
            assert count_non_finite(chunks) == (3, 7)
    assert count_non_finite(array_chunks(np.ones(5, np.float32))) == (0, -1)


def test_explicit_config_that_does_not_match(tmp_path):
    other = ModelConfig(embedding_dim=8, num_heads=2, num_layers=2, pwff_hidden_dim=16)
    report = check(good_bytes(), tmp_path, model_config=other)
    assert not report.ok and any("missing" in e and "layers.1" in e for e in report.errors)


def test_vocabulary_too_small_for_the_contract(tmp_path):
    small = ModelConfig(embedding_dim=8, num_heads=2, num_layers=1, pwff_hidden_dim=16,
                        vocab_size=200)
    rng = np.random.default_rng(0)
    weights = {s.key: rng.standard_normal(s.shape).astype(np.float32)
               for s in param_specs(small)}
    report = check(to_bytes(weights, file_metadata(small)), tmp_path)
    assert not report.ok and any("vocab_size 200" in e for e in report.errors)


def test_encrypted_weights(tmp_path):
    encrypted, key = encrypt_weights(good_bytes())
    assert check(encrypted, tmp_path, key=key).ok
    wrong = check(encrypted, tmp_path, key="11" * 32)
    assert not wrong.ok and "wrong decryption key" in wrong.errors[0]
    assert not validate(encrypted).ok


# --------------------------------------------------------------------------- the runtime's rules

def test_unmapped_dtype_anywhere_is_refused(tmp_path):
    weights = arrays()
    weights["unused.counter"] = np.zeros(3, dtype=np.uint16)  # U16: not mapped by the runtime
    report = check(to_bytes(weights, file_metadata(CONFIG)), tmp_path)
    assert not report.ok
    assert any("unused.counter (U16)" in e and "does not map" in e for e in report.errors)


@pytest.mark.parametrize("dtype, name", [(np.float16, "F16"), (np.int8, "I8"), (np.bool_, "BOOL")])
def test_converted_dtypes_are_accepted_with_a_caveat(dtype, name, tmp_path):
    weights = arrays()
    weights["final_norm.gamma"] = weights["final_norm.gamma"].astype(dtype)
    report = check(to_bytes(weights, file_metadata(CONFIG)), tmp_path)
    assert report.ok and not report.clean and report.non_finite == 0
    [caveat] = report.caveats
    assert "final_norm.gamma" in caveat and name in caveat and "converted to float32" in caveat


def test_bf16_values_beyond_range_are_scanned_after_conversion(tmp_path):
    header, body = split(good_bytes())
    entry = header["final_norm.beta"]
    begin = entry["data_offsets"][0]
    values = np.full(8, 0x7FC0, dtype="<u2")  # bfloat16 NaN bit patterns
    # Re-encode final_norm.beta as BF16 at the end of the buffer: 16 bytes instead of 32.
    entry.update(dtype="BF16", data_offsets=[begin, begin + 16])
    body = body[:begin] + values.tobytes() + body[begin + 32:]
    for other in header.values():
        if isinstance(other, dict) and "data_offsets" in other and other is not entry \
                and other["data_offsets"][0] > begin:
            other["data_offsets"] = [o - 16 for o in other["data_offsets"]]
    report = check(join(header, body), tmp_path)
    assert report.ok and report.non_finite == 8
    assert any(c.startswith("final_norm.beta: 8 NaN/Inf") for c in report.caveats)


def test_duplicated_key_is_a_warning_and_last_entry_wins(tmp_path):
    raw = good_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8:8 + n].decode().rstrip()
    first = json.loads(text)
    # Repeat one entry verbatim at the end of the header: the runtime takes the last one.
    extra = f',"predictor.bias":{json.dumps(first["predictor.bias"])}}}'
    doubled = (text[:-1] + extra).encode()
    report = check(struct.pack("<Q", len(doubled)) + doubled + raw[8 + n:], tmp_path)
    assert report.ok
    assert any("duplicated" in w and "'predictor.bias' x2" in w for w in report.warnings)


def write_full_width(path, num_layers: int) -> None:
    """A full-width V1 layout with `num_layers` layers, as a sparse U8 file: the header is
    real, the data a hole (U8 values are never scanned), so a 1.6 GB layout costs nothing."""
    from soma_models.v1.configs import ModelConfig

    config = ModelConfig(num_layers=num_layers)  # full width: the V1 defaults
    header, offset = {}, 0
    for spec in param_specs(config):
        size = int(np.prod(spec.shape))
        header[spec.key] = {"dtype": "U8", "shape": list(spec.shape),
                            "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)) + encoded)
        fh.truncate(8 + len(encoded) + offset)


@pytest.mark.parametrize("protocol, runtime_layers", [("0.1.7", 24), ("0.1.1", 32)])
def test_layer_count_against_the_revision(protocol, runtime_layers, tmp_path):
    fewer, exact, more = tmp_path / "fewer", tmp_path / "exact", tmp_path / "more"
    write_full_width(fewer, 12)
    write_full_width(exact, runtime_layers)
    write_full_width(more, 33)
    report = validate(fewer, protocol=protocol)
    assert not report.ok and report.network_width and report.protocol == protocol
    assert any(f"12 layer(s), but revision {protocol}'s runtime needs {runtime_layers}" in e
               for e in report.errors)
    report = validate(exact, protocol=protocol)
    assert report.ok and not any("ignores layers" in c for c in report.caveats)
    assert f"accepted by the runtime of revision {protocol}" in str(report)
    report = validate(more, protocol=protocol)
    assert report.ok
    assert any(f"ignores layers {runtime_layers} to 32" in c for c in report.caveats)


def test_default_and_unknown_protocol(tmp_path):
    from soma_models.v1.revisions import UnknownProtocolError, resolve

    assert validate(good_bytes()).protocol == resolve().name
    assert validate(good_bytes(), protocol="latest").protocol == "0.1.7"
    with pytest.raises(UnknownProtocolError, match="known: 0.1.1, 0.1.7, latest"):
        validate(good_bytes(), protocol="0.2")


def test_explicit_config_contradicting_recorded_heads_is_a_warning(tmp_path):
    other_heads = ModelConfig(embedding_dim=8, num_heads=4, num_layers=1, pwff_hidden_dim=16)
    report = check(good_bytes(), tmp_path, model_config=other_heads)
    assert report.ok
    assert any("records num_heads 2" in w and "says 4" in w for w in report.warnings)


def test_small_width_is_checked_against_its_own_layout(tmp_path):
    report = check(good_bytes(), tmp_path)
    assert report.ok and not report.network_width
    assert "OK for its own layout" in str(report) and "which its runtime requires" in str(report)
