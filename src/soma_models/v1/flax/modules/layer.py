"""One pre-norm transformer block."""

from __future__ import annotations

import jax
from flax import nnx

from soma_models.v1.configs import V1_LAYER_NORM_EPS, ModelConfig
from soma_models.v1.flax.modules.attention import MultiHeadAttention
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The runtime's LayerNorm: biased variance as the mean of squared deviations, eps 1e-5."""
    return nnx.LayerNorm(dim, epsilon=V1_LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class Layer(nnx.Module):
    """x + Attention(LN_1(x)), then x + PWFF(LN_2(x)); `[B, S, D]` -> `[B, S, D]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.norm_1 = layer_norm(config.embedding_dim, rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs)
        self.norm_2 = layer_norm(config.embedding_dim, rngs)
        self.pwff = PositionWiseFeedForward(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate,
                                   rngs=rngs if config.dropout_rate > 0.0 else None)

    def __call__(self, x: jax.Array, pos_ids: jax.Array) -> jax.Array:
        x = x + self.dropout(self.attention(self.norm_1(x), pos_ids))
        return x + self.dropout(self.pwff(self.norm_2(x)))
