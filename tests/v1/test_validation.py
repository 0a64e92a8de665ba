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
