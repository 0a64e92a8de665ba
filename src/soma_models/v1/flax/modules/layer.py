"""One pre-norm transformer block."""

from __future__ import annotations

import jax
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

__all__ = ["Layer", "LayerConfig", "MultiHeadAttention", "PositionWiseFeedForward",
           "PositionWiseFeedForwardConfig", "layer_norm"]


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The runtime's LayerNorm: biased variance as the mean of squared deviations, eps 1e-5."""
    return nnx.LayerNorm(dim, epsilon=V1_LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


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
