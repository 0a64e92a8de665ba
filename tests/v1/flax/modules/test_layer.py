"""The Flax LayerNorm: statistics as matrix products on the CPU, flax's formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soma_models.v1.configs import V1_LAYER_NORM_EPS
from soma_models.v1.flax.modules.layer import LayerNorm, layer_norm


def _reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The runtime's LayerNorm in float64: biased variance, eps 1e-5."""
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + V1_LAYER_NORM_EPS) * scale + bias


def _norm(dim: int) -> LayerNorm:
    norm = layer_norm(dim, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    norm.scale.set_value(jnp.asarray(rng.standard_normal(dim), jnp.float32))
    norm.bias.set_value(jnp.asarray(rng.standard_normal(dim), jnp.float32))
    return norm


def test_layer_norm_matches_float64_and_flax_own() -> None:
    for dim in (64, 96, 256):                       # 96: 1/D is not a power of two
        norm = _norm(dim)
        x = (5 + 3 * np.random.default_rng(dim).standard_normal((3, 7, dim))).astype(np.float32)
        ours = np.asarray(jax.jit(lambda n, v: n(v))(norm, jnp.asarray(x)))
        flax_own = np.asarray(nnx.LayerNorm.__call__(norm, jnp.asarray(x)))
        want = _reference(x, np.asarray(norm.scale[...]), np.asarray(norm.bias[...]))
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, flax_own, rtol=1e-5, atol=2e-6)


def test_layer_norm_with_a_mask_is_flax_own() -> None:
    norm = _norm(16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(16) < 10)[None, :].repeat(4, 0)
    np.testing.assert_array_equal(np.asarray(norm(x, mask=mask)),
                                  np.asarray(nnx.LayerNorm.__call__(norm, x, mask=mask)))
