"""SIGReg: how far projected representations are from a standard Gaussian (SPEC §5).

For unit directions A (noise columns normalised), p = x @ A is compared, per position,
with N(0, 1) through its empirical characteristic function over the slices. We never
build the `[positions, slices, points]` tensor: positions are processed in chunks, and
each quadrature point in turn; under autograd each chunk is checkpointed, so the saved
activations stay `[positions, slices]`-sized at most once per chunk.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.noise import quadrature

# Positions per chunk: [chunk, slices] float32 temporaries stay around 16 MB at 1024 slices.
POSITIONS_PER_CHUNK = 4096


def _chunk_sum(x: torch.Tensor, directions: torch.Tensor, t: torch.Tensor, phi: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """Σ over the chunk's positions of slices * Σ_j w_j ((c_j - phi_j)^2 + z_j^2)."""
    p = x @ directions                                                   # [P, slices]
    total = torch.zeros(p.shape[0], dtype=p.dtype, device=p.device)
    for j in range(t.shape[0]):
        pt = p * t[j]
        c = torch.cos(pt).mean(-1)
        z = torch.sin(pt).mean(-1)
        total = total + weights[j] * ((c - phi[j]) ** 2 + z * z)
    return (p.shape[-1] * total).sum()


def sig_reg_statistic(x: torch.Tensor, noise: torch.Tensor, config: SIGRegConfig) -> torch.Tensor:
    """Raw SIGReg statistic (no coefficient) of x `[..., D]` with noise `[D, slices]`."""
    if noise.ndim != 2 or noise.shape[0] != x.shape[-1]:
        raise ValueError(f"noise must be [embedding_dim={x.shape[-1]}, slices], "
                         f"got {list(noise.shape)}")
    t, phi, weights = (torch.from_numpy(a).to(x.device) for a in quadrature(config))
    noise = noise.to(device=x.device, dtype=torch.float32)
    directions = noise / noise.norm(dim=0, keepdim=True)
    flat = x.reshape(-1, x.shape[-1])
    total = flat.new_zeros(())
    grad = torch.is_grad_enabled() and flat.requires_grad
    for chunk in flat.split(POSITIONS_PER_CHUNK):
        if grad:
            total = total + checkpoint(_chunk_sum, chunk, directions, t, phi, weights,
                                       use_reentrant=False)
        else:
            total = total + _chunk_sum(chunk, directions, t, phi, weights)
    return total / flat.shape[0]


class SIGReg(nn.Module):
    """`coefficient * SIGReg(x)`, so that `loss = cross_entropy + sig_reg(x)`.

    Without `noise`, the `[D, slices]` noise is drawn from torch's RNG (`torch.randn`).
    """

    def __init__(self, config: SIGRegConfig | None = None):
        super().__init__()
        self.config = config or SIGRegConfig()

    def statistic(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The raw statistic (what the runtime's SIGReg module returns)."""
        if noise is None:
            noise = torch.randn(x.shape[-1], self.config.slices, device=x.device)
        return sig_reg_statistic(x, noise, self.config)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self.config.coefficient * self.statistic(x, noise)
