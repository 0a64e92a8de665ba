"""Canonical safetensors <-> PyTorch modules (SPEC §4).

torch's `nn.Linear` stores `[out, in]`; the canonical layout is `[in, out]`, so linear
weights are transposed both ways (as views: no copy of the model is made). LayerNorm's
`weight`/`bias` are the file's `gamma`/`beta`. Loading builds the model on the meta
device and adopts the file's tensors directly (a copy-on-write memory map), so a 6.4 GB
V1 file is held in memory once.

This module sits below the model: `Model` inherits `Serializable` from here, and nothing
here imports the model, not even for type hints (functions that build one take its class,
`model_cls`; a model passed in is any module with a `ModelConfig` as `config`).

Also here, for code written against soma-models 0.1.x: `Serde(module)` (serialize /
deserialize any module in place, by attribute path; see `soma_models.v1.serde`),
`load_safetensor_into` and `remap`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self, TypeVar

import numpy as np
import torch
from torch import nn

from soma_models.safetensors_io import save_file
from soma_models.safetensors_io import to_bytes as _to_bytes
from soma_models.utils.remap import remap
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import (
    ParamSpec,
    checked_arrays,
    file_metadata,
    param_specs,
    read_weights,
)
from soma_models.v1.serde import ModuleSerde

__all__ = ["Serde", "Serializable", "canonical_arrays", "from_arrays", "load",
           "load_safetensor_into", "remap", "save", "to_bytes", "torch_name"]

# A V1 model class (`Model` or a subclass): what `model_cls` builds and returns.
ModelT = TypeVar("ModelT", bound=nn.Module)

_TORCH_SUFFIX = {"norm_gamma": "weight", "norm_beta": "bias"}


def torch_name(spec: ParamSpec) -> str:
    """The `state_dict` name of a canonical parameter."""
    prefix, _, leaf = spec.key.rpartition(".")
    return f"{prefix}.{_TORCH_SUFFIX.get(spec.kind, leaf)}"


def canonical_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 arrays (views where possible)."""
    state = model.state_dict()
    out = {}
    for spec in param_specs(model.config):
        arr = state[torch_name(spec)].detach().to("cpu", torch.float32).numpy()
        out[spec.key] = arr.T if spec.kind == "linear_weight" else arr
    return out


def save(model: nn.Module, path: str | os.PathLike, *, protocol: str | None = None) -> None:
    """Write canonical weights atomically (temporary file in the same folder, then rename).

    The metadata records the revision `protocol` (None: the process-wide one)."""
    save_file(path, canonical_arrays(model), file_metadata(model.config, protocol))


def to_bytes(model: nn.Module, *, protocol: str | None = None) -> bytes:
    """The canonical file's bytes (metadata records revision `protocol`)."""
    return _to_bytes(canonical_arrays(model), file_metadata(model.config, protocol))


def _adopt(arr: np.ndarray) -> torch.Tensor:
    """A tensor sharing `arr`'s memory when that is safe, else a copy."""
    if arr.flags.writeable and arr.ctypes.data % arr.dtype.itemsize == 0:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.array(arr))


def from_arrays(arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None, *,
                model_cls: type[ModelT], source: str = "<arrays>",
                device: torch.device | str | None = None, num_heads: int | None = None) -> ModelT:
    """Build a `model_cls` from canonical arrays, checking every key and shape first.

    (`Model.from_arrays(arrays, config)` supplies `model_cls`.)
    """
    config, arrays = checked_arrays(arrays, config, source=source, num_heads=num_heads)
    return _build(arrays, config, device, model_cls)


def _build(arrays: Mapping[str, np.ndarray], config: ModelConfig,
           device: torch.device | str | None, model_cls: type[ModelT]) -> ModelT:
    """Adopt already-checked canonical arrays as the parameters of a new model."""
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
         config: ModelConfig | None = None, *, model_cls: type[ModelT],
         device: torch.device | str | None = None) -> ModelT:
    """Load canonical weights from a path or bytes. Every problem is listed in one error.

    (`Model.load(path, config)` supplies `model_cls`.)
    """
    config, arrays, _ = read_weights(source, config)
    return _build(arrays, config, device, model_cls)


