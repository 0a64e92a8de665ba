"""Canonical weights: round trips, layout, and every way a file can be wrong."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.v1.test_serde import assert_every_damage_listed, write_damaged_weights

from soma_models.errors import WeightsError, WeightsFormatError
from soma_models.safetensors_io import SafetensorsFile, save_file, to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import ARCHITECTURE_VERSION, METADATA_VERSION_KEY, expected_shapes
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.serde import canonical_arrays

CONFIG = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4)


@pytest.fixture
def model() -> Model:
    torch.manual_seed(0)
    return Model(CONFIG)


def test_round_trip_is_bit_exact(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    loaded = Model.load(path, CONFIG)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    reloaded = Model.load_bytes(model.save_bytes(), CONFIG)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    assert path.read_bytes() == model.save_bytes()


def test_file_layout_is_canonical(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    f = SafetensorsFile(path)
    assert {k: t.shape for k, t in f.tensors.items()} == expected_shapes(CONFIG)
    assert all(t.dtype == "F32" for t in f.tensors.values())
    assert f.metadata[METADATA_VERSION_KEY] == str(ARCHITECTURE_VERSION)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    assert keys == sorted(keys)
    # Linear weights are [in, out]: y = x @ W + b.
    w = f.array("encoder.layers.0.pwff.linear_inner.weight")
    torch_w = model.encoder.layers[0].pwff.linear_inner.weight.detach().numpy()
    np.testing.assert_array_equal(w, torch_w.T)
    np.testing.assert_array_equal(f.array("final_norm.gamma"),
                                  model.final_norm.weight.detach().numpy())


def test_config_is_inferred_from_the_file(model: Model, tmp_path: Path) -> None:
    model.save(tmp_path / "w.safetensors")
    assert Model.load(tmp_path / "w.safetensors").config == CONFIG


def test_loaded_model_computes_the_same(model: Model, tmp_path: Path) -> None:
    model.save(tmp_path / "w.safetensors")
    loaded = Model.load(tmp_path / "w.safetensors").eval()
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens), loaded(tokens))


def test_missing_and_misshaped_keys_are_all_listed(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    write_damaged_weights(canonical_arrays(model), path)
    with pytest.raises(WeightsError) as info:
        Model.load(path, CONFIG)
    assert_every_damage_listed(info.value, path)


def test_extra_keys_warn(model: Model, tmp_path: Path) -> None:
    arrays = dict(canonical_arrays(model))
    arrays["optimizer.step"] = np.zeros(1, np.float32)
    path = tmp_path / "extra.safetensors"
    save_file(path, arrays)
    with pytest.warns(UserWarning, match="1 unused key\\(s\\).*optimizer.step"):
        Model.load(path, CONFIG)


def test_truncated_file(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    path.write_bytes(model.save_bytes()[:-100])
    with pytest.raises(WeightsFormatError, match="outside the .*data buffer"):
        Model.load(path, CONFIG)


@pytest.mark.parametrize("payload, match", [
    (b"", "empty"),
    (b"\x01\x02", "only 2 bytes"),
    (b"PK\x03\x04" + b"\x00" * 100, "header length"),
    (struct.pack("<Q", 5) + b"{oops", "not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_not_safetensors(tmp_path: Path, payload: bytes, match: str) -> None:
    path = tmp_path / "junk.safetensors"
    path.write_bytes(payload)
    with pytest.raises(WeightsFormatError, match=match) as info:
        Model.load(path, CONFIG)
    assert str(path) in str(info.value)


def test_header_lying_about_sizes(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + b"\x00" * 12
    with pytest.raises(WeightsFormatError) as info:
        SafetensorsFile(data)
    assert "12 bytes for shape [4] F32, expected 16" in str(info.value)


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    with pytest.raises(WeightsFormatError, match="overlaps"):
        SafetensorsFile(struct.pack("<Q", len(raw)) + raw + b"\x00" * 12)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        Model.load(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        Model.load(tmp_path)


def test_failed_save_keeps_the_previous_file(model: Model, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    before = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("soma_models.safetensors_io.os.fsync", explode)
    with torch.no_grad():
        model.predictor.bias.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def test_reader_never_unpickles(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"embedding.weight": [1.0]}))
    with pytest.raises(WeightsFormatError):
        Model.load(path)


def test_bytes_round_trip_through_the_format_layer() -> None:
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = SafetensorsFile(to_bytes(arrays, {"k": "v"}))
    np.testing.assert_array_equal(f.array("x"), arrays["x"])
    assert f.metadata == {"k": "v"}
