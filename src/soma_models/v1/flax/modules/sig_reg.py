"""SIGReg: how far projected representations are from a standard Gaussian (SPEC §5).

For unit directions A (noise columns normalised), p = x @ A is compared, per position,
with N(0, 1) through its empirical characteristic function over the slices. We never
build the `[positions, slices, points]` tensor: positions are processed in chunks
(`lax.map`), and each quadrature point in turn (`lax.scan`); chunks and points are
rematerialised in the backward pass, so memory stays a few `[chunk, slices]` buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.flax.numerics import HIGHEST, exact_divide, sin_cos
from soma_models.v1.noise import quadrature

# Positions per chunk: [chunk, slices] float32 temporaries stay around 16 MB at 1024 slices.
POSITIONS_PER_CHUNK = 4096


def _point_term(p: jax.Array, t_j: jax.Array, phi_j: jax.Array, w_j: jax.Array) -> jax.Array:
    """w_j ((c_j - phi_j)^2 + z_j^2) per position, c_j / z_j = mean over slices of cos / sin."""
    sin_pt, cos_pt = sin_cos(p * t_j)
    c = cos_pt.mean(axis=-1)
    z = sin_pt.mean(axis=-1)
    return w_j * ((c - phi_j) ** 2 + z * z)


def _chunk_values(x: jax.Array, directions: jax.Array, t: jax.Array, phi: jax.Array,
                  weights: jax.Array) -> jax.Array:
    """Per position of the chunk `[P]`: slices * Σ_j w_j ((c_j - phi_j)^2 + z_j^2).

    The points are a `lax.scan` whose step is rematerialised: the backward pass keeps
    `p` and recomputes one point's cos/sin at a time, instead of holding all of them.
    """
    p = jnp.matmul(x, directions, precision=HIGHEST)                 # [P, slices]
    term = jax.checkpoint(_point_term)

    def add_point(total: jax.Array, point: tuple[jax.Array, ...]):
        return total + term(p, *point), None

    total, _ = jax.lax.scan(add_point, jnp.zeros(p.shape[0], dtype=p.dtype), (t, phi, weights))
    return p.shape[-1] * total


def _chunk_sum(x: jax.Array, valid: jax.Array, directions: jax.Array, t: jax.Array,
               phi: jax.Array, weights: jax.Array) -> jax.Array:
    """Σ over the chunk's valid positions of the per-position values."""
    return jnp.where(valid, _chunk_values(x, directions, t, phi, weights), 0.0).sum()


def _prepare(x: jax.Array, noise: jax.Array, config: SIGRegConfig) -> tuple[jax.Array, ...]:
    """(x as `[P, D]`, unit directions `[D, slices]`, t, phi, weights `[points]`)."""
    x = jnp.asarray(x)
    noise = jnp.asarray(noise, dtype=jnp.float32)
    if noise.ndim != 2 or noise.shape[0] != x.shape[-1]:
        raise ValueError(f"noise must be [embedding_dim={x.shape[-1]}, slices], "
                         f"got {list(noise.shape)}")
    t, phi, weights = (jnp.asarray(a) for a in quadrature(config))
    directions = exact_divide(noise, jnp.sqrt(jnp.sum(noise * noise, axis=0, keepdims=True)))
    return x.reshape(-1, x.shape[-1]), directions, t, phi, weights


def _chunked(flat: jax.Array, positions_per_chunk: int) -> tuple[jax.Array, jax.Array]:
    """`[P, D]` zero-padded to whole chunks `[chunks, chunk, D]`, and which positions are real."""
    positions = flat.shape[0]
    chunks = -(-positions // positions_per_chunk)
    padded = chunks * positions_per_chunk
    flat = jnp.pad(flat, ((0, padded - positions), (0, 0)))
    valid = jnp.arange(padded) < positions
    return (flat.reshape(chunks, positions_per_chunk, -1),
            valid.reshape(chunks, positions_per_chunk))


def sig_reg_statistic(x: jax.Array, noise: jax.Array, config: SIGRegConfig,
                      positions_per_chunk: int = POSITIONS_PER_CHUNK) -> jax.Array:
    """Raw SIGReg statistic (no coefficient) of x `[..., D]` with noise `[D, slices]`."""
    flat, directions, t, phi, weights = _prepare(x, noise, config)
    positions = flat.shape[0]
    chunk_sum = jax.checkpoint(
        lambda chunk, valid: _chunk_sum(chunk, valid, directions, t, phi, weights))
    if positions <= positions_per_chunk:
        total = chunk_sum(flat, jnp.ones(positions, dtype=bool))
    else:
        sums = jax.lax.map(lambda args: chunk_sum(*args), _chunked(flat, positions_per_chunk))
        total = sums.sum()
    return total / positions


def sig_reg_position_values(x: jax.Array, noise: jax.Array, config: SIGRegConfig,
                            positions_per_chunk: int = POSITIONS_PER_CHUNK) -> jax.Array:
    """Per-position SIGReg values v `x.shape[:-1]` (no coefficient).

    The statistic is their mean; screening sums them per row to keep the rows of
    different samples apart in one forward pass.
    """
    flat, directions, t, phi, weights = _prepare(x, noise, config)
    positions = flat.shape[0]

    def values(chunk: jax.Array) -> jax.Array:
        return _chunk_values(chunk, directions, t, phi, weights)

    if positions <= positions_per_chunk:
        out = values(flat)
    else:
        chunks, _ = _chunked(flat, positions_per_chunk)
        out = jax.lax.map(values, chunks).reshape(-1)[:positions]
    return out.reshape(x.shape[:-1])


class SIGReg(nnx.Module):
    """`coefficient * SIGReg(x)`, so that `loss = cross_entropy + sig_reg(x)`.

    Without `noise`, the `[D, slices]` standard-normal noise is drawn with `jax.random`
    from the "sig_reg" stream of `rngs` (which falls back to the default stream).
    """

    def __init__(self, config: SIGRegConfig | None = None, rngs: nnx.Rngs | None = None):
        self.config = config or SIGRegConfig()
        self.rngs = rngs["sig_reg"].fork() if rngs is not None else nnx.data(None)

    def statistic(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """The raw statistic (what the runtime's SIGReg module returns)."""
        if noise is None:
            if self.rngs is None:
                raise ValueError("SIGReg was built without rngs: pass noise=[D, slices] "
                                 "explicitly or construct SIGReg(config, rngs=nnx.Rngs(...))")
            noise = jax.random.normal(self.rngs(), (x.shape[-1], self.config.slices),
                                      dtype=jnp.float32)
        return sig_reg_statistic(x, noise, self.config)

    def __call__(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """`coefficient * statistic` of x `[..., D]`; noise `[D, slices]` (None: drawn)."""
        return self.config.coefficient * self.statistic(x, noise)

    def compute(self, x: jax.Array, noise: jax.Array) -> jax.Array:
        """`coefficient * statistic` with the given noise (the published package's name)."""
        return self(x, noise)