class Serializable:
    """Canonical-safetensors methods of `Model` (the published package's mixin, same names).

    `load(filename, config=None, *, device=None)`: `config=None` infers the sizes from the
    file (heads from its metadata, else V1's 8).
    """

    config: ModelConfig

    def save(self, filename: str | os.PathLike) -> None:
        """Write canonical weights to `filename` atomically."""
        save(self, filename)  # type: ignore[arg-type]

    def save_bytes(self) -> bytes:
        """Canonical weights as safetensors bytes."""
        return to_bytes(self)  # type: ignore[arg-type]

    @classmethod
    def load(cls, filename: str | os.PathLike, config: ModelConfig | None = None, *,
             device: torch.device | str | None = None) -> Self:
        """A model with the weights of file `filename`."""
        return load(filename, config, model_cls=cls, device=device)  # type: ignore[return-value]

    @classmethod
    def load_bytes(cls, data: bytes | bytearray | memoryview, config: ModelConfig | None = None,
                   *, device: torch.device | str | None = None) -> Self:
        """A model with the weights of safetensors `data`."""
        return load(data, config, model_cls=cls, device=device)  # type: ignore[return-value]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None,
                    *, source: str = "<arrays>", device: torch.device | str | None = None,
                    num_heads: int | None = None) -> Self:
        """A model with canonical arrays `{key: [in, out] float32}` as its weights."""
        return from_arrays(arrays, config, model_cls=cls, source=source,  # type: ignore[return-value]
                           device=device, num_heads=num_heads)


# --- any module: Serde and load_safetensor_into --------------------------------------


def _canonical_names(module: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """`{canonical key: (tensor, transposed?)}` of every entry of `module.state_dict()`
    (parameters and persistent buffers), by attribute path, as the published `Serde` names
    them: a LayerNorm's weight/bias are `gamma`/`beta`, a Linear's weight is stored
    `[in, out]`; anything else keeps its state-dict name. For a whole `Model` this is
    exactly the schema's key list.
    """
    names: dict[str, tuple[torch.Tensor, bool]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path)
        transposed = isinstance(owner, nn.Linear) and leaf == "weight"
        if isinstance(owner, nn.LayerNorm):
            leaf = {"weight": "gamma", "bias": "beta"}.get(leaf, leaf)
        names[f"{path}.{leaf}" if path else leaf] = (tensor, transposed)
    return names


M = TypeVar("M", bound=nn.Module)


class Serde(ModuleSerde[M]):
    """`ModuleSerde` over a torch module: canonical safetensors for a `Model`, any block of
    one (`Encoder`, `Layer`, `MultiHeadAttention`, ...) or any `nn.Module` (its state dict
    by attribute path)."""

    def __init__(self, module: M):
        if not isinstance(module, nn.Module):
            raise TypeError(f"Serde needs a torch.nn.Module, got {type(module).__name__}")
        super().__init__(module)

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._model_config() is not None:
            return canonical_arrays(self.module)
        out = {}
        for key, (tensor, transposed) in _canonical_names(self.module).items():
            arr = tensor.detach().to("cpu", torch.float32).numpy()
            out[key] = arr.T if transposed else arr
        return out

    def _expected(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(t.T.shape if transposed else t.shape)
                for key, (t, transposed) in _canonical_names(self.module).items()}

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for key, (tensor, transposed) in _canonical_names(self.module).items():
                value = torch.from_numpy(np.array(arrays[key]))
                tensor.copy_(value.T if transposed else value)

    def _become(self, arrays: dict[str, np.ndarray], config: ModelConfig) -> None:
        # A model of the file's sizes, on the module's device and in its dtype, whose
        # blocks replace the module's (a Module attribute set on a Module is registered).
        model = self.module
        like = next(model.parameters())
        built = _build(arrays, config, like.device, type(model))
        if like.dtype != built.embedding.weight.dtype:
            built.to(like.dtype)
        for name, block in built.named_children():
            setattr(model, name, block)
        model.config = config
        model.train(model.training)


def load_safetensor_into(module: nn.Module, data: bytes | bytearray | memoryview) -> None:
    """Write canonical safetensors `data` into `module`'s tensors (in place)."""
    Serde(module).deserialize(data)
