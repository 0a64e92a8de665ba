"""soma_models.v1.flax.train_step: the one Flax step (ShardedTrainStep and the example)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

import jax
import optax
from flax import nnx

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.train_step import decay_mask, make_optimizer, train_step

CONFIG = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=2)


def small_batch(seed: int) -> tuple[np.ndarray, ...]:
    """token_ids, targets, pos_ids `[2, 16]` and SIGReg noise `[16, 8]`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 256, (2, 16)).astype(np.int32)
    pos = np.broadcast_to(np.arange(16), (2, 16)).astype(np.int32)
    noise = rng.standard_normal((16, 8)).astype(np.float32)
    return tokens, np.roll(tokens, -1, axis=1), pos, noise


def test_weight_decay_applies_to_matrices_only():
    _, params, _ = nnx.split(Model(CONFIG, rngs=nnx.Rngs(0)), nnx.Param, ...)
    flags = jax.tree_util.tree_leaves(decay_mask(params))
    shapes = [p.shape for p in jax.tree_util.tree_leaves(params)]
    assert flags == [len(s) >= 2 for s in shapes]
    assert any(flags) and not all(flags)


def test_step_is_compute_loss_plus_masked_adamw():
    model = Model(CONFIG, rngs=nnx.Rngs(0))
    sig_reg = SIGReg(SIGRegConfig(slices=8, points=5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, targets, pos, noise = small_batch(0)
    optimizer = make_optimizer(1e-2, weight_decay=0.1, max_grad_norm=1.0)
    step = jax.jit(functools.partial(train_step, graphdef, sig_reg, optimizer))
    new_params, _, _, loss = step(params, rest, optimizer.init(params), tokens, targets, pos,
                                  noise)

    # Independently: the loss and its gradient, clipped, then optax's masked AdamW.
    def loss_of(p):
        return compute_loss(nnx.merge(graphdef, p, rest), sig_reg, tokens, targets, pos,
                            noise)[0]

    reference = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                    mask=lambda tree: jax.tree_util.tree_map(lambda p: p.ndim >= 2, tree)))

    # Jitted like the step: AdamW's first update is g / (|g| + eps), which turns the
    # last-bit differences between eager and compiled gradients of near-zero entries
    # into visible ones.
    @jax.jit
    def reference_step(params):
        want_loss, grads = jax.value_and_grad(loss_of)(params)
        updates, _ = reference.update(grads, reference.init(params), params)
        return optax.apply_updates(params, updates), want_loss

    want_params, want_loss = reference_step(params)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(new_params),
                         jax.tree_util.tree_leaves(want_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_dropout_masks_change_from_step_to_step():
    """`rest` comes out advanced: a step from the same parameters draws new masks, while
    the same `rest` gives the same masks (the step stays pure)."""
    config = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=2,
                         dropout_rate=0.5)
    model = Model(config, rngs=nnx.Rngs(0))
    model.train()
    sig_reg = SIGReg(SIGRegConfig(slices=8, points=5))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(1e-2)
    opt_state = optimizer.init(params)
    step = jax.jit(functools.partial(train_step, graphdef, sig_reg, optimizer))
    batch = small_batch(1)
    _, rest_1, _, loss_1 = step(params, rest, opt_state, *batch)
    _, _, _, again = step(params, rest, opt_state, *batch)
    _, rest_2, _, loss_2 = step(params, rest_1, opt_state, *batch)
    assert float(again) == float(loss_1)
    assert float(loss_2) != float(loss_1)
    def counters(state):       # the dropout streams' RngCount values (uint32)
        return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(state)
                if leaf.dtype == np.uint32]

    before, after = counters(rest), counters(rest_2)
    assert before and all((b > a).all() for a, b in zip(before, after, strict=True))
    # The caller's `rest` is not advanced in place, even by an eager call.
    train_step(graphdef, sig_reg, optimizer, params, rest, opt_state, *batch)
    assert all((a == b).all() for a, b in zip(before, counters(rest), strict=True))
