"""The memory-linear causal attention against the materialised runtime formula.

The -1e4 fill is observable only on rows whose visible scores all lie near or below
-1e4; these tests build such rows on purpose (and assert that they occur), then check
the blocked kernel, its gradients, the module and a float64 reference agree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from soma_models.v1.configs import V1_MASK_FILL_VALUE, ModelConfig
from soma_models.v1.flax.modules.attention import (
    HIGHEST,
    MultiHeadAttention,
    apply_rope,
    causal_attention,
    masked_attention,
)


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Materialised attention with the -1e4 fill, softmax and product in float64; also
    each row's future weight.

    The scores themselves are the float32 ones (XLA's dot at HIGHEST precision): near
    -1e4 a float32 score's ulp is ~1e-3, so on rows that mix visible and future weight
    any two float32 implementations whose dot products round differently disagree at
    the 1e-3 level. Everything downstream of the scores is what is being checked.
    """
    scores = np.asarray(jnp.einsum("...qd,...kd->...qk", q, k, precision=HIGHEST)
                        / np.float32(np.sqrt(q.shape[-1])), np.float64)
    seq = q.shape[-2]
    future = np.triu(np.ones((seq, seq), bool), 1)
    scores = np.where(future, V1_MASK_FILL_VALUE, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return weights @ np.asarray(v, np.float64), (weights * future).sum(-1)


def fill_rows_inputs(seed: int, batch: int = 2, heads: int = 3, seq: int = 45, hd: int = 16):
    """Integer-valued q, k (so every float32 dot product is exact, whatever the summation
    order) whose rows' scores sit around -1e4: future-dominated rows, rows mixing visible
    and future weight, and ordinary rows (every 7th row, scores near 0)."""
    rng = np.random.default_rng(seed)
    direction = rng.integers(-3, 4, hd)
    direction[-4:] = 0  # the last 4 dims carry small per-key/per-query variations
    jitter = np.zeros((batch, heads, seq, hd), dtype=np.int64)
    jitter[..., -4:] = rng.integers(-5, 6, (batch, heads, seq, 4))
    k = 2 * direction + jitter
    # q_i = c_i * direction: score ≈ 2 c_i |direction|^2 / sqrt(hd) ≈ target_i (± jitter).
    targets = V1_MASK_FILL_VALUE + rng.uniform(-80.0, 80.0, (batch, heads, seq))
    targets[..., ::7] = rng.uniform(-50.0, 50.0, targets[..., ::7].shape)
    c = np.round(targets * np.sqrt(hd) / (2 * direction @ direction))
    jitter[..., -4:] = rng.integers(-5, 6, (batch, heads, seq, 4))
    q = c[..., None] * direction + jitter
    v = rng.standard_normal((batch, heads, seq, hd))
    return tuple(t.astype(np.float32) for t in (q, k, v))


@pytest.mark.parametrize("block_size", [4, 16])
def test_blocked_attention_matches_materialised_on_fill_rows(block_size: int) -> None:
    q, k, v = fill_rows_inputs(seed=block_size)
    want, future_weight = reference_attention(q, k, v)
    mixed = (future_weight > 1e-3) & (future_weight < 1 - 1e-3)
    dominated = future_weight > 0.999
    ordinary = future_weight < 1e-30
    assert mixed.sum() >= 10 and dominated.sum() >= 10 and ordinary.sum() >= 10
    blocked = np.asarray(jax.jit(causal_attention, static_argnums=(3, 4, 5))(
        q, k, v, 0.0, None, block_size))
    materialised = np.asarray(masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    np.testing.assert_allclose(materialised, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(blocked, materialised, rtol=1e-5, atol=1e-5)


def test_blocked_attention_gradients_match_materialised() -> None:
    q, k, v = (jnp.asarray(t) for t in fill_rows_inputs(seed=3, seq=29))
    probe = jax.random.normal(jax.random.key(0), q.shape)

    def objective(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * probe)

    blocked = jax.jit(jax.grad(objective(lambda q, k, v: causal_attention(q, k, v, block_size=8)),
                               argnums=(0, 1, 2)))(q, k, v)
    materialised = jax.jit(jax.grad(objective(masked_attention), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(blocked, materialised):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale)


def test_single_block_is_the_materialised_path() -> None:
    q, k, v = fill_rows_inputs(seed=5, seq=12)
    np.testing.assert_array_equal(np.asarray(causal_attention(q, k, v, block_size=16)),
                                  np.asarray(masked_attention(q, k, v)))


def test_module_fused_equals_materialised_with_large_weights() -> None:
    """Width 256, N(0,1) weights, keys anti-aligned with queries (each head's key kernel
    is -c_h times its query kernel, c_h putting the head's typical score at -1e4) and
    inputs a_i * base with a_i slowly varying: many rows' scores straddle -1e4, and the
    blocked and materialised paths must agree."""
    config = ModelConfig(embedding_dim=256, num_heads=4, pwff_hidden_dim=4, num_layers=1)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    mha.block_size = 16
    rng = np.random.default_rng(7)
    for proj in (mha.query, mha.value, mha.output):
        proj.kernel.set_value(jnp.asarray(rng.standard_normal(proj.kernel.shape), jnp.float32))
    seq = 70
    base = rng.standard_normal(256)
    scale = 1.0 + 0.004 * rng.standard_normal((seq, 1))
    x = (scale * base + 1e-3 * rng.standard_normal((seq, 256)))[None].astype(np.float32)
    pos = np.full((1, seq), 1000)  # one position: RoPE keeps keys anti-aligned
    q = np.asarray(apply_rope(mha.query(x), pos, config.max_wavelength))  # [1, S, H, hd]
    typical = np.mean(np.sum(q * q, -1), axis=(0, 1)) / np.sqrt(config.head_dim)   # [H]
    c = -V1_MASK_FILL_VALUE / typical
    mha.key.kernel.set_value(mha.query.kernel[...] * jnp.asarray(-c[:, None], jnp.float32))
    k = np.asarray(apply_rope(mha.key(x), pos, config.max_wavelength))
    q, k = np.swapaxes(q, 1, 2), np.swapaxes(k, 1, 2)
    _, future_weight = reference_attention(q, k, k)
    mixed = (future_weight > 1e-3) & (future_weight < 1 - 1e-3)
    print(f"rows: {mixed.sum()} mixed, {(future_weight > 0.999).sum()} future-dominated")
    assert mixed.sum() >= 5 and (future_weight > 0.999).sum() >= 5
    fused = np.asarray(mha(x, pos))
    mha.fused = False
    materialised = np.asarray(mha(x, pos))
    np.testing.assert_allclose(fused, materialised, rtol=1e-5,
                               atol=1e-5 * np.abs(materialised).max())


def test_blocked_attention_memory_is_linear() -> None:
    """XLA's own temp-buffer accounting for forward + backward at S = 8192: a small
    fraction of one [S, S] float32 score matrix (materialising would need several)."""

    def loss(q, k, v):
        return jnp.sum(causal_attention(q, k, v, block_size=256))

    seq = 8192
    spec = jax.ShapeDtypeStruct((1, 1, seq, 16), jnp.float32)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(spec, spec, spec).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes < seq * seq * 4 / 8, analysis.temp_size_in_bytes


def test_dropout_only_in_training_mode() -> None:
    config = ModelConfig(embedding_dim=16, num_heads=2, pwff_hidden_dim=8, num_layers=1,
                         dropout_rate=0.5)
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 9, 16))
    pos = np.arange(9)[None]
    first, second = np.asarray(mha(x, pos)), np.asarray(mha(x, pos))
    assert not np.allclose(first, second)  # fresh masks from the dropout stream
    mha.eval()
    np.testing.assert_array_equal(np.asarray(mha(x, pos)), np.asarray(mha(x, pos)))
    mha.dropout_rate = 0.0
    reference = np.asarray(mha(x, pos))
    mha.dropout_rate = 0.5
    np.testing.assert_array_equal(np.asarray(mha(x, pos)), reference)
