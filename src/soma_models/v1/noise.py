"""SIGReg's fixed quadrature grid and the on-chain noise stream, framework-free.

The runtime draws the SIGReg projection noise for batch `k` of an evaluation as
`arrgen.normal_array(seed + k, [embedding_dim, slices], 0.0, 1.0)` with `seed + k` in u64
arithmetic, wrapping at 2^64 (SPEC §6);
`soma-arrgen` reproduces that stream bit for bit.
"""

from __future__ import annotations

import numpy as np

from soma_models.v1.configs import SIGRegConfig

U64_MAX = 2**64 - 1


def check_seed(seed: object) -> int:
    """A scoring seed is a u64, as on chain."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if not 0 <= int(seed) <= U64_MAX:
        raise ValueError(f"seed must be in [0, 2**64 - 1] (a u64), got {seed}")
    return int(seed)


def scoring_noise(seed: int, batch_index: int, embedding_dim: int, slices: int) -> np.ndarray:
    """The `[embedding_dim, slices]` float32 noise the runtime uses for batch `batch_index`."""
    import arrgen

    # The runtime adds in u64, which wraps at 2^64 (SPEC §6): seed 2^64 - 1, batch 1 -> 0.
    stream_seed = (check_seed(seed) + batch_index) & U64_MAX
    noise = arrgen.normal_array(stream_seed, [embedding_dim, slices], 0.0, 1.0)
    return np.asarray(noise, dtype=np.float32)


def quadrature(config: SIGRegConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(t, phi, weights)`, each float32 `[points]` (SPEC §5).

    t_j = j * dt on [0, t_max]; phi_j = exp(-t_j^2 / 2) is the standard normal's
    characteristic function; weights are the trapezoid rule's (dt at both ends, 2 dt
    inside, as the runtime writes it) times phi_j.
    """
    points = config.points
    dt = np.float32(config.t_max) / np.float32(points - 1)
    t = np.arange(points, dtype=np.float32) * dt
    phi = np.exp(-(t * t) / np.float32(2.0)).astype(np.float32)
    trapezoid = np.full(points, np.float32(2.0) * dt, dtype=np.float32)
    trapezoid[0] = trapezoid[-1] = dt
    return t, phi, (phi * trapezoid).astype(np.float32)


def sig_reg_reference(x: np.ndarray, noise: np.ndarray, config: SIGRegConfig) -> float:
    """The raw SIGReg statistic computed directly in NumPy (float64 accumulation).

    A slow, obviously-correct reference for tests and benchmarks; no coefficient.
    x: `[..., D]`, noise: `[D, slices]`.
    """
    t, phi, weights = quadrature(config)
    a = noise / np.sqrt((noise.astype(np.float64) ** 2).sum(axis=0, keepdims=True))
    p = x.reshape(-1, x.shape[-1]).astype(np.float64) @ a.astype(np.float64)  # [P, slices]
    total = 0.0
    for j in range(len(t)):
        c = np.cos(p * t[j]).mean(axis=-1)
        s = np.sin(p * t[j]).mean(axis=-1)
        total = total + weights[j] * ((c - phi[j]) ** 2 + s**2)
    return float(np.mean(config.slices * total))
