"""Causal multi-head self-attention with RoPE (SPEC §3.2), as the runtime computes it.

    q, k, v   = x W_q + b_q, x W_k + b_k, x W_v + b_v          split into H heads of hd
    q, k      = rope(q, positions), rope(k, positions)          half-split rotation
    scores    = q k^T / sqrt(hd), future entries replaced by -1e4 (not -inf)
    out       = softmax(scores) v, heads merged, then W_o, b_o

`masked_attention` is that formula written out (O(S^2) memory): the reference, and the
path taken when `MultiHeadAttention.fused` is False. By default the module runs
`causal_attention`: the same formula for sequences of one block, and beyond that
`attention_kernels.blocked_attention`, the same numbers in linear memory.

RoPE's sin/cos depend only on the positions, which every layer shares: `rope_tables`
builds them once (the encoder does, per forward) and `rotate` applies them to q and k.
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
from soma_models.v1.flax.modules.attention_kernels import (
    BLOCK_SIZE,
    blocked_attention,
    dropout_weights,
)
from soma_models.v1.flax.numerics import HIGHEST, exact_divide
from soma_models.v1.rope import rope_arguments, rope_timescales

#: RoPE's sin and cos, each float32 `[B, S, 1, hd/2]` (broadcast over heads).
RopeTables = tuple[jax.Array, jax.Array]


def rope_tables(pos_ids: jax.Array | np.ndarray, head_dim: int, max_wavelength: float,
                scale_factor: float = 1.0) -> RopeTables:
    """sin, cos `[B, S, 1, hd/2]` of angle[b, s, i] = (float32(pos) / timescale_i) /
    scale_factor, timescale_i = max_wavelength ** (2i / hd) (`rope.rope_timescales`)."""
    if scale_factor < 1.0:
        raise ValueError(f"scale_factor must be >= 1.0, got {scale_factor}")
    timescale = jnp.asarray(rope_timescales(head_dim, max_wavelength))
    if isinstance(pos_ids, np.ndarray):
        # Round int64 positions to float32 on the host: JAX would first narrow them to int32.
        pos_ids = pos_ids.astype(np.float32)
    positions = jnp.asarray(pos_ids).astype(jnp.float32)
    # A division by the timescale, not a product with an inverse frequency: they round
    # differently, and at large positions sin/cos amplify the difference.
    angle = exact_divide(positions[:, :, None], timescale)                    # [B, S, hd/2]
    if scale_factor != 1.0:
        angle = exact_divide(angle, scale_factor)
    return jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]


def rotate(x: jax.Array, rope: RopeTables) -> jax.Array:
    """Half-split rotation of `x` `[B, S, H, hd]`: concat(a cos - b sin, b cos + a sin),
    a and b the two halves of the last axis."""
    sin, cos = (t.astype(x.dtype) for t in rope)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)


def apply_rope(inputs: jax.Array, positions: jax.Array | np.ndarray | None = None,
               head_dim: int | None = None, max_wavelength: float | None = None,
               scale_factor: float | None = None, *,
               pos_ids: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Rotate `inputs` `[B, S, H, hd]` by `positions` (alias `pos_ids`) `[B, S]`.

    `rotate(inputs, rope_tables(...))`. Defaults: max_wavelength 10000, scale_factor 1.
    Also callable as `apply_rope(x, pos_ids, max_wavelength, scale_factor)` (see
    `rope.rope_arguments`).
    """
    pos_ids = pick("apply_rope", "pos_ids", pos_ids, "positions", positions)
    if pos_ids is None:
        raise TypeError("apply_rope: missing the positions (positions= or pos_ids=)")
    head_size = inputs.shape[-1]
    max_wavelength, scale_factor = rope_arguments(head_size, head_dim, max_wavelength,
                                                  scale_factor)
    return rotate(inputs, rope_tables(pos_ids, head_size, max_wavelength, scale_factor))


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
    weights = dropout_weights(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
    return jnp.einsum("...qk,...kd->...qd", weights, v, precision=HIGHEST)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, dropout_rate: float = 0.0,
                     dropout_key: jax.Array | None = None,
                     block_size: int = BLOCK_SIZE) -> jax.Array:
    """The runtime's attention in linear memory: q, k, v `[B, H, S, hd]` -> `[B, H, S, hd]`.

    Up to one block of queries the materialised formula (small, and exactly the
    reference); beyond, `attention_kernels.blocked_attention`.
    """
    if q.shape[-2] <= block_size:
        return masked_attention(q, k, v, dropout_rate, dropout_key)
    return blocked_attention(q, k, v, dropout_rate, dropout_key, block_size)


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
    Without `kernel_init`, kernels start at Flax's default; `Model` applies the V1 init
    rule (`soma_models.v1.initialization`).
    """

    def __init__(self, num_heads: int | ModelConfig | LayerConfig,
                 num_features: int | None = None, *, dtype: Any = None,
                 param_dtype: Any = jnp.float32, broadcast_dropout: bool = True,
                 dropout_rate: float | None = None, deterministic: bool | None = None,
                 precision: Any = None, kernel_init: Any = None, out_kernel_init: Any = None,
                 bias_init: Any = None, out_bias_init: Any = None, use_bias: bool = True,
                 attention_fn: Callable[..., jax.Array] | None = None,
                 max_wavelength: float | None = None, scale_factor: float | None = None,
                 rngs: nnx.Rngs, keep_rngs: bool = True):
        heads, dim, settings = attention_settings(num_heads, num_features, dropout_rate,
                                                  max_wavelength, scale_factor)
        head_dim = dim // heads
        self.num_heads = heads
        self.head_dim = head_dim
        self.max_wavelength, self.scale_factor, self.dropout_rate = settings
        self.precision = HIGHEST if precision is None else precision
        self.dtype = dtype
        self.broadcast_dropout = broadcast_dropout
        out_kernel_init = kernel_init if out_kernel_init is None else out_kernel_init
        bias_init = nnx.initializers.zeros_init() if bias_init is None else bias_init
        out_bias_init = bias_init if out_bias_init is None else out_bias_init
        inner = {} if kernel_init is None else {"kernel_init": kernel_init}
        outer = {} if out_kernel_init is None else {"kernel_init": out_kernel_init}
        common = {"use_bias": use_bias, "dtype": dtype, "param_dtype": param_dtype,
                  "precision": self.precision, "rngs": rngs}
        self.query = nnx.LinearGeneral(dim, (heads, head_dim), bias_init=bias_init,
                                       **inner, **common)
        self.key = nnx.LinearGeneral(dim, (heads, head_dim), bias_init=bias_init,
                                     **inner, **common)
        self.value = nnx.LinearGeneral(dim, (heads, head_dim), bias_init=bias_init,
                                       **inner, **common)
        self.output = nnx.LinearGeneral((heads, head_dim), dim, axis=(-2, -1),
                                        bias_init=out_bias_init, **outer, **common)
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

    def rope_tables(self, pos_ids: jax.Array | np.ndarray) -> RopeTables:
        """This module's RoPE sin/cos for positions `[B, S]` (shareable across layers
        built from the same config)."""
        return rope_tables(pos_ids, self.head_dim, self.max_wavelength, self.scale_factor)

    def __call__(self, inputs: jax.Array, pos_ids: jax.Array | np.ndarray | None = None, *,
                 deterministic: bool | None = None, rngs: nnx.Rngs | None = None,
                 positions: jax.Array | np.ndarray | None = None,
                 rope: RopeTables | None = None) -> jax.Array:
        """`inputs` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1;
        `rope`: precomputed `rope_tables(pos_ids)` (then the positions are not read).

        `deterministic` overrides the module's setting for this call; `rngs` supplies the
        dropout key (else the module's own stream).
        """
        x = inputs
        pos_ids = pick("MultiHeadAttention", "pos_ids", pos_ids, "positions", positions)
        if rope is None:
            if pos_ids is None:
                pos_ids = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
            rope = self.rope_tables(pos_ids)
        q = rotate(self.query(x), rope)
        k = rotate(self.key(x), rope)
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
