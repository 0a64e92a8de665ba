"""compute_loss: the runtime's denominator, the embedding, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soma_models.v1.configs import V1_PAD_TOKEN_ID as PAD
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.noise import sig_reg_reference
from soma_models.v1.tokenizer import tokenize
from soma_models.v1.torch.loss import compute_loss
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg

CONFIG = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=2)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits and representations are given."""

    def __init__(self, logits: torch.Tensor, reps: torch.Tensor):
        super().__init__()
        self.config = ModelConfig(embedding_dim=reps.shape[-1], num_heads=1, num_layers=1,
                                  pwff_hidden_dim=1)
        self.embedding = torch.nn.Embedding(1, 1)
        self._logits, self._reps = logits, reps

    def encode(self, token_ids, pos_ids=None):
        return self._reps

    def predict(self, reps):
        return self._logits


def test_hand_checked_denominator() -> None:
    # One row of 4 positions, the last two targets are PAD. Uniform logits over the
    # 264-token vocabulary give -log(1/264) per counted target.
    vocab = 264
    logits = torch.zeros(1, 4, vocab)
    reps = torch.zeros(1, 4, 2)
    targets = torch.tensor([[10, 20, PAD, PAD]])
    sig_reg = SIGReg(SIGRegConfig(coefficient=0.0))
    loss, embedding = compute_loss(FixedLogits(logits, reps), sig_reg, targets, targets,
                                   noise=torch.ones(2, 1024))
    # Runtime: 2 non-PAD targets summed, divided by all 4 positions.
    assert loss.item() == pytest.approx(2 * math.log(vocab) / 4, rel=1e-6)
    # PyTorch's ignore_index mean would divide by 2 instead: twice as large.
    assert loss.item() != pytest.approx(math.log(vocab), rel=1e-3)
    assert embedding.shape == (2,)


def test_loss_is_ce_plus_coefficient_times_sig_reg() -> None:
    torch.manual_seed(0)
    model = Model(CONFIG).eval()
    (batch,) = tokenize(b"The quick brown fox jumps over the lazy dog." * 3, max_seq_len=40,
                        batch_size=8)
    tokens, targets, pos = (torch.tensor(x)
                            for x in (batch.token_ids, batch.targets, batch.pos_ids))
    noise = torch.randn(16, 64)
    config = SIGRegConfig(slices=64)
    loss, embedding = compute_loss(model, SIGReg(config), tokens, targets, pos, noise)
    with torch.no_grad():
        reps = model.encode(tokens, pos)
        logp = torch.log_softmax(model.predict(reps), -1).numpy()
    t = targets.numpy()
    picked = np.take_along_axis(logp, t[..., None], -1)[..., 0]
    ce = -(picked * (t != PAD)).sum() / t.size
    sig = sig_reg_reference(reps.numpy(), noise.numpy(), config)
    assert loss.item() == pytest.approx(ce + 0.02 * sig, rel=1e-5)
    np.testing.assert_allclose(embedding.detach().numpy(), reps.numpy().mean(axis=(0, 1)),
                               rtol=1e-5, atol=1e-6)


def test_default_positions_are_per_row() -> None:
    torch.manual_seed(1)
    model = Model(CONFIG).eval()
    tokens = torch.randint(0, 256, (3, 7))
    targets = torch.roll(tokens, -1, 1)
    noise = torch.randn(16, 1024)
    sig = SIGReg()
    a, _ = compute_loss(model, sig, tokens, targets, noise=noise)
    b, _ = compute_loss(model, sig, tokens, targets, torch.arange(7).expand(3, 7), noise)
    assert a.item() == b.item()


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(2)
    model = Model(ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=2,
                              dropout_rate=0.1))
    (batch,) = tokenize(bytes(range(200)), max_seq_len=64, batch_size=4)
    loss, _ = compute_loss(model, SIGReg(), torch.tensor(batch.token_ids),
                           torch.tensor(batch.targets), torch.tensor(batch.pos_ids))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(3)
    model = Model(ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=2,
                              dropout_rate=0.5))
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(tokens), model(tokens))
        model.train()
        assert not torch.equal(model(tokens), model(tokens))


def test_small_vocab_is_refused_by_the_loss() -> None:
    model = Model(ModelConfig(embedding_dim=4, num_heads=2, num_layers=1, pwff_hidden_dim=8,
                              vocab_size=4))
    with pytest.raises(ValueError, match="vocab_size 4 is too small"):
        compute_loss(model, SIGReg(), torch.zeros(1, 2, dtype=torch.long),
                     torch.zeros(1, 2, dtype=torch.long))


def test_shape_mismatch_is_refused() -> None:
    model = Model(CONFIG)
    with pytest.raises(ValueError, match="token_ids and targets"):
        compute_loss(model, SIGReg(), torch.zeros(1, 3, dtype=torch.long),
                     torch.zeros(1, 4, dtype=torch.long))
