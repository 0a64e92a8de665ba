"""Both revisions end to end, at each revision's own defaults, against NumPy (SPEC §1, §6).

`score(..., protocol=p)` is called with nothing but the revision: the sequence length,
batch size and SIGReg slices come from it. The reference takes them from SPEC §1's table,
written out below, and computes everything else independently (`numpy_reference`). The
model is small (width 16, one layer) so that sequences of 8192 stay affordable; the data
sizes are the revisions' boundaries: 1 byte, exactly one "0.1.7" batch (16,384 bytes), one
byte more, and the 1 MiB submission limit (64 "0.1.7" batches). The seed sits just below
2^64 so that `seed + k` wraps inside the longer runs.
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.v1 import numpy_reference as ref
from tests.v1.test_scoring import data_of, random_weights, sizes_of

from soma_models.v1.configs import ModelConfig
from soma_models.v1.scoring import score

# SPEC §1, written out independently of soma_models.v1.revisions.
SPEC_TABLE = {
    "0.1.1": {"max_seq_len": 8192, "batch_size": 32, "slices": 1024},
    "0.1.7": {"max_seq_len": 1024, "batch_size": 16, "slices": 256},
}
TINY = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
SEED_NEAR_TOP = 2**64 - 5  # batches 5.. draw their noise from seeds 0, 1, ...
ONE_MIB = 1 << 20
RTOL, ATOL = 1e-5, 1e-5

# (revision, bytes). The float64 reference is what costs: SIGReg alone is positions x
# slices x 17 x 2 trig calls (1 MiB: ~9e9), and 0.1.1's rows of 8192 need 8192^2 scores
# per head. Those runs are marked slow (CI deselects them; run them with -m slow).
CASES = [
    ("0.1.7", 1), ("0.1.7", 16_384), ("0.1.7", 16_385), ("0.1.1", 1),
    pytest.param("0.1.7", ONE_MIB, marks=pytest.mark.slow),
    pytest.param("0.1.1", 16_384, marks=pytest.mark.slow),
    pytest.param("0.1.1", 16_385, marks=pytest.mark.slow),
    pytest.param("0.1.1", ONE_MIB, marks=pytest.mark.slow),
]
# The torch attention's fast paths drift from float64 along rows of 8192 (up to ~1.3e-4 at
# the last position with these weights; Flax stays within ~1e-7 of the loss): SPEC §9's
# long-chain bound applies there.
TORCH_LONG_ROWS_RTOL = 1e-4


def reference(weights, data: bytes, seed: int, protocol: str) -> tuple[float, np.ndarray, int]:
    table = SPEC_TABLE[protocol]
    loss, embedding = ref.reference_score(weights, data, seed, sizes_of(TINY),
                                          table["max_seq_len"], table["batch_size"],
                                          slices=table["slices"])
    chunks = -(-len(data) // table["max_seq_len"])
    return loss, embedding, -(-chunks // table["batch_size"])


@pytest.mark.parametrize("protocol, length", CASES)
def test_each_revision_at_its_defaults_matches_numpy_in_both_frameworks(protocol, length):
    weights = random_weights(TINY, seed=length % 1000)
    data = data_of(length, seed=length % 7)
    want_loss, want_embedding, n_batches = reference(weights, data, SEED_NEAR_TOP, protocol)
    if protocol == "0.1.7":
        assert n_batches == {1: 1, 16_384: 1, 16_385: 2, ONE_MIB: 64}[length]
    for framework in ("torch", "flax"):
        got = score(weights, data, SEED_NEAR_TOP, model_config=TINY, framework=framework,
                    protocol=protocol)
        assert got.protocol == protocol
        assert got.batch_losses.shape == (n_batches,)
        rtol = TORCH_LONG_ROWS_RTOL if framework == "torch" and protocol == "0.1.1" else RTOL
        np.testing.assert_allclose(got.loss, want_loss, rtol=rtol, atol=ATOL,
                                   err_msg=f"{framework} loss")
        np.testing.assert_allclose(got.embedding, want_embedding, rtol=rtol, atol=rtol,
                                   err_msg=f"{framework} embedding")


def test_the_two_revisions_score_the_same_data_differently():
    """Same weights, data and seed: other sequence length, batch size and slices."""
    weights = random_weights(TINY, seed=3)
    data = data_of(2000, seed=3)
    new = score(weights, data, 11, model_config=TINY, protocol="0.1.7")
    old = score(weights, data, 11, model_config=TINY, protocol="0.1.1")
    latest = score(weights, data, 11, model_config=TINY, protocol="latest")
    assert (new.protocol, old.protocol, latest.protocol) == ("0.1.7", "0.1.1", "0.1.7")
    assert latest.loss == new.loss and abs(new.loss - old.loss) > 1e-4
    # Explicit settings win over the revision's (experiments only).
    as_old = score(weights, data, 11, model_config=TINY, protocol="0.1.7", max_seq_len=8192,
                   batch_size=32, sig_reg_config=_sig_reg(1024))
    np.testing.assert_allclose(as_old.loss, old.loss, rtol=1e-6)


def _sig_reg(slices: int):
    from soma_models.v1.configs import SIGRegConfig

    return SIGRegConfig(slices=slices)


def test_seed_plus_k_wraps_at_2_to_the_64():
    """Batch k of seed 2^64 - 1 + ... draws noise from (seed + k) mod 2^64, as in u64."""
    from soma_models.v1.noise import scoring_noise

    top = 2**64 - 1
    np.testing.assert_array_equal(scoring_noise(top, 1, 8, 4), scoring_noise(0, 0, 8, 4))
    np.testing.assert_array_equal(scoring_noise(top, 3, 8, 4), scoring_noise(1, 1, 8, 4))
    # A run that crosses the top: 3 batches from seed 2^64 - 2 use seeds -2, -1, 0.
    weights = random_weights(TINY, seed=5)
    data = data_of(3 * 16 * 4 - 3, seed=5)
    got = score(weights, data, 2**64 - 2, model_config=TINY, max_seq_len=16, batch_size=4,
                sig_reg_config=_sig_reg(32))
    want, _ = ref.reference_score(weights, data, 2**64 - 2, sizes_of(TINY), 16, 4, slices=32)
    np.testing.assert_allclose(got.loss, want, rtol=RTOL, atol=ATOL)
