"""The stack of transformer blocks (no final norm: the model owns it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from soma_models.v1.aliases import pick
from soma_models.v1.configs import EncoderConfig, LayerConfig, ModelConfig
from soma_models.v1.flax.modules.layer import Layer

__all__ = ["Encoder", "EncoderConfig", "Layer", "LayerConfig"]


def _run_layer(layer: Layer, x: jax.Array, pos_ids: jax.Array) -> jax.Array:
    return layer(x, pos_ids)


class Encoder(nnx.Module):
    """`num_layers` pre-norm blocks: `[B, S, D]`, pos_ids `[B, S]` -> `[B, S, D]`.

    `config`: an `EncoderConfig`, or any config with its fields (`ModelConfig`).
    """

    def __init__(self, config: EncoderConfig | ModelConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
        #: Recompute each block's activations in the backward pass (saves memory).
        self.activation_checkpointing = False

    def __call__(self, input: jax.Array, pos_ids: jax.Array | None = None, *,
                 positions: jax.Array | None = None) -> jax.Array:
        """`input` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1."""
        x = input
        pos_ids = pick("Encoder", "pos_ids", pos_ids, "positions", positions)
        if pos_ids is None:
            pos_ids = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
        run = nnx.remat(_run_layer) if self.activation_checkpointing else _run_layer
        for layer in self.layers:
            x = run(layer, x, pos_ids)
        return x
