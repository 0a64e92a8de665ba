"""Flax (NNX) scoring backend: a loaded model's raw per-piece terms (see `soma_models.v1.scoring`).

The forward pass and each SIGReg evaluation are compiled with `jit` (once per piece
shape). The model runs in eval mode (no dropout); every matmul of the modules already
asks for `Precision.HIGHEST` (true float32 on every backend). Positions are rounded to
float32 on the host, as the modules do, because JAX would first narrow int64 to int32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Self

import jax
import numpy as np
from flax import nnx

from soma_models.v1.backend import PieceTerms, RowTerms
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import cross_entropy_rows, cross_entropy_sum
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import sig_reg_position_values, sig_reg_statistic


@nnx.jit
def _forward(model: Model, token_ids: jax.Array, positions: jax.Array, targets: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reps `[R, S, D]`, cross-entropy sum, sum over rows of the mean over positions)."""
    reps = model.encode(token_ids, positions)
    ce_sum = cross_entropy_sum(model.predict(reps), targets)
    return reps, ce_sum, reps.mean(axis=1).sum(axis=0)


@functools.partial(jax.jit, static_argnums=2)
def _sig_reg(reps: jax.Array, noise: jax.Array, config: SIGRegConfig) -> jax.Array:
    return sig_reg_statistic(reps, noise, config)


@nnx.jit
def _row_forward(model: Model, token_ids: jax.Array, positions: jax.Array, targets: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(reps `[R, S, D]`, cross-entropy sum per row `[R]`, mean over positions `[R, D]`)."""
    reps = model.encode(token_ids, positions)
    return reps, cross_entropy_rows(model.predict(reps), targets), reps.mean(axis=1)


@functools.partial(jax.jit, static_argnums=2)
def _sig_reg_rows(reps: jax.Array, noise: jax.Array, config: SIGRegConfig) -> jax.Array:
    """Per row, the sum over its positions of the SIGReg values `[R]`."""
    return sig_reg_position_values(reps, noise, config).sum(axis=1)


def _is_training(model: Model) -> bool:
    return any(getattr(m, "deterministic", True) is False for _, m in nnx.iter_modules(model))


class FlaxBackend:
    """A `ScoringBackend` around a Flax NNX `Model`."""

    precisions = ("float32",)

    def __init__(self, model: Model, sig_reg_config: SIGRegConfig):
        self.model = model
        self.config: ModelConfig = model.config
        self.sig_reg_config = sig_reg_config
        self.on_cpu = jax.default_backend() == "cpu"

    @classmethod
    def open(cls, source: object, *, model_config: ModelConfig | None,
             sig_reg_config: SIGRegConfig, device: object = None) -> Self:
        """source: a Flax `Model`, a dict of canonical arrays, a path or bytes.

        `device` is not used: JAX places arrays on its default device.
        """
        if isinstance(source, nnx.Module):
            if not isinstance(source, Model):
                raise TypeError(f"expected a soma_models V1 Flax Model, got "
                                f"{type(source).__name__}")
            if model_config is not None and model_config != source.config:
                raise ValueError("model_config differs from the loaded model's config")
            model = source
        elif isinstance(source, dict):
            model = Model.from_arrays(source, model_config)
        else:
            model = Model.load(source, model_config)  # type: ignore[arg-type]
        return cls(model, sig_reg_config)

    def _run(self, forward, token_ids: np.ndarray, targets: np.ndarray,
             pos_ids: np.ndarray) -> tuple[jax.Array, ...]:
        """`forward(model, ids, positions, targets)` in eval mode, then the model's own mode."""
        was_training = _is_training(self.model)
        self.model.eval()
        try:
            return forward(self.model, np.asarray(token_ids, dtype=np.int32),
                           np.asarray(pos_ids).astype(np.float32),
                           np.asarray(targets, dtype=np.int32))
        finally:
            if was_training:
                self.model.train()

    def piece_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                    noises: Sequence[np.ndarray]) -> PieceTerms:
        reps, ce_sum, embedding_sum = self._run(_forward, token_ids, targets, pos_ids)
        n_positions = reps.shape[0] * reps.shape[1]
        sig_reg_sums = np.array([float(_sig_reg(reps, noise, self.sig_reg_config)) * n_positions
                                 for noise in noises])
        return PieceTerms(float(ce_sum), sig_reg_sums,
                          np.asarray(embedding_sum, dtype=np.float64))

    def row_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                  noises: Sequence[np.ndarray], noise_index: np.ndarray, *,
                  precision: str = "float32") -> RowTerms:
        if precision not in self.precisions:
            raise ValueError(f"the Flax backend scores in float32 only, not {precision!r} "
                             "(a bf16 prescreen runs with --framework torch)")
        reps, ce_sums, embedding_means = self._run(_row_forward, token_ids, targets, pos_ids)
        noise_index = np.asarray(noise_index)
        sig_reg_sums = np.zeros(reps.shape[0])
        for j, noise in enumerate(noises):
            rows = noise_index == j
            if rows.any():
                # Every row under each noise in use, then keep that noise's rows: the
                # shapes stay those of the pass, so jit compiles once per pass size.
                sums = np.asarray(_sig_reg_rows(reps, noise, self.sig_reg_config))
                sig_reg_sums[rows] = sums[rows]
        return RowTerms(np.asarray(ce_sums, dtype=np.float64), sig_reg_sums,
                        np.asarray(embedding_means, dtype=np.float64))
