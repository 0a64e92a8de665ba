"""Canonical safetensors <-> Flax NNX `Model` (SPEC §4).

The canonical key list comes from `soma_models.v1.schema.param_specs`; a key's Flax
variable is found by walking its dotted path through the model and renaming the leaf:
LayerNorm `gamma`/`beta` are Flax's `scale`/`bias`, linear `weight` is `kernel` (both
`[in, out]`), the embedding's `weight` is `embedding`. Attention kernels are split-head
in Flax (`[D, H, hd]`, output `[H, hd, D]`): a row-major reshape maps them to the flat
`[D, D]` (output unit h * hd + d, as torch's `.view(B, S, H, hd)`).

Loading builds the model abstractly (`nnx.eval_shape`, no random init of a model that
is about to be overwritten) and fills every parameter from the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
    from soma_models.v1.flax.modules.model import Model

_FLAX_LEAF = {"embedding": "embedding", "linear_weight": "kernel", "linear_bias": "bias",
              "norm_gamma": "scale", "norm_beta": "bias"}


def flax_variable(model: Model, spec: ParamSpec) -> nnx.Param:
    """The `nnx.Param` holding canonical parameter `spec` (same shape up to a reshape)."""
    *path, _ = spec.key.split(".")
    node: object = model
    for part in path:
        node = node[int(part)] if part.isdigit() else getattr(node, part)  # type: ignore[index]
    return getattr(node, _FLAX_LEAF[spec.kind])


def canonical_arrays(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters as canonical float32 NumPy arrays (host views where possible)."""
    out = {}
    for spec in param_specs(model.config):
        value = np.asarray(jax.device_get(flax_variable(model, spec).get_value()))
        out[spec.key] = value.astype(np.float32, copy=False).reshape(spec.shape)
    return out


def save(model: Model, path: str | os.PathLike) -> None:
    """Write canonical weights atomically (temporary file in the same folder, then rename)."""
    save_file(path, canonical_arrays(model), file_metadata(model.config))


def to_bytes(model: Model) -> bytes:
    return _to_bytes(canonical_arrays(model), file_metadata(model.config))


def _reseed_dropout(model: Model, rngs: nnx.Rngs) -> None:
    """Give every dropout stream of an abstract model real RNG state from `rngs`."""
    from soma_models.v1.flax.modules.attention import MultiHeadAttention

    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout) and module.rngs is not None:
            module.rngs = rngs[module.rng_collection].fork()
        elif isinstance(module, MultiHeadAttention) and module.dropout_rngs is not None:
            module.dropout_rngs = rngs["dropout"].fork()


def from_arrays(arrays: Mapping[str, np.ndarray], config: ModelConfig | None = None, *,
                source: str = "<arrays>", rngs: nnx.Rngs | None = None,
                model_cls: type[Model] | None = None, num_heads: int | None = None) -> Model:
    """Build a `Model` from canonical arrays, checking every key and shape first."""
    if model_cls is None:
        from soma_models.v1.flax.modules.model import Model as model_cls
    config, arrays = checked_arrays(arrays, config, source=source, num_heads=num_heads)
    model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0)))
    for spec in param_specs(config):
        variable = flax_variable(model, spec)
        array = np.asarray(arrays[spec.key], dtype=np.float32).reshape(variable.shape)
        variable.set_value(jnp.asarray(array))
    _reseed_dropout(model, rngs if rngs is not None else nnx.Rngs(0))
    return model


def load(source: str | os.PathLike | bytes | bytearray | memoryview,
         config: ModelConfig | None = None, *, rngs: nnx.Rngs | None = None,
         model_cls: type[Model] | None = None) -> Model:
    """Load canonical weights from a path or bytes. Every problem is listed in one error."""
    config, arrays, name = read_weights(source, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read_weights has reported any unused keys
        return from_arrays(arrays, config, source=name, rngs=rngs, model_cls=model_cls)
