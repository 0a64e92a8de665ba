"""The backend contract (`soma_models.v1.backend`): per-row terms add up to a piece's terms.

Both framework backends are checked: `row_terms` over rows under two different noises
must give, per noise's rows, the same cross-entropy, SIGReg and embedding sums as
`piece_terms` of those rows alone (to float32 summation order: rtol 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.v1.test_scoring import data_of, random_weights

from soma_models.v1.backend import RowTerms
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.noise import scoring_noise
from soma_models.v1.scoring import load_backend
from soma_models.v1.tokenizer import iter_batches

CONFIG = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
SIG_REG = SIGRegConfig(slices=24)


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_row_terms_add_up_to_piece_terms(framework):
    if framework == "flax":
        pytest.importorskip("flax")
    backend = load_backend(random_weights(CONFIG, 3), model_config=CONFIG,
                           sig_reg_config=SIG_REG, framework=framework)
    batch = next(iter_batches(data_of(16 * 5 - 3, seed=1), 16, 5))    # 5 rows, last padded
    noises = [scoring_noise(0, k, CONFIG.embedding_dim, SIG_REG.slices) for k in (0, 1)]
    noise_index = np.array([1, 0, 0, 1, 0])
    rows = backend.row_terms(batch.token_ids, batch.targets, batch.pos_ids, noises, noise_index)
    assert isinstance(rows, RowTerms)
    assert rows.ce_sums.shape == rows.sig_reg_sums.shape == (5,)
    assert rows.embedding_means.shape == (5, CONFIG.embedding_dim)
    for j, noise in enumerate(noises):
        mine = noise_index == j
        piece = backend.piece_terms(batch.token_ids[mine], batch.targets[mine],
                                    batch.pos_ids[mine], [noise])
        np.testing.assert_allclose(rows.ce_sums[mine].sum(), piece.ce_sum, rtol=1e-6)
        np.testing.assert_allclose(rows.sig_reg_sums[mine].sum(), piece.sig_reg_sums[0],
                                   rtol=1e-6)
        np.testing.assert_allclose(rows.embedding_means[mine].sum(axis=0), piece.embedding_sum,
                                   rtol=1e-6, atol=1e-6)
    # Each row's SIGReg depends on its own noise: swapping the noises changes every row.
    swapped = backend.row_terms(batch.token_ids, batch.targets, batch.pos_ids, noises,
                                1 - noise_index)
    assert np.all(swapped.sig_reg_sums != rows.sig_reg_sums)
    np.testing.assert_array_equal(swapped.ce_sums, rows.ce_sums)


@pytest.mark.parametrize("framework, precisions", [("torch", ("float32", "bf16")),
                                                   ("flax", ("float32",))])
def test_precisions_are_declared_and_others_refused(framework, precisions):
    """`precisions` says what `row_terms` computes in (screening's prescreen reads it);
    torch adds a bf16 pass (tests/v1/torch/test_evaluate.py), Flax refuses one."""
    if framework == "flax":
        pytest.importorskip("flax")
    backend = load_backend(random_weights(CONFIG, 3), model_config=CONFIG,
                           sig_reg_config=SIG_REG, framework=framework)
    assert backend.precisions == precisions
    batch = next(iter_batches(data_of(20, seed=1), 16, 5))
    noises = [scoring_noise(0, 0, CONFIG.embedding_dim, SIG_REG.slices)]
    index = np.zeros(batch.token_ids.shape[0], dtype=np.int64)
    exact = backend.row_terms(batch.token_ids, batch.targets, batch.pos_ids, noises, index,
                              precision="float32")
    default = backend.row_terms(batch.token_ids, batch.targets, batch.pos_ids, noises, index)
    np.testing.assert_array_equal(exact.ce_sums, default.ce_sums)
    refused = "fp8" if framework == "torch" else "bf16"
    with pytest.raises(ValueError, match=f"{refused!r}"):
        backend.row_terms(batch.token_ids, batch.targets, batch.pos_ids, noises, index,
                          precision=refused)
