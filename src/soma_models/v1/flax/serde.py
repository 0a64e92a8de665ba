"""Canonical safetensors <-> Flax NNX `Model` (SPEC §4).

The canonical key list comes from `soma_models.v1.schema.param_specs`; a key's Flax
variable is found by walking its dotted path through the model and renaming the leaf:
LayerNorm `gamma`/`beta` are Flax's `scale`/`bias`, linear `weight` is `kernel` (both
`[in, out]`), the embedding's `weight` is `embedding`. Attention kernels are split-head
in Flax (`[D, H, hd]`, output `[H, hd, D]`): a row-major reshape maps them to the flat
`[D, D]` (output unit h * hd + d, as torch's `.view(B, S, H, hd)`).

Loading builds the model abstractly (`nnx.eval_shape`, no random init of a model that
is about to be overwritten) and fills every parameter from the file.

This module sits below the model: `Model` inherits `Serializable` from here, and nothing
here imports the model, not even for type hints (functions that build one take its class,
`model_cls`; a model passed in is any module with a `ModelConfig` as `config`).

Also here, for code written against soma-models 0.1.x: `Serde(module)` (serialize /
deserialize any module in place, by attribute path; see `soma_models.v1.serde`), `remap`,
`flatten_dict` and `unflatten_dict`.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping
from typing import Self, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soma_models.safetensors_io import save_file
from soma_models.safetensors_io import to_bytes as _to_bytes
from soma_models.utils.dict import flatten_dict, unflatten_dict
from soma_models.utils.remap import remap
from soma_models.v1.configs import ModelConfig
from soma_models.v1.flax.modules.attention import MultiHeadAttention
from soma_models.v1.schema import (
    ParamSpec,
    checked_arrays,
    file_metadata,
    param_specs,
    read_weights,
)
from soma_models.v1.serde import ModuleSerde

__all__ = ["Serde", "Serializable", "canonical_arrays", "flatten_dict", "flax_variable",
           "from_arrays", "load", "remap", "save", "to_bytes", "unflatten_dict"]

# A V1 model class (`Model` or a subclass): what `model_cls` builds and returns.
ModelT = TypeVar("ModelT", bound=nnx.Module)

_FLAX_LEAF = {"embedding": "embedding", "linear_weight": "kernel", "linear_bias": "bias",
              "norm_gamma": "scale", "norm_beta": "bias"}


def flax_variable(model: nnx.Module, spec: ParamSpec) -> nnx.Param:
    """The `nnx.Param` holding canonical parameter `spec` (same shape up to a reshape)."""
    *path, _ = spec.key.split(".")
    node: object = model
    for part in path:
        node = node[int(part)] if part.isdigit() else getattr(node, part)  # type: ignore[index]
    return getattr(node, _FLAX_LEAF[spec.kind])


def canonical_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 NumPy arrays (host views where possible)."""
    out = {}
    for spec in param_specs(model.config):
        value = np.asarray(jax.device_get(flax_variable(model, spec).get_value()))
        out[spec.key] = value.astype(np.float32, copy=False).reshape(spec.shape)
    return out


def save(model: nnx.Module, path: str | os.PathLike, *, protocol: str | None = None) -> None:
    """Write canonical weights atomically (temporary file in the same folder, then rename).

    The metadata records the revision `protocol` (None: the process-wide one)."""
    save_file(path, canonical_arrays(model), file_metadata(model.config, protocol))


def to_bytes(model: nnx.Module, *, protocol: str | None = None) -> bytes:
    """The canonical file's bytes (metadata records revision `protocol`)."""
    return _to_bytes(canonical_arrays(model), file_metadata(model.config, protocol))


def _reseed_dropout(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Give every dropout stream of an abstract model real RNG state from `rngs`."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout) and module.rngs is not None:
            module.rngs = rngs[module.rng_collection].fork()
        elif isinstance(module, MultiHeadAttention) and module.dropout_rngs is not None:
            module.dropout_rngs = rngs["dropout"].fork()


def from_arrays(arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None, *,
                model_cls: type[ModelT], source: str = "<arrays>", rngs: nnx.Rngs | None = None,
                num_heads: int | None = None) -> ModelT:
    """Build a `model_cls` from canonical arrays, checking every key and shape first.

    (`Model.from_arrays(arrays, config)` supplies `model_cls`.)
    """
    config, arrays = checked_arrays(arrays, config, source=source, num_heads=num_heads)
    return _build(arrays, config, rngs, model_cls)


@functools.lru_cache(maxsize=16)
def _abstract_model(model_cls: type[ModelT], config: ModelConfig) -> ModelT:
    """`model_cls(config)` traced for its shapes only. Never handed out: `_build` clones it
    (tracing the constructor costs ~0.2 s for a `small` model, a clone a few ms, and
    screening loads many models)."""
    return nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))


def _build(arrays: Mapping[str, np.ndarray], config: ModelConfig, rngs: nnx.Rngs | None,
           model_cls: type[ModelT]) -> ModelT:
    """A `model_cls` of `config` whose parameters are already-checked canonical arrays."""
    model = nnx.clone(_abstract_model(model_cls, config))
    for spec in param_specs(config):
        variable = flax_variable(model, spec)
        array = np.asarray(arrays[spec.key], dtype=np.float32).reshape(variable.shape)
        variable.set_value(jnp.asarray(array))
    _reseed_dropout(model, rngs if rngs is not None else nnx.Rngs(0))
    return model


