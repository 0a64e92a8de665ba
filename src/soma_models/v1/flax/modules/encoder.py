"""The stack of transformer blocks (no final norm: the model owns it)."""

from __future__ import annotations

import jax
from flax import nnx

from soma_models.v1.configs import ModelConfig
from soma_models.v1.flax.modules.layer import Layer


def _run_layer(layer: Layer, x: jax.Array, pos_ids: jax.Array) -> jax.Array:
    return layer(x, pos_ids)


class Encoder(nnx.Module):
    """`num_layers` pre-norm blocks: `[B, S, D]`, pos_ids `[B, S]` -> `[B, S, D]`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
        #: Recompute each block's activations in the backward pass (saves memory).
        self.activation_checkpointing = False

    def __call__(self, x: jax.Array, pos_ids: jax.Array) -> jax.Array:
        run = nnx.remat(_run_layer) if self.activation_checkpointing else _run_layer
        for layer in self.layers:
            x = run(layer, x, pos_ids)
        return x
