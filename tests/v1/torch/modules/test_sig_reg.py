"""SIGReg's chunked, hand-differentiated statistic against a direct
`[positions, slices, points]` float64 formula written here (SPEC §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.v1.torch.modules.test_attention_kernels import ATOL, RTOL, assert_close

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.noise import quadrature, sig_reg_reference
from soma_models.v1.torch.modules import sig_reg
from soma_models.v1.torch.modules.sig_reg import sig_reg_statistic

# --- SIGReg -------------------------------------------------------------------------

def direct_sig_reg(x: torch.Tensor, noise: torch.Tensor, config: SIGRegConfig) -> torch.Tensor:
    """SPEC §5 with the `[positions, slices, points]` tensor materialised, float64."""
    t, phi, weights = (torch.from_numpy(a).double() for a in quadrature(config))
    directions = noise.double() / noise.double().norm(dim=0, keepdim=True)
    p = x.double().reshape(-1, x.shape[-1]) @ directions                 # [P, slices]
    angle = p[:, :, None] * t                                            # [P, slices, points]
    c, z = torch.cos(angle).mean(1), torch.sin(angle).mean(1)
    return (config.slices * (((c - phi) ** 2 + z * z) * weights).sum(-1)).mean()


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sig_reg_chunked_equals_direct(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    monkeypatch.setattr(sig_reg, "POSITIONS_PER_CHUNK", 37)   # several uneven chunks
    config = SIGRegConfig(slices=256)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 50, 96, generator=generator) * scale
    noise = torch.randn(96, 256, generator=generator)
    fast = sig_reg_statistic(x, noise, config)
    assert_close(fast, direct_sig_reg(x, noise, config))
    reference = sig_reg_reference(x.numpy(), noise.numpy(), config)
    np.testing.assert_allclose(float(fast), reference, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sig_reg_gradients_equal_direct(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    monkeypatch.setattr(sig_reg, "POSITIONS_PER_CHUNK", 37)
    config = SIGRegConfig(slices=256)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(2, 60, 96, generator=generator) * scale
    noise = torch.randn(96, 256, generator=generator)
    x_fast, noise_fast = x.clone().requires_grad_(), noise.clone().requires_grad_()
    sig_reg_statistic(x_fast, noise_fast, config).backward()
    x_ref = x.double().requires_grad_()
    noise_ref = noise.double().requires_grad_()
    direct_sig_reg(x_ref, noise_ref, config).backward()
    # Gradients are ~1/positions each: compare relative to the largest entry.
    for got, want in ((x_fast.grad, x_ref.grad), (noise_fast.grad, noise_ref.grad)):
        scale_of = float(want.abs().max())
        assert_close(got / scale_of, want / scale_of)


def test_sig_reg_float64_and_no_grad_paths_agree() -> None:
    config = SIGRegConfig(slices=128)
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(4, 40, 32, generator=generator)
    noise = torch.randn(32, 128, generator=generator)
    with torch.no_grad():
        value32 = sig_reg_statistic(x, noise, config)
    value64 = sig_reg_statistic(x.double(), noise.double(), config)
    assert value64.dtype == torch.float64
    assert_close(value32, value64)
    assert_close(value64, direct_sig_reg(x, noise, config), rtol=1e-12, atol=1e-12)
