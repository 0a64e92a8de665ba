"""The on-chain loss through the Flax model: semantics, noise, SIGReg chunking.

Gradients are checked against PyTorch in tests/v1/test_cross_framework.py (nnx.grad and
plain jax.grad) and training under nnx.jit in tests/examples/test_flax_train_step.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
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


@nnx.jit
def _loss_and_outputs(model: Model, sig_reg: SIGReg, token_ids, targets, pos_ids, noise):
    loss, embedding = compute_loss(model, sig_reg, token_ids, targets, pos_ids, noise)
    reps = model.encode(token_ids, pos_ids)
    return loss, embedding, reps, model.predict(reps)


def test_loss_is_ce_over_every_position_plus_sig_reg(model: Model, batch) -> None:
    noise = np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)
    loss, embedding, reps, logits = _loss_and_outputs(model, SIGReg(SIG_CONFIG), batch.token_ids,
                                                    batch.targets, batch.pos_ids, noise)
    reps, logits = np.asarray(reps), np.asarray(logits)
    targets = batch.targets
    assert (targets == V1_PAD_TOKEN_ID).sum() > 10   # PAD targets: in the count, not the sum
    picked = np.take_along_axis(_log_softmax64(logits), targets[..., None], -1)[..., 0]
    cross_entropy = -np.where(targets != V1_PAD_TOKEN_ID, picked, 0.0).sum() / targets.size
    want = cross_entropy + SIG_CONFIG.coefficient * sig_reg_reference(reps, noise, SIG_CONFIG)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(embedding), reps.mean(1).mean(0), rtol=1e-5, atol=1e-6)


def test_noise_is_drawn_from_the_rngs(model: Model, batch) -> None:
    loss_fn = nnx.jit(lambda model, sig_reg: compute_loss(model, sig_reg, batch.token_ids,
                                                          batch.targets)[0])
    sig_reg = SIGReg(SIG_CONFIG, rngs=nnx.Rngs(3))
    first, second = float(loss_fn(model, sig_reg)), float(loss_fn(model, sig_reg))
    assert first != second                        # the stream advances, also under jit
    assert float(loss_fn(model, SIGReg(SIG_CONFIG, rngs=nnx.Rngs(3)))) == first  # reproducible
    with pytest.raises(ValueError, match="without rngs"):
        SIGReg(SIG_CONFIG).statistic(jnp.zeros((2, 3, 16)))


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

    @jax.jit
    def values_and_grads(x):
        # 30 positions: one pass, and 4 chunks of 7 plus a padded one.
        return [jax.value_and_grad(lambda x, n=n: sig_reg_statistic(x, noise, SIG_CONFIG, n))(x)
                for n in (4096, 7)]

    (whole, whole_grad), (chunked, chunked_grad) = values_and_grads(x)
    np.testing.assert_allclose(float(chunked), float(whole), rtol=1e-6)
    np.testing.assert_allclose(float(whole), sig_reg_reference(x, noise, SIG_CONFIG), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(chunked_grad), np.asarray(whole_grad), rtol=1e-5,
                               atol=1e-7)


def test_sig_reg_memory_is_chunked() -> None:
    """XLA's temp buffers for value and gradient at 65536 positions stay well below one
    [positions, slices] float32 tensor (the [positions, slices, points] one is never built):
    they are bounded by the chunk size, not the number of positions."""
    positions, slices = 16 * 4096, 256
    config = SIGRegConfig(slices=slices)
    x = jax.ShapeDtypeStruct((positions, 16), jnp.float32)
    noise = jax.ShapeDtypeStruct((16, slices), jnp.float32)
    value_and_grad = jax.value_and_grad(lambda x, n: sig_reg_statistic(x, n, config))
    analysis = jax.jit(value_and_grad).lower(x, noise).compile().memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes < positions * slices * 4 / 2, analysis.temp_size_in_bytes
