"""What a framework backend hands the framework-free drivers (scoring, screening).

The drivers (`soma_models.v1.scoring`, `soma_models.v1.screening`) own the data contract,
the noise, the running means and competitions; a backend (`soma_models.v1.torch.evaluate`,
`soma_models.v1.flax.evaluate`) only runs a loaded model on rows and returns raw sums.
Both import this module, which imports nothing framework-specific, so the dependency runs
one way: backend <- framework evaluate <- drivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from soma_models.v1.configs import ModelConfig


@dataclass(frozen=True)
class PieceTerms:
    """Raw sums a backend returns for some rows of one batch.

    ce_sum: sum over non-PAD targets of -log_softmax(logits)[target].
    sig_reg_sums: `[n_noises]` float64, per noise the sum over positions of the per-position
        SIGReg value (no coefficient), so that the statistic is sum / positions.
    embedding_sum: `[D]` float64, sum over rows of (mean over positions of reps).
    """

    ce_sum: float
    sig_reg_sums: np.ndarray
    embedding_sum: np.ndarray


@dataclass(frozen=True)
class RowTerms:
    """The same sums kept apart per row, for rows that belong to different samples.

    ce_sums: `[R]` float64, per row the sum over its non-PAD targets of -log p(target).
    sig_reg_sums: `[R]` float64, per row the sum over its positions of the per-position
        SIGReg value under that row's own noise (no coefficient).
    embedding_means: `[R, D]` float64, per row the mean over positions of reps.

    Rows are independent through the model and every term is a sum over positions, so the
    rows of one batch add up to that batch's `PieceTerms` (up to float32 summation order).
    """

    ce_sums: np.ndarray
    sig_reg_sums: np.ndarray
    embedding_means: np.ndarray


class ScoringBackend(Protocol):
    """What a framework provides to the drivers: a loaded model that computes raw terms."""

    config: ModelConfig
    on_cpu: bool          # sizes "auto" micro-batches (scoring.auto_micro_batch_size)
    # What `row_terms` computes in: "float32" (the chain's numbers) always; "bf16" (an
    # approximation, for screening's prescreen) where the framework provides it.
    precisions: tuple[str, ...]

    def piece_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                    noises: Sequence[np.ndarray]) -> PieceTerms:
        """Terms for rows `[R, S]` (int32 ids/targets, int64 positions); noises `[D, slices]`."""
        ...

    def row_terms(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                  noises: Sequence[np.ndarray], noise_index: np.ndarray, *,
                  precision: str = "float32") -> RowTerms:
        """Per-row terms for rows `[R, S]`; row r's SIGReg uses `noises[noise_index[r]]`.
        precision: one of `precisions`; anything else is a ValueError."""
        ...
