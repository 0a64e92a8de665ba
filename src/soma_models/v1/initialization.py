"""The from-scratch init rule, once, keyed by the weight schema (framework-free).

Every canonical parameter (`schema.param_specs`) starts as N(`initial_mean`,
`initial_std`): embedding and linear weights are N(0, 0.02), except the two projections
that feed the residual stream (`attention.output`, `pwff.linear_outer`), which use
0.02 / sqrt(2 * num_layers) so that the stream's variance does not grow with depth;
biases are 0, LayerNorm gamma 1 and beta 0 (std 0: constants). The torch and Flax
`Model`s walk the same schema with these two functions, and so does
`write_initial_weights`.

`write_initial_weights` writes fresh weights straight to disk, one tensor at a time: each
tensor is drawn from its own NumPy stream seeded by `(seed, tensor index)` only when the
writer reaches it, so the full V1 (6.4 GB) is written holding one tensor (64 MB) in
memory, and a tensor's values do not depend on write order.
"""

from __future__ import annotations

import math
import os

import numpy as np

from soma_models.safetensors_io import save_file
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import ParamSpec, file_metadata, param_specs

#: Standard deviation of every random weight but the residual projections.
INIT_STD = 0.02
#: Key suffixes of the projections that write into the residual stream.
RESIDUAL_PROJECTIONS = ("attention.output.weight", "pwff.linear_outer.weight")


def initial_std(spec: ParamSpec, config: ModelConfig) -> float:
    """Standard deviation of `spec`'s initial values; 0.0 for the constant kinds."""
    if spec.kind not in ("embedding", "linear_weight"):
        return 0.0
    if spec.key.endswith(RESIDUAL_PROJECTIONS):
        return INIT_STD / math.sqrt(2 * config.num_layers)
    return INIT_STD


def initial_mean(spec: ParamSpec) -> float:
    """Mean of `spec`'s initial values: 1 for LayerNorm gamma, 0 for everything else."""
    return 1.0 if spec.kind == "norm_gamma" else 0.0


class _LazyTensor:
    """Looks like an array to the safetensors writer (shape, dtype) and materialises its
    values only when the writer converts it with `np.asarray`."""

    def __init__(self, spec: ParamSpec, config: ModelConfig, seed: int, index: int):
        self.mean, self.std = initial_mean(spec), initial_std(spec, config)
        self.seed, self.index = seed, index
        self.shape = spec.shape
        self.dtype = np.dtype("<f4")

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        if self.std == 0.0:
            values = np.full(self.shape, self.mean, dtype=np.float32)
        else:
            rng = np.random.default_rng([self.seed, self.index])
            values = rng.standard_normal(self.shape, dtype=np.float32)
            values *= np.float32(self.std)
            if self.mean:
                values += np.float32(self.mean)
        return values if dtype is None else values.astype(dtype, copy=False)


def write_initial_weights(path: str | os.PathLike, config: ModelConfig, seed: int = 0, *,
                          protocol: str | None = None) -> None:
    """Write fresh canonical weights for `config` to `path` atomically (the metadata
    records revision `protocol`; None: the process-wide one)."""
    lazy = {spec.key: _LazyTensor(spec, config, seed, index)
            for index, spec in enumerate(param_specs(config))}
    save_file(path, lazy, file_metadata(config, protocol))  # type: ignore[arg-type]
