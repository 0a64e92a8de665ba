"""soma_models.v1.schema: the runtime's key, shape and dtype rules, and read_weights' notes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from soma_models.errors import WeightsError, WeightsWarning
from soma_models.safetensors_io import to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    RUNTIME_DTYPES,
    check_tensors,
    checked_arrays,
    file_metadata,
    param_specs,
    read_weights,
)

CONFIG = ModelConfig(embedding_dim=8, num_heads=2, num_layers=1, pwff_hidden_dim=16)


def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {s.key: rng.standard_normal(s.shape).astype(np.float32) for s in param_specs(CONFIG)}


def found_of(weights: dict[str, np.ndarray], dtype: str = "F32") -> dict:
    return {k: (dtype, v.shape) for k, v in weights.items()}


def test_runtime_dtypes_are_the_specs_list():
    # SPEC §4.2, verbatim.
    assert set(RUNTIME_DTYPES) == {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64",
                                   "U32", "U8", "BOOL"}


def test_check_tensors_converted_and_unmapped():
    found = found_of(arrays())
    found["final_norm.gamma"] = ("BF16", (8,))
    found["extra.flag"] = ("F8_E4M3", (4,))
    check = check_tensors(found, CONFIG)
    assert check.converted == {"final_norm.gamma": "BF16"}
    assert len(check.errors) == 1 and "extra.flag (F8_E4M3)" in check.errors[0]
    assert any("extra.flag" in w for w in check.warnings)  # also unused


def collect(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, WeightsWarning)]


def test_read_weights_converts_with_one_line_per_file():
    weights = arrays()
    weights["final_norm.gamma"] = weights["final_norm.gamma"].astype(np.float64)
    weights["final_norm.beta"] = np.arange(8, dtype=np.int32)
    (config, loaded, _), notes = collect(lambda: read_weights(to_bytes(weights,
                                                                       file_metadata(CONFIG))))
    assert config == CONFIG and len(notes) == 1 and "\n" not in notes[0]
    assert "F64: final_norm.gamma" in notes[0] and "I32: final_norm.beta" in notes[0]
    assert all(a.dtype == np.float32 for a in loaded.values())
    np.testing.assert_array_equal(loaded["final_norm.gamma"],
                                  weights["final_norm.gamma"].astype(np.float32))
    np.testing.assert_array_equal(loaded["final_norm.beta"], np.arange(8, dtype=np.float32))


def test_read_weights_warns_on_heads_contradicting_the_file():
    raw = to_bytes(arrays(), file_metadata(CONFIG))  # records num_heads 2
    other = ModelConfig(embedding_dim=8, num_heads=4, num_layers=1, pwff_hidden_dim=16)
    (config, _, _), notes = collect(lambda: read_weights(raw, other))
    assert config.num_heads == 4
    assert len(notes) == 1 and "records num_heads 2" in notes[0] and "says 4" in notes[0]
    _, notes = collect(lambda: read_weights(raw, CONFIG))
    assert notes == []


def test_read_weights_refuses_unmapped_even_unused():
    weights = arrays()
    weights["unused"] = np.zeros(2, dtype=np.uint16)
    with pytest.raises(WeightsError, match=r"unused \(U16\)"):
        read_weights(to_bytes(weights, file_metadata(CONFIG)))


def test_checked_arrays_converts_like_the_runtime():
    weights = arrays()
    weights["embedding.weight"] = weights["embedding.weight"].astype(np.float64) + 1e-12
    weights["final_norm.gamma"] = np.array([True, False] * 4)
    (_, out), notes = collect(lambda: checked_arrays(weights, CONFIG))
    assert len(notes) == 1 and "BOOL: final_norm.gamma" in notes[0]
    assert out["embedding.weight"].dtype == np.float32
    assert out["final_norm.gamma"].tolist() == [1.0, 0.0] * 4
