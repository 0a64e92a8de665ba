"""One pre-norm transformer block."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_LAYER_NORM_EPS,
    LayerConfig,
    ModelConfig,
    PositionWiseFeedForwardConfig,
)
from soma_models.v1.flax.modules.attention import MultiHeadAttention, RopeTables
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward
from soma_models.v1.flax.numerics import HIGHEST

__all__ = ["Layer", "LayerConfig", "MultiHeadAttention", "PositionWiseFeedForward",
           "PositionWiseFeedForwardConfig", "layer_norm"]


class LayerNorm(nnx.LayerNorm):
    """`nnx.LayerNorm` whose statistics, on the CPU, are sums taken as matrix products.

    Same formula: mean = sum(x) / D, var = sum((x - mean)^2) / D (biased), then
    (x - mean) * (rsqrt(var + eps) * scale) + bias. XLA:CPU hands the two row reductions
    to YNNPACK fusions that cost the `small` forward 12% more than sums taken as
    products with a ones vector (`bench_flax.py`, benchmarks/README.md). Other backends,
    masks and other reduction axes run flax's own `__call__`.
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        plain = (mask is None and self.reduction_axes in (-1, (-1,)) and self.scale is not None
                 and self.bias is not None and self.dtype in (None, jnp.float32)
                 and x.dtype == jnp.float32)
        if not plain:
            return super().__call__(x, mask=mask)
        return jax.lax.platform_dependent(x, cpu=self._sums_as_products,
                                          default=super().__call__)

    def _sums_as_products(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        ones = jnp.ones((dim,), dtype=x.dtype)
        mean = (jnp.matmul(x, ones, precision=HIGHEST) / dim)[..., None]
        deviation = x - mean
        var = (jnp.matmul(deviation * deviation, ones, precision=HIGHEST) / dim)[..., None]
        return deviation * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The runtime's LayerNorm: biased variance as the mean of squared deviations, eps 1e-5."""
    return LayerNorm(dim, epsilon=V1_LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class Layer(nnx.Module):
    """x + Attention(LN_1(x)), then x + PWFF(LN_2(x)); `[B, S, D]` -> `[B, S, D]`.

    `config`: a `LayerConfig`, or any config with its fields (`ModelConfig`,
    `EncoderConfig`). Parameters start at Flax's defaults; `Model` applies the V1 init
    rule (`soma_models.v1.initialization`).
    """

    def __init__(self, config: LayerConfig | ModelConfig, rngs: nnx.Rngs):
        self.norm_1 = layer_norm(config.embedding_dim, rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.norm_2 = layer_norm(config.embedding_dim, rngs)
        self.pwff = PositionWiseFeedForward(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate,
                                   rngs=rngs if config.dropout_rate > 0.0 else None)

    def __call__(self, context: jax.Array, pos_ids: jax.Array | None = None, *,
                 positions: jax.Array | None = None,
                 rope: RopeTables | None = None) -> jax.Array:
        """`context` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1;
        `rope`: precomputed RoPE tables (`MultiHeadAttention.rope_tables`)."""
        x = context
        pos_ids = pick("Layer", "pos_ids", pos_ids, "positions", positions)
        x = x + self.dropout(self.attention(self.norm_1(x), pos_ids, rope=rope))
        return x + self.dropout(self.pwff(self.norm_2(x)))
