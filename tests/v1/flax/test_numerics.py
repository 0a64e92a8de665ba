"""`sin_cos`: SIGReg's sine and cosine, against float64 NumPy (an independent computation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from soma_models.v1.flax.numerics import SIN_COS_REDUCTION_LIMIT, sin_cos

# XLA's own float32 sin/cos are within 3.3e-8 of float64; ours within 9.3e-8 (measured over
# 4M arguments), so 1e-7 absolute is the bound a faithful float32 implementation meets.
ABSOLUTE = 1e-7


def _arguments(rng: np.random.Generator) -> np.ndarray:
    quadrant_edges = (np.arange(-64, 65) * (np.pi / 4)).astype(np.float32)
    return np.concatenate([
        quadrant_edges, np.nextafter(quadrant_edges, np.float32(np.inf)),
        np.array([0.0, -0.0, 1e-30, -1e-30, SIN_COS_REDUCTION_LIMIT,
                  -SIN_COS_REDUCTION_LIMIT], dtype=np.float32),
        (3 * rng.standard_normal(50_000)).astype(np.float32),       # SIGReg's p * t
        rng.uniform(-SIN_COS_REDUCTION_LIMIT, SIN_COS_REDUCTION_LIMIT, 50_000)
        .astype(np.float32),
    ])


@pytest.mark.parametrize("jit", [False, True])
def test_sin_cos_matches_float64(jit: bool) -> None:
    x = _arguments(np.random.default_rng(0))
    fn = jax.jit(sin_cos) if jit else sin_cos
    sin_x, cos_x = (np.asarray(v, dtype=np.float64) for v in fn(jnp.asarray(x)))
    assert sin_x.dtype == cos_x.dtype == np.float64 and sin_x.shape == x.shape
    np.testing.assert_allclose(sin_x, np.sin(x.astype(np.float64)), rtol=0, atol=ABSOLUTE)
    np.testing.assert_allclose(cos_x, np.cos(x.astype(np.float64)), rtol=0, atol=ABSOLUTE)
    # No bias: SIGReg averages 256+ values, so a systematic error would not average out.
    assert abs(np.mean(cos_x - np.cos(x.astype(np.float64)))) < 1e-9


def test_sin_cos_beyond_the_reduction_limit_is_still_accurate() -> None:
    x = np.random.default_rng(1).uniform(-1e6, 1e6, 10_000).astype(np.float32)
    x[0] = np.float32(2 * SIN_COS_REDUCTION_LIMIT)
    sin_x, cos_x = (np.asarray(v, dtype=np.float64) for v in jax.jit(sin_cos)(jnp.asarray(x)))
    np.testing.assert_allclose(sin_x, np.sin(x.astype(np.float64)), rtol=0, atol=ABSOLUTE)
    np.testing.assert_allclose(cos_x, np.cos(x.astype(np.float64)), rtol=0, atol=ABSOLUTE)


def test_sin_cos_derivatives_are_cos_and_minus_sin() -> None:
    x = jnp.asarray(np.linspace(-20, 20, 101, dtype=np.float32))
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, 101)), jnp.float32)

    def weighted(v: jax.Array) -> jax.Array:
        sin_v, cos_v = sin_cos(v)
        return (weights[0] * sin_v + weights[1] * cos_v).sum()

    grad = np.asarray(jax.grad(weighted)(x), dtype=np.float64)
    x64 = np.asarray(x, dtype=np.float64)
    want = np.asarray(weights[0]) * np.cos(x64) - np.asarray(weights[1]) * np.sin(x64)
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-6)
