"""Canonical weights through the Flax model: round trips, layout, and broken files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tests.v1.test_serde import assert_every_damage_listed, write_damaged_weights

from soma_models.errors import WeightsError, WeightsFormatError
from soma_models.safetensors_io import SafetensorsFile, save_file
from soma_models.v1.configs import ModelConfig
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.serde import canonical_arrays, flax_variable
from soma_models.v1.schema import (
    ARCHITECTURE_VERSION,
    METADATA_HEADS_KEY,
    METADATA_VERSION_KEY,
    expected_shapes,
    param_specs,
)

CONFIG = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4)
TOKENS = np.random.default_rng(0).integers(0, 264, (2, 9))


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(CONFIG, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model: Model, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def _params(model: Model) -> dict:
    return nnx.to_flat_state(nnx.state(model, nnx.Param))


def test_round_trip_is_bit_exact(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    assert path.read_bytes() == model.save_bytes()
    for loaded in (Model.load(path, CONFIG), Model.load_bytes(model.save_bytes())):
        before, after = _params(model), _params(loaded)
        assert [p for p, _ in before] == [p for p, _ in after]
        for (name, a), (_, b) in zip(before, after):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(name))
        assert loaded.config == CONFIG
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer left no temporary behind


def test_file_layout_is_canonical(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    f = SafetensorsFile(path)
    assert {k: t.shape for k, t in f.tensors.items()} == expected_shapes(CONFIG)
    assert all(t.dtype == "F32" for t in f.tensors.values())
    assert f.metadata[METADATA_VERSION_KEY] == str(ARCHITECTURE_VERSION)
    assert f.metadata[METADATA_HEADS_KEY] == str(CONFIG.num_heads)
    # Split-head kernels flatten row-major: output unit h * hd + d of the canonical [in, out].
    query = np.asarray(model.encoder.layers[1].attention.query.kernel[...])   # [D, H, hd]
    w = f.array("encoder.layers.1.attention.query.weight")
    assert query.shape == (16, 4, 4)
    np.testing.assert_array_equal(w[:, 2 * 4 + 3], query[:, 2, 3])
    output = np.asarray(model.encoder.layers[0].attention.output.kernel[...])  # [H, hd, D]
    np.testing.assert_array_equal(f.array("encoder.layers.0.attention.output.weight")[1 * 4 + 2],
                                  output[1, 2])
    np.testing.assert_array_equal(f.array("encoder.layers.0.pwff.linear_inner.weight"),
                                  np.asarray(model.encoder.layers[0].pwff.linear_inner.kernel[...]))
    np.testing.assert_array_equal(f.array("final_norm.gamma"),
                                  np.asarray(model.final_norm.scale[...]))


def test_every_flax_parameter_is_canonical(model: Model) -> None:
    """The key walk reaches every nnx.Param exactly once: nothing is left out of files."""
    reached = {id(flax_variable(model, spec)) for spec in param_specs(CONFIG)}
    all_params = {id(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # to_flat_state gives fresh Variable objects in some versions; compare counts and sizes.
    assert len(reached) == len(param_specs(CONFIG)) == len(all_params)
    total = sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert total == sum(np.prod(a.shape) for a in canonical_arrays(model).values())


def test_loaded_model_computes_the_same(model: Model) -> None:
    loaded = Model.load_bytes(model.save_bytes())
    model.eval()
    loaded.eval()
    np.testing.assert_array_equal(np.asarray(_forward(model, TOKENS)),
                                  np.asarray(_forward(loaded, TOKENS)))


def test_models_loaded_with_the_same_config_share_no_parameter(model: Model) -> None:
    """Loading builds every model from one cached shape-only model: each load must still
    get parameters of its own."""
    arrays = canonical_arrays(model)
    other = {key: value + 1.0 for key, value in arrays.items()}
    first, second = Model.from_arrays(arrays, CONFIG), Model.from_arrays(other, CONFIG)
    for key, value in canonical_arrays(first).items():
        np.testing.assert_array_equal(value, arrays[key])
    for key, value in canonical_arrays(second).items():
        np.testing.assert_array_equal(value, other[key])


def test_heads_come_from_metadata_or_the_explicit_config(tmp_path: Path) -> None:
    config = ModelConfig(embedding_dim=16, pwff_hidden_dim=8, num_layers=1, num_heads=2)
    rng = np.random.default_rng(1)
    arrays = {s.key: rng.standard_normal(s.shape).astype(np.float32) for s in param_specs(config)}
    Model.from_arrays(arrays, num_heads=2).save(tmp_path / "w.safetensors")
    assert Model.load(tmp_path / "w.safetensors").config == config
    assert Model.from_arrays(arrays, num_heads=2).config == config
    assert Model.from_arrays(arrays).config.num_heads == 8  # without metadata: V1's heads
    assert Model.from_arrays(arrays, config).config == config


def test_dropout_model_loads_with_working_rngs(model: Model) -> None:
    """Loading builds the model abstractly; every dropout stream must get real RNG state."""
    config = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4,
                         dropout_rate=0.3)
    loaded = Model.load_bytes(model.save_bytes(), config, rngs=nnx.Rngs(5))
    leaves = jax.tree.leaves(nnx.state(loaded))
    assert not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    streams = [loaded.encoder.layers[0].dropout.rngs, loaded.encoder.layers[1].pwff.dropout.rngs,
               loaded.encoder.layers[1].attention.dropout_rngs]
    keys = [np.asarray(jax.random.key_data(stream())) for stream in streams]
    assert len({k.tobytes() for k in keys}) == len(keys)       # independent streams
    again = Model.load_bytes(model.save_bytes(), config, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(                             # seeded by `rngs`
        np.asarray(jax.random.key_data(again.encoder.layers[0].dropout.rngs())), keys[0])


def test_missing_misshaped_and_wrong_dtype_are_all_listed(model: Model, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    arrays = write_damaged_weights(canonical_arrays(model), path)
    with pytest.raises(WeightsError) as info:
        Model.load(path, CONFIG)
    assert_every_damage_listed(info.value, path)
    with pytest.raises(WeightsError, match="2 missing key"):
        Model.from_arrays(arrays, CONFIG)


def test_incomplete_file_without_config(model: Model, tmp_path: Path) -> None:
    arrays = {k: v for k, v in canonical_arrays(model).items() if "layers.1." not in k}
    arrays.pop("encoder.layers.0.pwff.linear_inner.weight")
    path = tmp_path / "partial.safetensors"
    save_file(path, arrays)
    with pytest.raises(WeightsError, match="cannot infer the model config") as info:
        Model.load(path)
    assert str(path) in str(info.value)


def test_extra_keys_warn(model: Model, tmp_path: Path) -> None:
    arrays = dict(canonical_arrays(model))
    arrays["optimizer.step"] = np.zeros(1, np.float32)
    path = tmp_path / "extra.safetensors"
    save_file(path, arrays)
    with pytest.warns(UserWarning, match="1 unused key\\(s\\).*optimizer.step"):
        loaded = Model.load(path, CONFIG)
    assert loaded.config == CONFIG


def test_truncated_and_damaged_files(model: Model, tmp_path: Path) -> None:
    data = model.save_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:-100])
    with pytest.raises(WeightsFormatError, match="outside the .*data buffer") as info:
        Model.load(path, CONFIG)
    assert str(path) in str(info.value)
    (n,) = struct.unpack("<Q", data[:8])
    damaged = data[:8] + data[8:8 + n].replace(b'"F32"', b'"Q99"', 1) + data[8 + n:]
    with pytest.raises(WeightsFormatError, match="unknown dtype"):
        Model.load_bytes(damaged, CONFIG)
    with pytest.raises(WeightsFormatError, match="header length"):
        Model.load_bytes(b"\xff" * 64, CONFIG)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        Model.load(tmp_path / "nope.safetensors")


def test_failed_save_keeps_the_previous_file(model: Model, tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "w.safetensors"
    model.save(path)
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        Model(CONFIG, rngs=nnx.Rngs(9)).save(path)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
