"""The torch scoring backend's float32 guard and piece terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.torch.evaluate import TorchBackend, strict_float32
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import sig_reg_statistic


def test_strict_float32_turns_tf32_off_and_restores_it():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    try:
        with strict_float32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_piece_terms_are_sums_over_rows():
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
    sig_reg = SIGRegConfig(slices=16)
    backend = TorchBackend(Model(config), sig_reg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (3, 8)).astype(np.int32)
    targets = rng.integers(0, 257, (3, 8)).astype(np.int32)
    positions = np.arange(24, dtype=np.int64).reshape(3, 8)
    noises = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2)]
    whole = backend.piece_terms(tokens, targets, positions, noises)
    parts = [backend.piece_terms(tokens[i:i + 1], targets[i:i + 1], positions[i:i + 1], noises)
             for i in range(3)]
    np.testing.assert_allclose(sum(p.ce_sum for p in parts), whole.ce_sum, rtol=1e-6)
    np.testing.assert_allclose(sum(p.sig_reg_sums for p in parts), whole.sig_reg_sums, rtol=1e-5)
    np.testing.assert_allclose(sum(p.embedding_sum for p in parts), whole.embedding_sum,
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        reps = backend.model.encode(torch.from_numpy(tokens).long(), torch.from_numpy(positions))
        expected = sig_reg_statistic(reps, torch.from_numpy(noises[1]), sig_reg) * 24
    np.testing.assert_allclose(whole.sig_reg_sums[1], float(expected), rtol=1e-6)


def test_bf16_row_terms_approximate_float32_and_leave_it_alone():
    """The prescreen's pass: bf16 autocast terms near the float32 ones (bf16 keeps 8
    significant bits: relative 2^-8 per value, a few of those through one layer), in
    float64 like them; the float32 terms are unchanged by having run it."""
    torch.manual_seed(0)
    config = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
    backend = TorchBackend(Model(config), SIGRegConfig(slices=16))
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 256, (4, 8)).astype(np.int32)
    targets = rng.integers(0, 257, (4, 8)).astype(np.int32)
    positions = np.tile(np.arange(8, dtype=np.int64), (4, 1))
    noises = [rng.standard_normal((16, 16)).astype(np.float32)]
    index = np.zeros(4, dtype=np.int64)
    exact = backend.row_terms(tokens, targets, positions, noises, index)
    rough = backend.row_terms(tokens, targets, positions, noises, index, precision="bf16")
    for ours, reference in zip(vars(rough).values(), vars(exact).values()):
        assert ours.dtype == np.float64 and ours.shape == reference.shape
        np.testing.assert_allclose(ours, reference, rtol=3e-2, atol=3e-2)
    assert not np.array_equal(rough.ce_sums, exact.ce_sums)     # it did run in bf16
    again = backend.row_terms(tokens, targets, positions, noises, index)
    np.testing.assert_array_equal(again.ce_sums, exact.ce_sums)
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be one of float32, bf16, got 'fp8'"):
        backend.row_terms(tokens, targets, positions, noises, index, precision="fp8")
