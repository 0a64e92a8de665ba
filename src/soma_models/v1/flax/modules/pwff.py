"""Position-wise feed-forward: Linear -> exact GELU -> Linear."""

from __future__ import annotations

import jax
from flax import nnx

from soma_models.v1.configs import ModelConfig, PositionWiseFeedForwardConfig
from soma_models.v1.flax.modules.attention import HIGHEST, INIT_STD

__all__ = ["PositionWiseFeedForward", "PositionWiseFeedForwardConfig"]


class PositionWiseFeedForward(nnx.Module):
    """`[..., D]` -> `[..., D]` through a `pwff_hidden_dim` hidden layer.

    `config`: a `PositionWiseFeedForwardConfig`, or any config with its fields.
    """

    def __init__(self, config: PositionWiseFeedForwardConfig | ModelConfig, rngs: nnx.Rngs, *,
                 output_init_std: float = INIT_STD):
        self.linear_inner = nnx.Linear(config.embedding_dim, config.pwff_hidden_dim,
                                       kernel_init=nnx.initializers.normal(INIT_STD),
                                       precision=HIGHEST, rngs=rngs)
        self.linear_outer = nnx.Linear(config.pwff_hidden_dim, config.embedding_dim,
                                       kernel_init=nnx.initializers.normal(output_init_std),
                                       precision=HIGHEST, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate,
                                   rngs=rngs if config.dropout_rate > 0.0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        # The runtime's GELU is the exact erf form, not the tanh approximation.
        hidden = jax.nn.gelu(self.linear_inner(x), approximate=False)
        return self.linear_outer(self.dropout(hidden))
