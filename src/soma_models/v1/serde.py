"""The 0.1.x `Serde` interface, written once: canonical safetensors for one module.

A framework's `Serde` (`soma_models.v1.torch.serde`, `soma_models.v1.flax.serde`) says how
to read its module's tensors as canonical arrays (`_arrays`), what it expects of a file
(`_expected`), how to write checked arrays back in place (`_write`) and how a whole model
becomes the model of a file of other sizes (`_become`). The public methods, the file
format, the metadata rule and the loading rules live here, framework-free.

Loading rules (`deserialize`, `deserialize_from_file`): every key of the file goes into
the module, or nothing does.

* Any module: a file whose keys and shapes are the module's is written into it in place.
  Otherwise one `WeightsError` names every problem at once: missing keys, shape
  mismatches, and each key the module has no tensor for ("could not be placed").
* A whole V1 model (its `config` is a `ModelConfig` and its keys are that config's
  schema): a file holding a complete V1 model of other sizes (vocabulary, width, depth,
  hidden size) is adopted, as the published Flax `Serde` does: the module takes the
  file's sizes and weights (`config` included, so `encode`/`predict` run on the file's
  model), with one warning naming the keys whose shape changed. Keys the runtime ignores
  are a warning here, as when scoring.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace
from typing import Generic, TypeVar

import numpy as np

from soma_models.errors import WeightsError, WeightsWarning
from soma_models.safetensors_io import SafetensorsFile, save_file, to_bytes
from soma_models.v1.configs import V1_NUM_HEADS, ModelConfig
from soma_models.v1.schema import (
    METADATA_HEADS_KEY,
    expected_shapes,
    file_metadata,
    infer_config,
    read_tensors,
    read_weights,
)

M = TypeVar("M")
Source = str | os.PathLike | bytes | bytearray | memoryview

_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
_SIZES = ("vocab_size", "embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim")


class ModuleSerde(Generic[M]):
    """Canonical safetensors for `module` (a `Model`, or any block of one, or any module
    of the framework), keys relative to that module.

    `deserialize` writes the file's tensors into `module` in place and returns it (see the
    module docstring for what happens when they do not fit). A whole model's file carries
    its config in the metadata; any other module's carries none.
    """

    def __init__(self, module: M):
        self.module = module

    # --- what a framework supplies ----------------------------------------------------

    def _arrays(self) -> dict[str, np.ndarray]:
        """The module's tensors as canonical float32 arrays, by canonical key."""
        raise NotImplementedError

    def _expected(self) -> dict[str, tuple[int, ...]]:
        """`{canonical key: canonical shape}` of every tensor the module holds."""
        raise NotImplementedError

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        """Write checked canonical arrays (exactly `_expected`'s keys and shapes) in place."""
        raise NotImplementedError

    def _become(self, arrays: dict[str, np.ndarray], config: ModelConfig) -> None:
        """Make the whole model the model of `config` with `arrays` as its weights
        (checked canonical arrays of that config's schema), in place."""
        raise NotImplementedError

    # --- the rules, once ---------------------------------------------------------------

    def _model_config(self) -> ModelConfig | None:
        """The module's `ModelConfig` when it is a whole V1 model (its tensors are exactly
        that config's schema), else None."""
        config = getattr(self.module, "config", None)
        if isinstance(config, ModelConfig) and self._expected() == expected_shapes(config):
            return config
        return None

    def _metadata(self) -> dict[str, str] | None:
        config = getattr(self.module, "config", None)
        return file_metadata(config) if isinstance(config, ModelConfig) else None

    def _read(self, source: Source) -> M:
        expected = self._expected()
        config = self._model_config()
        try:
            arrays, _ = read_tensors(source, expected, place_all=config is None)
        except WeightsError:
            if config is None or not self._adopt_other_sizes(source, config):
                raise
            return self.module
        self._write(arrays)
        return self.module

    def _adopt_other_sizes(self, source: Source, current: ModelConfig) -> bool:
        """If `source` holds a complete V1 model of other sizes, make the module that
        model (one warning) and return True; else False (the caller reports why)."""
        try:
            header = SafetensorsFile(source)
            shapes = {key: tuple(info.shape) for key, info in header.tensors.items()}
            config = infer_config(shapes, source=header.name,
                                  num_heads=_heads_for(header.metadata, shapes, current),
                                  dropout_rate=current.dropout_rate,
                                  max_wavelength=current.max_wavelength,
                                  scale_factor=current.scale_factor)
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                config, arrays, name = read_weights(source, config)
        except (WeightsError, OSError):
            return False
        old = expected_shapes(current)
        changed = _grouped([key for key, shape in expected_shapes(config).items()
                            if key in old and old[key] != shape],
                           min(current.num_layers, config.num_layers))
        sizes = ", ".join(f"{field} {getattr(current, field)} -> {getattr(config, field)}"
                          for field in _SIZES if getattr(current, field) != getattr(config, field))
        self._become(arrays, config)
        warnings.warn(f"{name}: holds a V1 model of other sizes than the module ({sizes}); "
                      f"the module now has the file's sizes and weights; shape changed: "
                      f"{', '.join(changed) or 'none'}",
                      WeightsWarning, stacklevel=4)
        for note in notes:  # the file's own notes (unused keys, conversions), after ours
            warnings.warn(note.message, note.category, stacklevel=4)
        return True

    # --- the published methods ---------------------------------------------------------

    def serialize(self) -> bytes:
        return to_bytes(self._arrays(), self._metadata())

    def serialize_to_file(self, filename: str | os.PathLike) -> None:
        save_file(filename, self._arrays(), self._metadata())

    def deserialize(self, data: bytes | bytearray | memoryview) -> M:
        return self._read(data)

    def deserialize_from_file(self, filename: str | os.PathLike) -> M:
        return self._read(filename)


def _grouped(keys: list[str], num_layers: int) -> list[str]:
    """`keys`, with a per-layer key that changed in all `num_layers` layers written once as
    `encoder.layers.*.REST` (a width change touches every key: this keeps the line short)."""
    layers_of: dict[str, set[int]] = {}
    for key in keys:
        if (found := _LAYER_KEY.match(key)) is not None:
            layers_of.setdefault(found.group(2), set()).add(int(found.group(1)))
    out: list[str] = []
    for key in keys:
        found = _LAYER_KEY.match(key)
        if found is None or len(layers_of[found.group(2)]) < num_layers:
            out.append(key)
        elif (grouped := f"encoder.layers.*.{found.group(2)}") not in out:
            out.append(grouped)
    return out


def _heads_for(metadata: dict[str, str], shapes: dict[str, tuple[int, ...]],
               current: ModelConfig) -> int:
    """The head count of a file's model: its metadata's, else the module's when it still
    splits the file's width into even heads, else V1's (what `infer_config` assumes)."""
    try:
        return int(metadata[METADATA_HEADS_KEY])
    except (KeyError, ValueError):
        pass
    width = shapes.get("embedding.weight", (0, 0))[-1]
    try:
        replace(current, embedding_dim=width)
    except (TypeError, ValueError):
        return V1_NUM_HEADS
    return current.num_heads
