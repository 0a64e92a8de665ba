"""Causal multi-head self-attention with RoPE, exactly as the runtime computes it.

The runtime masks the future by *replacing* those scores with -1e4 (not -inf, not an
added bias). For ordinary rows that is the same as -inf, but when every visible score of
a row lies below about -1e4 the softmax gives the weight to the future positions.

`causal_attention` is exact for every row and linear in memory. Queries and keys are cut
into blocks; for each query block an online (flash-style) softmax runs over the visible
key blocks only (future blocks are skipped with `lax.cond`), which yields, per row i, the
visible part: its maximum m_i, mass l_i and weighted value sum. The S-1-i future keys all
score exactly -1e4, so their share is added analytically after shifting by the row's
overall maximum M_i = max(m_i, -1e4): mass (S-1-i) exp(-1e4 - M_i), value contribution
exp(-1e4 - M_i) * Σ_{j>i} v_j (a suffix sum of v). Each query block is
rematerialised in the backward pass, so gradients stay linear in memory too.
`masked_attention` is the plain O(S^2) formula, kept for tests and short sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_MASK_FILL_VALUE,
    LayerConfig,
    ModelConfig,
    attention_settings,
)
from soma_models.v1.rope import rope_arguments, rope_timescales

# Every matmul runs in true float32, whatever the backend's default (TF32 on GPUs).
HIGHEST = jax.lax.Precision.HIGHEST
# Queries (and keys) per block. Sequences up to this length use the materialised path.
BLOCK_SIZE = 256
INIT_STD = 0.02


def exact_divide(numerator: jax.Array, denominator: jax.Array | float) -> jax.Array:
    """`numerator / denominator`, correctly rounded even when the denominator broadcasts.

    XLA rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which is off by an ulp
    for about a quarter of RoPE's angles; at positions ~1e6 that turns into visible
    rotation errors. Materialising the broadcast behind an optimisation barrier keeps
    the true division.
    """
    shape = jnp.broadcast_shapes(jnp.shape(numerator), jnp.shape(denominator))
    denominator = jnp.broadcast_to(jnp.asarray(denominator, dtype=jnp.float32), shape)
    return numerator / jax.lax.optimization_barrier(denominator)


def apply_rope(inputs: jax.Array, positions: jax.Array | np.ndarray | None = None,
               head_dim: int | None = None, max_wavelength: float | None = None,
               scale_factor: float | None = None, *,
               pos_ids: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Rotate `inputs` `[B, S, H, hd]` by `positions` (alias `pos_ids`) `[B, S]`.

    Half-split RoPE: angle[b, s, i] = (float32(pos) / max_wavelength ** (2i / hd)) /
    scale_factor; out = concat(a cos - b sin, b cos + a sin) with a, b the two halves of
    the last axis. Defaults: max_wavelength 10000, scale_factor 1. Also callable as
    `apply_rope(x, pos_ids, max_wavelength, scale_factor)` (see `rope.rope_arguments`).
    """
    x = inputs
    pos_ids = pick("apply_rope", "pos_ids", pos_ids, "positions", positions)
    if pos_ids is None:
        raise TypeError("apply_rope: missing the positions (positions= or pos_ids=)")
    head_size = x.shape[-1]
    max_wavelength, scale_factor = rope_arguments(head_size, head_dim, max_wavelength,
                                                  scale_factor)
    if scale_factor < 1.0:
        raise ValueError(f"scale_factor must be >= 1.0, got {scale_factor}")
    timescale = jnp.asarray(rope_timescales(head_size, max_wavelength))
    if isinstance(pos_ids, np.ndarray):
        # Round int64 positions to float32 on the host: JAX would first narrow them to int32.
        pos_ids = pos_ids.astype(np.float32)
    positions = jnp.asarray(pos_ids).astype(jnp.float32)
    # A division by the timescale, not a product with an inverse frequency: they round
    # differently, and at large positions sin/cos amplify the difference.
    angle = exact_divide(positions[:, :, None], timescale)                    # [B, S, hd/2]
    if scale_factor != 1.0:
        angle = exact_divide(angle, scale_factor)
    sin = jnp.sin(angle)[:, :, None, :].astype(x.dtype)
    cos = jnp.cos(angle)[:, :, None, :].astype(x.dtype)
    a, b = x[..., : head_size // 2], x[..., head_size // 2 :]
    return jnp.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)


