"""Fresh V1 weights written straight to disk, one tensor at a time (framework-free).

The distributions are the torch `Model`'s from-scratch init: N(0, 0.02) embedding and
linear weights, with the two projections that feed the residual stream
(`attention.output`, `pwff.linear_outer`) at 0.02 / sqrt(2 * num_layers); zero biases;
LayerNorm gamma 1, beta 0. Each tensor is drawn from its own NumPy stream seeded by
`(seed, tensor index)` only when the writer reaches it, so the full V1 (6.4 GB) is written
holding one tensor (64 MB) in memory, and a tensor's values do not depend on write order.
"""

from __future__ import annotations

import math
import os

import numpy as np

from soma_models.safetensors_io import save_file
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import ParamSpec, file_metadata, param_specs

INIT_STD = 0.02
RESIDUAL_PROJECTIONS = ("attention.output.weight", "pwff.linear_outer.weight")


class _LazyTensor:
    """Looks like an array to the safetensors writer (shape, dtype) and materialises its
    values only when the writer converts it with `np.asarray`."""

    def __init__(self, spec: ParamSpec, std: float, seed: int, index: int):
        self.spec, self.std, self.seed, self.index = spec, std, seed, index
        self.shape = spec.shape
        self.dtype = np.dtype("<f4")

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        kind = self.spec.kind
        if kind == "norm_gamma":
            values = np.ones(self.shape, dtype=np.float32)
        elif kind in ("linear_bias", "norm_beta"):
            values = np.zeros(self.shape, dtype=np.float32)
        else:
            rng = np.random.default_rng([self.seed, self.index])
            values = rng.standard_normal(self.shape, dtype=np.float32)
            values *= np.float32(self.std)
        return values if dtype is None else values.astype(dtype, copy=False)


def initial_std(spec: ParamSpec, config: ModelConfig) -> float:
    if spec.key.endswith(RESIDUAL_PROJECTIONS):
        return INIT_STD / math.sqrt(2 * config.num_layers)
    return INIT_STD


def write_initial_weights(path: str | os.PathLike, config: ModelConfig, seed: int = 0, *,
                          protocol: str | None = None) -> None:
    """Write fresh canonical weights for `config` to `path` atomically (the metadata
    records revision `protocol`; None: the process-wide one)."""
    lazy = {spec.key: _LazyTensor(spec, initial_std(spec, config), seed, index)
            for index, spec in enumerate(param_specs(config))}
    save_file(path, lazy, file_metadata(config, protocol))  # type: ignore[arg-type]
