"""The runtime's causal attention (the -1e4 fill), exact and memory-linear, in JAX.

`attention.masked_attention` is the definition: future scores *replaced* by -1e4, then a
softmax over all S keys. For ordinary rows that is the same as -inf masking, but when
every visible score of a row lies below about -1e4 the softmax gives the weight to the
future positions.

`blocked_attention` computes it for every row without the `[S, S]` scores. Queries and
keys are cut into blocks of `BLOCK_SIZE`; for each query block an online (flash-style)
softmax runs over the visible key blocks only (later blocks are skipped with
`lax.cond`), which yields, per row i, the visible part: its maximum m_i, mass l_i and
weighted value sum. The S-1-i future keys all score exactly -1e4, so their share is
added analytically after shifting by the row's overall maximum M_i = max(m_i, -1e4):
mass (S-1-i) exp(-1e4 - M_i), value contribution exp(-1e4 - M_i) * Σ_{j>i} v_j (a
suffix sum of v). Each query block is rematerialised in the backward pass, so gradients
stay linear in memory too. There is no data-dependent branch and no recompute: the
fill is part of the kernel. `attention.causal_attention` uses the materialised formula
for sequences of one block and this kernel beyond.

Why the torch side uses a different kernel, and what both guarantee: docs/attention.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from soma_models.v1.configs import V1_MASK_FILL_VALUE
from soma_models.v1.flax.numerics import HIGHEST

# Queries (and keys) per block. Sequences up to this length use the materialised path.
BLOCK_SIZE = 256


def dropout_weights(weights: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on attention weights (identity without a rate or a key)."""
    if rate <= 0.0 or key is None:
        return weights
    keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, length - x.shape[-2])
    return jnp.pad(x, pad)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout_rate: float = 0.0,
                      dropout_key: jax.Array | None = None,
                      block_size: int = BLOCK_SIZE) -> jax.Array:
    """Exact causal attention in linear memory. q, k, v: `[B, H, S, hd]` -> `[B, H, S, hd]`.

    Dropout (training only) applies to the visible weights; the future keys' weights,
    exactly 0 in float32 except on pathological rows, are left undropped.
    """
    seq, head_dim = q.shape[-2], q.shape[-1]
    blocks = -(-seq // block_size)
    padded = blocks * block_size
    # Σ_{j>i} v_j for every row i (exclusive suffix sum): the future keys' value sum.
    suffix = jax.lax.cumsum(v, axis=v.ndim - 2, reverse=True)
    suffix = jnp.concatenate((suffix[..., 1:, :], jnp.zeros_like(suffix[..., :1, :])), axis=-2)
    q, k, v, suffix = (_pad_seq(t, padded) for t in (q, k, v, suffix))
    split = q.shape[:-2] + (blocks, block_size, head_dim)
    k_blocks, v_blocks = k.reshape(split), v.reshape(split)        # [B, H, n, C, hd]
    fill = jnp.float32(V1_MASK_FILL_VALUE)
    offsets = jnp.arange(block_size)

    def key_block(qi: jax.Array, q_block: jax.Array, carry, ki: jax.Array):
        """One online-softmax step of query block qi against (visible) key block ki."""
        row_max, row_sum, acc = carry
        k_block = jax.lax.dynamic_index_in_dim(k_blocks, ki, axis=-3, keepdims=False)
        v_block = jax.lax.dynamic_index_in_dim(v_blocks, ki, axis=-3, keepdims=False)
        scores = jnp.einsum("...qd,...kd->...qk", q_block, k_block,
                            precision=HIGHEST) / math.sqrt(head_dim)
        visible = (ki * block_size + offsets)[None, :] <= (qi * block_size + offsets)[:, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        rescale = jnp.exp(row_max - new_max)
        weights = jnp.exp(scores - new_max[..., None])
        row_sum = row_sum * rescale + weights.sum(axis=-1)
        if dropout_rate > 0.0 and dropout_key is not None:
            block_key = jax.random.fold_in(dropout_key, qi * blocks + ki)
            weights = dropout_weights(weights, dropout_rate, block_key)
        acc = acc * rescale[..., None] + jnp.einsum("...qk,...kd->...qd", weights, v_block,
                                                     precision=HIGHEST)
        return new_max, row_sum, acc

    def query_block(qi: jax.Array) -> jax.Array:
        q_block = jax.lax.dynamic_slice_in_dim(q, qi * block_size, block_size, axis=-2)
        suffix_block = jax.lax.dynamic_slice_in_dim(suffix, qi * block_size, block_size, axis=-2)
        rows_shape = q_block.shape[:-1]
        init = (jnp.full(rows_shape, -jnp.inf, q.dtype), jnp.zeros(rows_shape, q.dtype),
                jnp.zeros_like(q_block))

        def step(carry, ki):
            # Key blocks after the query block are entirely future: skip their compute.
            carry = jax.lax.cond(ki <= qi, lambda c: key_block(qi, q_block, c, ki),
                                 lambda c: c, carry)
            return carry, None

        (row_max, row_sum, acc), _ = jax.lax.scan(step, init, jnp.arange(blocks))
        rows = qi * block_size + offsets
        future_count = jnp.maximum(seq - 1 - rows, 0).astype(q.dtype)    # S-1-i (0 on pads)
        # Shift by the row's overall maximum, visible or fill, as the runtime's softmax
        # does: scores near -1e4 have an ulp of ~1e-3, so the shifts must stay differences
        # of raw scores (exact) rather than go through an absolute log-sum-exp.
        shift = jnp.where(future_count > 0, jnp.maximum(row_max, fill), row_max)
        visible_scale = jnp.exp(row_max - shift)
        fill_weight = jnp.where(future_count > 0, jnp.exp(fill - shift), 0.0)
        total = row_sum * visible_scale + future_count * fill_weight
        numerator = acc * visible_scale[..., None] + fill_weight[..., None] * suffix_block
        return numerator / total[..., None]

    # Rematerialise each query block in the backward pass: only its inputs are saved.
    out = jax.lax.map(jax.checkpoint(query_block), jnp.arange(blocks))  # [n, B, H, C, hd]
    out = jnp.moveaxis(out, 0, -3).reshape(q.shape)
    return out[..., :seq, :]