def _dropout(weights: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate <= 0.0 or key is None:
        return weights
    keep = jax.random.bernoulli(key, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout_rate: float = 0.0,
                     dropout_key: jax.Array | None = None) -> jax.Array:
    """The runtime's attention, materialised: q, k, v `[..., S, hd]` -> `[..., S, hd]`.

    Scores of future keys are replaced by -1e4 before the softmax. Memory O(S^2).
    """
    seq = q.shape[-2]
    scores = jnp.einsum("...qd,...kd->...qk", q, k, precision=HIGHEST) / math.sqrt(q.shape[-1])
    # A NumPy constant: jnp.triu costs XLA's CPU compiler seconds for nothing.
    future = np.triu(np.ones((seq, seq), dtype=bool), k=1)
    scores = jnp.where(future, jnp.float32(V1_MASK_FILL_VALUE), scores)
    weights = _dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    return jnp.einsum("...qk,...kd->...qd", weights, v, precision=HIGHEST)


def _pad_seq(x: jax.Array, length: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[-2] = (0, length - x.shape[-2])
    return jnp.pad(x, pad)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout_rate: float = 0.0,
                     dropout_key: jax.Array | None = None,
                     block_size: int = BLOCK_SIZE) -> jax.Array:
    """Exact causal attention in linear memory. q, k, v: `[B, H, S, hd]` -> `[B, H, S, hd]`.

    Dropout (training only) applies to the visible weights; the future keys' weights,
    exactly 0 in float32 except on pathological rows, are left undropped.
    """
    seq, head_dim = q.shape[-2], q.shape[-1]
    if seq <= block_size:
        return masked_attention(q, k, v, dropout_rate, dropout_key)
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
            weights = _dropout(weights, dropout_rate, block_key)
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


class MultiHeadAttention(nnx.Module):
    """Causal self-attention: `[B, S, D]`, positions `[B, S]` -> `[B, S, D]`.

    Kernels are split-head: query/key/value `[D, H, hd]` (bias `[H, hd]`), output
    `[H, hd, D]`; they reshape to and from the canonical flat `[D, D]`.

    Built from a config, `MultiHeadAttention(config, rngs=...)`, or as the published
    package builds it, `MultiHeadAttention(num_heads, num_features, *, ..., rngs)` with
    flax's keywords: `dtype`, `param_dtype`, `precision` (None: full float32, which the
    runtime's numbers need), `kernel_init`, `out_kernel_init`, `bias_init`,
    `out_bias_init`, `use_bias`, `deterministic`, `dropout_rate`, `max_wavelength`,
    `scale_factor`, `keep_rngs`. `attention_fn` (default: the runtime's exact attention)
    is called as flax's `dot_product_attention` is, with a boolean causal mask, so a
    custom one sees masked scores flax's way, not the runtime's -1e4 fill.
    `broadcast_dropout` is accepted; our dropout masks are drawn per element.
    """

    def __init__(self, num_heads: int | ModelConfig | LayerConfig,
                 num_features: int | None = None, *, dtype: Any = None,
                 param_dtype: Any = jnp.float32, broadcast_dropout: bool = True,
                 dropout_rate: float | None = None, deterministic: bool | None = None,
                 precision: Any = None, kernel_init: Any = None, out_kernel_init: Any = None,
                 bias_init: Any = None, out_bias_init: Any = None, use_bias: bool = True,
                 attention_fn: Callable[..., jax.Array] | None = None,
                 max_wavelength: float | None = None, scale_factor: float | None = None,
                 rngs: nnx.Rngs, keep_rngs: bool = True,
                 output_init_std: float | None = None):
        heads, dim, settings = attention_settings(num_heads, num_features, dropout_rate,
                                                  max_wavelength, scale_factor)
        head_dim = dim // heads
        self.num_heads = heads
        self.head_dim = head_dim
        self.max_wavelength, self.scale_factor, self.dropout_rate = settings
        self.precision = HIGHEST if precision is None else precision
        self.dtype = dtype
        self.broadcast_dropout = broadcast_dropout
        kernel_init = nnx.initializers.normal(INIT_STD) if kernel_init is None else kernel_init
        if out_kernel_init is None:
            out_kernel_init = (kernel_init if output_init_std is None
                               else nnx.initializers.normal(output_init_std))
        bias_init = nnx.initializers.zeros_init() if bias_init is None else bias_init
        out_bias_init = bias_init if out_bias_init is None else out_bias_init
        common = {"use_bias": use_bias, "dtype": dtype, "param_dtype": param_dtype,
                  "precision": self.precision, "rngs": rngs}
        self.query = nnx.LinearGeneral(dim, (heads, head_dim), kernel_init=kernel_init,
                                       bias_init=bias_init, **common)
        self.key = nnx.LinearGeneral(dim, (heads, head_dim), kernel_init=kernel_init,
                                     bias_init=bias_init, **common)
        self.value = nnx.LinearGeneral(dim, (heads, head_dim), kernel_init=kernel_init,
                                       bias_init=bias_init, **common)
        self.output = nnx.LinearGeneral((heads, head_dim), dim, axis=(-2, -1),
                                        kernel_init=out_kernel_init, bias_init=out_bias_init,
                                        **common)
        #: Set by `model.train()` / `model.eval()`; dropout only when False.
        self.deterministic = False if deterministic is None else deterministic
        self.dropout_rngs = (rngs["dropout"].fork() if self.dropout_rate > 0.0 and keep_rngs
                             else nnx.data(None))
        #: A custom attention (flax's calling convention); None: the runtime's attention.
        self.attention_fn = (None if attention_fn in (None, nnx.dot_product_attention)
                             else attention_fn)
        #: False forces the materialised O(S^2) path (tests, benchmarks).
        self.fused = True
        self.block_size = BLOCK_SIZE

    def __call__(self, inputs: jax.Array, pos_ids: jax.Array | np.ndarray | None = None, *,
                 deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                 positions: jax.Array | np.ndarray | None = None) -> jax.Array:
        """`inputs` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1.

        `deterministic` overrides the module's setting for this call; `rngs` supplies the
        dropout key (else the module's own stream).
        """
        x = inputs
        pos_ids = pick("MultiHeadAttention", "pos_ids", pos_ids, "positions", positions)
        if pos_ids is None:
            pos_ids = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        rope = {"max_wavelength": self.max_wavelength, "scale_factor": self.scale_factor}
        q = apply_rope(self.query(x), pos_ids, **rope)
        k = apply_rope(self.key(x), pos_ids, **rope)
        v = self.value(x)
        if deterministic is None:
            deterministic = self.deterministic
        training = not deterministic and self.dropout_rate > 0.0
        rate = self.dropout_rate if training else 0.0
        key = None
        if training:
            if rngs is not None:
                key = rngs["dropout"]()
            elif self.dropout_rngs is not None:
                key = self.dropout_rngs()
            else:
                raise ValueError("MultiHeadAttention: dropout needs a key; pass rngs= to the "
                                 "call or build the module with keep_rngs=True")
        if self.attention_fn is not None:
            seq = x.shape[1]
            mask = jnp.asarray(np.tril(np.ones((seq, seq), dtype=bool)))[None, None]
            context = self.attention_fn(q, k, v, mask=mask, dropout_rng=key, dropout_rate=rate,
                                        broadcast_dropout=self.broadcast_dropout,
                                        deterministic=not training, dtype=self.dtype,
                                        precision=self.precision)
            return self.output(context)
        q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))           # [B, H, S, hd]
        if self.fused:
            context = causal_attention(q, k, v, rate, key, self.block_size)
        else:
            context = masked_attention(q, k, v, rate, key)
        return self.output(jnp.swapaxes(context, 1, 2))                 # [B, S, H, hd] -> D