def load(source: str | os.PathLike | bytes | bytearray | memoryview,
         config: ModelConfig | None = None, rngs: nnx.Rngs | None = None, *,
         model_cls: type[ModelT]) -> ModelT:
    """Load canonical weights from a path or bytes. Every problem is listed in one error.

    (`Model.load(path, config)` supplies `model_cls`.)
    """
    config, arrays, name = read_weights(source, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read_weights has reported any unused keys
        return from_arrays(arrays, config, source=name, rngs=rngs, model_cls=model_cls)


class Serializable:
    """Canonical-safetensors methods of `Model` (the published package's mixin, same names).

    `load(filename, config=None, rngs=None)`: `config=None` infers the sizes from the file
    (heads from its metadata, else V1's 8); `rngs` seeds dropout (default `nnx.Rngs(0)`).
    """

    config: ModelConfig

    def save(self, filename: str | os.PathLike) -> None:
        """Write canonical weights to `filename` atomically."""
        save(self, filename)  # type: ignore[arg-type]

    def save_bytes(self) -> bytes:
        """Canonical weights as safetensors bytes."""
        return to_bytes(self)  # type: ignore[arg-type]

    @classmethod
    def load(cls, filename: str | os.PathLike, config: ModelConfig | None = None,
             rngs: nnx.Rngs | None = None) -> Self:
        """A model with the weights of file `filename`."""
        return load(filename, config, rngs, model_cls=cls)  # type: ignore[return-value]

    @classmethod
    def load_bytes(cls, data: bytes | bytearray | memoryview, config: ModelConfig | None = None,
                   rngs: nnx.Rngs | None = None) -> Self:
        """A model with the weights of safetensors `data`."""
        return load(data, config, rngs, model_cls=cls)  # type: ignore[return-value]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None,
                    *, source: str = "<arrays>", rngs: nnx.Rngs | None = None,
                    num_heads: int | None = None) -> Self:
        """A model with canonical arrays `{key: [in, out] float32}` as its weights."""
        return from_arrays(arrays, config, model_cls=cls, source=source,  # type: ignore[return-value]
                           rngs=rngs, num_heads=num_heads)


# --- any module: Serde ---------------------------------------------------------------


def _canonical_variables(module: nnx.Module) -> dict[str, tuple[nnx.Variable, tuple[int, ...]]]:
    """`{canonical key: (variable, canonical shape)}` of every variable of `module` but its
    RNG state, by attribute path (the names the published `Serde` gives them).

    Our blocks' parameters take their canonical names (SPEC §4): LayerNorm scale/bias are
    `gamma`/`beta`, kernels are `weight` flattened to `[in, out]`, embeddings `weight`.
    Any other variable keeps its path (`"encoder.scale"` for `module.encoder.scale`). For
    a whole `Model` this is exactly the schema's key list.
    """
    out: dict[str, tuple[nnx.Variable, tuple[int, ...]]] = {}
    for path, sub in nnx.iter_modules(module):
        prefix = "".join(f"{part}." for part in path)
        if isinstance(sub, nnx.LayerNorm):
            out[prefix + "gamma"] = (sub.scale, tuple(sub.scale.shape))
            out[prefix + "beta"] = (sub.bias, tuple(sub.bias.shape))
        elif isinstance(sub, (nnx.Linear, nnx.LinearGeneral)):
            fan_in = math.prod(sub.kernel.shape[: len(_as_tuple(sub.in_features))])
            fan_out = math.prod(sub.kernel.shape) // fan_in
            out[prefix + "weight"] = (sub.kernel, (fan_in, fan_out))
            if sub.bias is not None:
                out[prefix + "bias"] = (sub.bias, (fan_out,))
        elif isinstance(sub, nnx.Embed):
            out[prefix + "weight"] = (sub.embedding, tuple(sub.embedding.shape))
    named = {id(variable) for variable, _ in out.values()}
    for path, node in nnx.iter_graph(module):
        if (isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState)
                and id(node) not in named):
            out[".".join(str(part) for part in path)] = (node, tuple(np.shape(node.get_value())))
    return out


def _as_tuple(features: int | tuple[int, ...]) -> tuple[int, ...]:
    return features if isinstance(features, tuple) else (features,)


M = TypeVar("M", bound=nnx.Module)


class Serde(ModuleSerde[M]):
    """`ModuleSerde` over a Flax NNX module: canonical safetensors for a `Model`, any block
    of one (`Encoder`, `Layer`, `MultiHeadAttention`, ...) or any `nnx.Module` (its
    variables by attribute path)."""

    def __init__(self, module: M):
        if not isinstance(module, nnx.Module):
            raise TypeError(f"Serde needs a flax.nnx.Module, got {type(module).__name__}")
        super().__init__(module)

    def _arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for key, (variable, shape) in _canonical_variables(self.module).items():
            value = np.asarray(jax.device_get(variable.get_value()))
            out[key] = value.astype(np.float32, copy=False).reshape(shape)
        return out

    def _expected(self) -> dict[str, tuple[int, ...]]:
        return {key: shape for key, (_, shape) in _canonical_variables(self.module).items()}

    def _write(self, arrays: dict[str, np.ndarray]) -> None:
        for key, (variable, _) in _canonical_variables(self.module).items():
            old = variable.get_value()
            array = np.asarray(arrays[key], dtype=np.float32).reshape(np.shape(old))
            variable.set_value(jnp.asarray(array, dtype=old.dtype))

    def _become(self, arrays: dict[str, np.ndarray], config: ModelConfig) -> None:
        # A model of the file's sizes whose blocks replace the module's attributes (NNX
        # modules are plain mutable objects outside a transform). Its dropout streams
        # start from seed 0, as after `Model.load`; eval mode carries over.
        model = self.module
        modes = [m.deterministic for _, m in nnx.iter_modules(model)
                 if isinstance(getattr(m, "deterministic", None), bool)]
        built = _build(arrays, config, None, type(model))
        for name, value in vars(built).items():
            if not name.startswith("_"):
                setattr(model, name, value)
        if modes and all(modes):
            model.eval()
