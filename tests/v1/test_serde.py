"""The framework-free `ModuleSerde`: file format and metadata, whatever the framework."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from soma_models.errors import WeightsError
from soma_models.safetensors_io import SafetensorsFile, save_file
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import METADATA_HEADS_KEY
from soma_models.v1.serde import ModuleSerde


@dataclass
class Block:
    """A stand-in module: its parameters are canonical arrays already."""

    params: dict[str, np.ndarray] = field(default_factory=dict)
    config: object = None


class ArraySerde(ModuleSerde[Block]):
    def _arrays(self):
        return dict(self.module.params)

    def _expected(self):
        return {k: v.shape for k, v in self.module.params.items()}

    def _write(self, arrays):
        self.module.params.update(arrays)


def write_damaged_weights(canonical: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
    """A 2-layer, width-16 model's canonical arrays with two keys missing, one misshaped
    and one of a dtype the runtime does not map, written to `path`; returns them."""
    arrays = dict(canonical)
    del arrays["predictor.bias"]
    del arrays["encoder.layers.1.norm_2.beta"]
    arrays["encoder.layers.0.attention.query.weight"] = np.zeros((16, 8), np.float32)
    arrays["embedding.weight"] = arrays["embedding.weight"].astype(np.uint16)  # unmapped
    save_file(path, arrays)
    return arrays


def assert_every_damage_listed(error: WeightsError, path) -> None:
    """`error`, from loading `write_damaged_weights`' file, names the file and all three
    problems at once."""
    message = str(error)
    assert str(path) in message
    assert "2 missing key(s)" in message and "predictor.bias" in message
    assert "encoder.layers.1.norm_2.beta" in message
    assert ("encoder.layers.0.attention.query.weight: shape mismatch, expected [16, 16], "
            "found [16, 8]") in message
    assert "embedding.weight (U16)" in message and "does not map" in message
    assert len(error.problems) == 3


def block(seed: int, config: object = None) -> Block:
    rng = np.random.default_rng(seed)
    return Block({"norm.gamma": rng.standard_normal(4).astype(np.float32),
                  "linear.weight": rng.standard_normal((4, 3)).astype(np.float32)}, config)


def test_round_trip_through_bytes_and_files(tmp_path):
    source, target = block(0), block(1)
    assert ArraySerde(target).deserialize(ArraySerde(source).serialize()) is target
    for key in source.params:
        np.testing.assert_array_equal(target.params[key], source.params[key])
    path = tmp_path / "block.safetensors"
    ArraySerde(block(2)).serialize_to_file(path)
    ArraySerde(target).deserialize_from_file(path)
    np.testing.assert_array_equal(target.params["norm.gamma"], block(2).params["norm.gamma"])


def test_metadata_only_for_a_whole_model(tmp_path):
    # A block's file carries no metadata; a module holding a ModelConfig records its heads.
    plain, configured = tmp_path / "plain.safetensors", tmp_path / "model.safetensors"
    ArraySerde(block(0)).serialize_to_file(plain)
    ArraySerde(block(0, ModelConfig(embedding_dim=4, num_heads=2))).serialize_to_file(configured)
    assert not SafetensorsFile(plain).metadata
    assert SafetensorsFile(configured).metadata[METADATA_HEADS_KEY] == "2"


def test_a_wrong_shape_is_refused_and_nothing_is_written():
    other = block(0)
    other.params["linear.weight"] = np.zeros((3, 4), np.float32)
    target = block(1)
    before = {k: v.copy() for k, v in target.params.items()}
    with pytest.raises(WeightsError, match="linear.weight"):
        ArraySerde(target).deserialize(ArraySerde(other).serialize())
    for key, value in before.items():
        np.testing.assert_array_equal(target.params[key], value)


def test_a_key_the_module_cannot_place_is_refused_and_nothing_is_written():
    # Not a whole model: every key of the file must land somewhere, or nothing is loaded.
    source, target = block(0), block(1)
    source.params["norm.gamma_extra"] = np.ones(2, np.float32)
    before = {k: v.copy() for k, v in target.params.items()}
    with pytest.raises(WeightsError) as info:
        ArraySerde(target).deserialize(ArraySerde(source).serialize())
    assert info.value.problems == [("1 key(s) the module has no parameter for, so they "
                                    "could not be placed: norm.gamma_extra")]
    for key, value in before.items():
        np.testing.assert_array_equal(target.params[key], value)
