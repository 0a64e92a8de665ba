"""The Flax encoder computes RoPE's sin/cos once per forward and hands them to every
layer; that must be bit-for-bit what each layer computing its own gives (outputs and
gradients, eager and jitted, with and without rematerialisation)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from soma_models.v1.configs import ModelConfig
from soma_models.v1.flax.modules.attention import apply_rope, rope_tables, rotate
from soma_models.v1.flax.modules.model import Model

CONFIG = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=3, num_heads=4)


def _inputs(seed: int = 0) -> tuple[jax.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((2, 40, CONFIG.embedding_dim)), jnp.float32)
    # Large, uneven positions: where the angle's rounding is most visible.
    pos = rng.integers(0, 2**20, (2, 40)).astype(np.int64)
    return x, pos


def _own_tables(layer, x: jax.Array, pos) -> jax.Array:
    return layer(x, pos)             # no tables given: the layer computes its own


def _per_layer(encoder, x: jax.Array, pos) -> jax.Array:
    """The encoder's loop (remat included) with every layer computing its own tables."""
    run = nnx.remat(_own_tables) if encoder.activation_checkpointing else _own_tables
    for layer in encoder.layers:
        x = run(layer, x, pos)
    return x


def test_tables_match_apply_rope() -> None:
    x, pos = _inputs()
    heads = x.reshape(2, 40, CONFIG.num_heads, CONFIG.head_dim)
    tables = rope_tables(pos, CONFIG.head_dim, CONFIG.max_wavelength)
    np.testing.assert_array_equal(np.asarray(rotate(heads, tables)),
                                  np.asarray(apply_rope(heads, pos, CONFIG.max_wavelength)))


@pytest.mark.parametrize("remat", [False, True])
def test_shared_tables_are_bit_identical(remat: bool) -> None:
    encoder = Model(CONFIG, rngs=nnx.Rngs(0)).encoder
    encoder.activation_checkpointing = remat
    x, pos = _inputs(1)
    probe = jax.random.normal(jax.random.key(2), x.shape)

    def shared(enc, x):
        return jnp.sum(enc(x, pos) * probe)

    def own(enc, x):
        return jnp.sum(_per_layer(enc, x, pos) * probe)

    np.testing.assert_array_equal(np.asarray(encoder(x, pos)),
                                  np.asarray(_per_layer(encoder, x, pos)))
    for jit in (False, True):
        grads = []
        for objective in (shared, own):
            grad = nnx.grad(objective, argnums=(0, 1))
            grads.append(jax.tree.leaves((nnx.jit(grad) if jit else grad)(encoder, x)))
        for a, b in zip(*grads, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
