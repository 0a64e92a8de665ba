"""The 0.1.x `Serde` interface, written once: canonical safetensors for one module.

A framework's `Serde` (`soma_models.v1.torch.serde`, `soma_models.v1.flax.serde`) says how
to read its module's parameters as canonical arrays (`_arrays`) and how to write a file's
canonical tensors back into them (`_read`). The public methods, the file format and the
metadata rule live here, framework-free.
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

import numpy as np

from soma_models.safetensors_io import save_file, to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import file_metadata

M = TypeVar("M")
Source = str | os.PathLike | bytes | bytearray | memoryview


class ModuleSerde(Generic[M]):
    """Canonical safetensors for `module` (a `Model`, or any block of one), keys relative
    to that module.

    `deserialize` writes the file's tensors into `module` in place and returns it; every
    missing key, shape or dtype problem is reported at once and nothing is written then.
    A whole model's file carries its config in the metadata; a block's carries none.
    """

    def __init__(self, module: M):
        self.module = module

    def _arrays(self) -> dict[str, np.ndarray]:
        """The module's parameters as canonical float32 arrays, by canonical key."""
        raise NotImplementedError

    def _read(self, source: Source) -> M:
        """Check `source`'s tensors against the module's, then write them into it."""
        raise NotImplementedError

    def _metadata(self) -> dict[str, str] | None:
        config = getattr(self.module, "config", None)
        return file_metadata(config) if isinstance(config, ModelConfig) else None

    def serialize(self) -> bytes:
        return to_bytes(self._arrays(), self._metadata())

    def serialize_to_file(self, filename: str | os.PathLike) -> None:
        save_file(filename, self._arrays(), self._metadata())

    def deserialize(self, data: bytes | bytearray | memoryview) -> M:
        return self._read(data)

    def deserialize_from_file(self, filename: str | os.PathLike) -> M:
        return self._read(filename)
