"""One pre-norm transformer block."""

from __future__ import annotations

import math

import jax
from flax import nnx

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_LAYER_NORM_EPS,
    LayerConfig,
    ModelConfig,
    PositionWiseFeedForwardConfig,
)
from soma_models.v1.flax.modules.attention import INIT_STD, MultiHeadAttention
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward

__all__ = ["Layer", "LayerConfig", "MultiHeadAttention", "PositionWiseFeedForward",
           "PositionWiseFeedForwardConfig", "layer_norm"]


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """The runtime's LayerNorm: biased variance as the mean of squared deviations, eps 1e-5."""
    return nnx.LayerNorm(dim, epsilon=V1_LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class Layer(nnx.Module):
    """x + Attention(LN_1(x)), then x + PWFF(LN_2(x)); `[B, S, D]` -> `[B, S, D]`.

    `config`: a `LayerConfig`, or any config with its fields (`ModelConfig`,
    `EncoderConfig`). The two projections feeding the residual stream (attention output,
    linear_outer) start with std 0.02 / sqrt(2 * num_layers), as in the PyTorch model; a
    `LayerConfig` has no depth, so a layer built from one starts them at 0.02.
    """

    def __init__(self, config: LayerConfig | ModelConfig, rngs: nnx.Rngs):
        depth = getattr(config, "num_layers", None)
        residual_std = INIT_STD if depth is None else INIT_STD / math.sqrt(2 * depth)
        self.norm_1 = layer_norm(config.embedding_dim, rngs)
        self.attention = MultiHeadAttention(config, rngs=rngs, output_init_std=residual_std)
        self.norm_2 = layer_norm(config.embedding_dim, rngs)
        self.pwff = PositionWiseFeedForward(config, rngs=rngs, output_init_std=residual_std)
        self.dropout = nnx.Dropout(config.dropout_rate,
                                   rngs=rngs if config.dropout_rate > 0.0 else None)

    def __call__(self, context: jax.Array, pos_ids: jax.Array | None = None, *,
                 positions: jax.Array | None = None) -> jax.Array:
        """`context` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1."""
        x = context
        pos_ids = pick("Layer", "pos_ids", pos_ids, "positions", positions)
        x = x + self.dropout(self.attention(self.norm_1(x), pos_ids))
        return x + self.dropout(self.pwff(self.norm_2(x)))
