"""The on-chain loss through the Flax model: semantics, SIGReg chunking, jit and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from soma_models.v1.configs import V1_PAD_TOKEN_ID, ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg, sig_reg_statistic
from soma_models.v1.noise import sig_reg_reference
from soma_models.v1.tokenizer import iter_batches

CONFIG = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4)
SIG_CONFIG = SIGRegConfig(slices=32)


@pytest.fixture(scope="module")
def batch():
    data = b"The quick brown fox jumps over the lazy dog. " * 3
    (first,) = list(iter_batches(data, max_seq_len=64, batch_size=4))
    return first


@pytest.fixture(scope="module")
def model() -> Model:
    model = Model(CONFIG, rngs=nnx.Rngs(0))
    model.eval()
    return model


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_loss_is_ce_over_every_position_plus_sig_reg(model: Model, batch) -> None:
    noise = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    loss, embedding = nnx.jit(compute_loss)(model, SIGReg(SIG_CONFIG), batch.token_ids,
                                            batch.targets, batch.pos_ids, noise)
    reps = np.asarray(model.encode(batch.token_ids, batch.pos_ids))
    logits = np.asarray(model.predict(jnp.asarray(reps)))
    targets = batch.targets
    assert (targets == V1_PAD_TOKEN_ID).sum() > 10   # PAD targets: in the count, not the sum
    picked = np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
    cross_entropy = -np.where(targets != V1_PAD_TOKEN_ID, picked, 0.0).sum() / targets.size
    want = cross_entropy + SIG_CONFIG.coefficient * sig_reg_reference(reps, noise, SIG_CONFIG)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(embedding), reps.mean(1).mean(0), rtol=1e-5, atol=1e-6)


def test_noise_is_drawn_from_the_rngs(model: Model, batch) -> None:
    def loss_with(sig_reg: SIGReg) -> float:
        return float(compute_loss(model, sig_reg, batch.token_ids, batch.targets)[0])

    sig_reg = SIGReg(SIG_CONFIG, rngs=nnx.Rngs(3))
    first, second = loss_with(sig_reg), loss_with(sig_reg)
    assert first != second                        # the stream advances
    assert loss_with(SIGReg(SIG_CONFIG, rngs=nnx.Rngs(3))) == first   # and is reproducible
    with pytest.raises(ValueError, match="without rngs"):
        loss_with(SIGReg(SIG_CONFIG))


def test_bad_inputs_are_refused(model: Model, batch) -> None:
    small = Model(ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=4,
                              vocab_size=256), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size 256 is too small"):
        compute_loss(small, SIGReg(SIG_CONFIG), batch.token_ids[:, :255] % 256,
                     batch.targets[:, :255] % 256)
    with pytest.raises(ValueError, match=r"must both be \[batch, seq_len\]"):
        compute_loss(model, SIGReg(SIG_CONFIG), batch.token_ids, batch.targets[:, :-1])
    with pytest.raises(ValueError, match="token ids must be in"):
        model.encode(np.full((1, 3), 300))
    with pytest.raises(ValueError, match="pos_ids shape"):
        model.encode(batch.token_ids, batch.pos_ids[:, :-1])
    with pytest.raises(ValueError, match="noise must be"):
        SIGReg(SIG_CONFIG).statistic(jnp.zeros((2, 3, 16)), jnp.zeros((8, 32)))


def test_sig_reg_chunks_match_one_pass() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 10, 16)).astype(np.float32)
    noise = rng.standard_normal((16, 32)).astype(np.float32)
    whole = sig_reg_statistic(x, noise, SIG_CONFIG)
    chunked = sig_reg_statistic(x, noise, SIG_CONFIG, positions_per_chunk=7)   # 30 = 4 * 7 + 2
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    np.testing.assert_allclose(float(whole), sig_reg_reference(x, noise, SIG_CONFIG), rtol=1e-5)
    grads = [jax.grad(lambda x, n=n: sig_reg_statistic(x, noise, SIG_CONFIG, n))(x)
             for n in (4096, 7)]
    np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(grads[0]), rtol=1e-5, atol=1e-7)


def test_value_and_grad_under_jit_trains(batch) -> None:
    model = Model(CONFIG, rngs=nnx.Rngs(0))
    sig_reg = SIGReg(SIG_CONFIG, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    noise = jax.random.normal(jax.random.key(2), (16, 32))

    def loss_fn(model: Model) -> jax.Array:
        return compute_loss(model, sig_reg, batch.token_ids, batch.targets, batch.pos_ids, noise)[0]

    @nnx.jit
    def step(model: Model, optimizer: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_plain_jax_grad_matches_nnx(model: Model, batch) -> None:
    """`jax.jit(jax.grad(...))` over the split parameter state gives nnx's gradients."""
    noise = jax.random.normal(jax.random.key(2), (16, 32))
    sig_reg = SIGReg(SIG_CONFIG)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def pure_loss(params):
        merged = nnx.merge(graphdef, params, rest)
        return compute_loss(merged, sig_reg, batch.token_ids, batch.targets, None, noise)[0]

    pure = jax.grad(pure_loss)(params)
    nnx_grads = nnx.grad(lambda m: compute_loss(m, sig_reg, batch.token_ids, batch.targets,
                                                None, noise)[0])(model)
    flat_pure = dict(nnx.to_flat_state(pure))
    flat_nnx = dict(nnx.to_flat_state(nnx_grads))
    assert flat_pure.keys() == flat_nnx.keys()
    for path in flat_pure:
        a, b = np.asarray(flat_pure[path][...]), np.asarray(flat_nnx[path][...])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(b).max()))
    assert any(np.abs(np.asarray(v[...])).max() > 0 for v in flat_pure.values())
