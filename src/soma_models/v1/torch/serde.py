"""Canonical safetensors <-> PyTorch `Model` (SPEC §4).

torch's `nn.Linear` stores `[out, in]`; the canonical layout is `[in, out]`, so linear
weights are transposed both ways (as views: no copy of the model is made). LayerNorm's
`weight`/`bias` are the file's `gamma`/`beta`. Loading builds the model on the meta
device and adopts the file's tensors directly (a copy-on-write memory map), so a 6.4 GB
V1 file is held in memory once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from soma_models.safetensors_io import save_file
from soma_models.safetensors_io import to_bytes as _to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    ParamSpec,
    checked_arrays,
    file_metadata,
    param_specs,
    read_weights,
)

if TYPE_CHECKING:
    from soma_models.v1.torch.modules.model import Model

_TORCH_SUFFIX = {"norm_gamma": "weight", "norm_beta": "bias"}


def torch_name(spec: ParamSpec) -> str:
    """The `state_dict` name of a canonical parameter."""
    prefix, _, leaf = spec.key.rpartition(".")
    return f"{prefix}.{_TORCH_SUFFIX.get(spec.kind, leaf)}"


def canonical_arrays(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 arrays (views where possible)."""
    state = model.state_dict()
    out = {}
    for spec in param_specs(model.config):
        arr = state[torch_name(spec)].detach().to("cpu", torch.float32).numpy()
        out[spec.key] = arr.T if spec.kind == "linear_weight" else arr
    return out


def save(model: Model, path: str | os.PathLike) -> None:
    """Write canonical weights atomically (temporary file in the same folder, then rename)."""
    save_file(path, canonical_arrays(model), file_metadata(model.config))


def to_bytes(model: Model) -> bytes:
    return _to_bytes(canonical_arrays(model), file_metadata(model.config))


def _adopt(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing `arr`'s memory when that is safe, else a copy."""
    if arr.flags.writeable and arr.ctypes.data % arr.dtype.itemsize == 0:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr))


def from_arrays(arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None, *,
                source: str = "<arrays>", device: torch.device | str | None = None,
                model_cls: type[Model] | None = None, num_heads: int | None = None) -> Model:
    """Build a `Model` from canonical arrays, checking every key and shape first."""
    config, arrays = checked_arrays(arrays, config, source=source, num_heads=num_heads)
    return _build(arrays, config, device, model_cls)


def _build(arrays: Mapping[str, np.ndarray], config: ModelConfig,
           device: torch.device | str | None, model_cls: type[Model] | None) -> Model:
    """Adopt already-checked canonical arrays as the parameters of a new model."""
    if model_cls is None:
        from soma_models.v1.torch.modules.model import Model as model_cls
    with torch.device("meta"):
        model = model_cls(config)
    state = {}
    for spec in param_specs(config):
        tensor = _adopt(np.asarray(arrays[spec.key]))
        state[torch_name(spec)] = tensor.T if spec.kind == "linear_weight" else tensor
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        model.to(device)
    return model


def load(source: str | os.PathLike | bytes | bytearray | memoryview,
         config: ModelConfig | None = None, *, device: torch.device | str | None = None,
         model_cls: type[Model] | None = None) -> Model:
    """Load canonical weights from a path or bytes. Every problem is listed in one error."""
    config, arrays, _ = read_weights(source, config)
    return _build(arrays, config, device, model_cls)
