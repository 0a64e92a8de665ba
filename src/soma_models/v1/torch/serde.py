"""Canonical safetensors <-> PyTorch `Model` (SPEC §4).

torch's `nn.Linear` stores `[out, in]`; the canonical layout is `[in, out]`, so linear
weights are transposed both ways (as views: no copy of the model is made). LayerNorm's
`weight`/`bias` are the file's `gamma`/`beta`. Loading builds the model on the meta
device and adopts the file's tensors directly (a copy-on-write memory map), so a 6.4 GB
V1 file is held in memory once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from soma_models.errors import WeightsError
from soma_models.safetensors_io import SafetensorsFile, save_file
from soma_models.safetensors_io import to_bytes as _to_bytes
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    ParamSpec,
    check_tensors,
    file_metadata,
    heads_from_metadata,
    infer_config,
    param_specs,
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
    if model_cls is None:
        from soma_models.v1.torch.modules.model import Model as model_cls
    found = {k: (_dtype_name(a), tuple(a.shape)) for k, a in arrays.items()}
    if config is None:
        heads = {} if num_heads is None else {"num_heads": num_heads}
        config = infer_config({k: s for k, (_, s) in found.items()}, source=source, **heads)
    check = check_tensors(found, config)
    if not check.ok:
        raise WeightsError(source, check.errors)
    for warning in check.warnings:
        warnings.warn(f"{source}: {warning}", stacklevel=3)
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


def _dtype_name(arr: np.ndarray) -> str:
    return {np.dtype("float32"): "F32", np.dtype("float64"): "F64",
            np.dtype("float16"): "F16"}.get(np.asarray(arr).dtype, str(np.asarray(arr).dtype))


def load(source: str | os.PathLike | bytes | bytearray | memoryview,
         config: ModelConfig | None = None, *, device: torch.device | str | None = None,
         model_cls: type[Model] | None = None) -> Model:
    """Load canonical weights from a path or bytes. Every problem is listed in one error."""
    weights = SafetensorsFile(source)
    found = {k: (i.dtype, i.shape) for k, i in weights.tensors.items()}
    if config is None:
        config = infer_config({k: s for k, (_, s) in found.items()}, source=weights.name,
                              num_heads=heads_from_metadata(weights.metadata))
    check = check_tensors(found, config)
    if not check.ok:
        raise WeightsError(weights.name, check.errors)
    arrays = {spec.key: weights.array(spec.key) for spec in param_specs(config)}
    for warning in check.warnings:
        warnings.warn(f"{weights.name}: {warning}", stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # extra keys were reported just above
        return from_arrays(arrays, config, source=weights.name, device=device,
                           model_cls=model_cls)
