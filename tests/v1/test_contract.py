"""ScoringContract: built once from a revision, overridden for experiments, taken by every
scoring entry point with the same result as the parts it replaces."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tests.v1.test_scoring import SMALL, data_of, random_weights

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.contract import ScoringContract
from soma_models.v1.revisions import default_revision
from soma_models.v1.scoring import compete, score
from soma_models.v1.screening import Screener

# The published packages' constants (shared/upstream-api.md), written out independently of
# soma_models.v1.revisions: (max_seq_len, batch_size, SIGReg slices).
PUBLISHED = {"0.1.1": (8192, 32, 1024), "0.1.7": (1024, 16, 256)}


@pytest.mark.parametrize("protocol", ["0.1.1", "0.1.7", "latest"])
def test_of_a_revision_holds_its_published_settings(protocol):
    contract = ScoringContract.of(protocol)
    name = "0.1.7" if protocol == "latest" else protocol
    assert contract.protocol == contract.revision.name == name
    assert (contract.max_seq_len, contract.batch_size, contract.sig_reg.slices) == \
        PUBLISHED[name]
    assert (contract.sig_reg.t_max, contract.sig_reg.points, contract.sig_reg.coefficient) == \
        (3.0, 17, 0.02)


def test_the_default_is_the_process_wide_revision():
    assert ScoringContract.of() == ScoringContract.of(default_revision())


def test_overrides_keep_the_revision_and_the_value_is_frozen():
    base = ScoringContract.of("0.1.1")
    small = base.replace(max_seq_len=64, batch_size=4, sig_reg_config=SIGRegConfig(slices=8))
    assert (small.protocol, small.max_seq_len, small.batch_size, small.sig_reg.slices) == \
        ("0.1.1", 64, 4, 8)
    assert base.replace() is base and base.max_seq_len == 8192
    assert ScoringContract.of("0.1.1", max_seq_len=64, batch_size=4,
                              sig_reg_config=SIGRegConfig(slices=8)) == small
    with pytest.raises(dataclasses.FrozenInstanceError):
        small.max_seq_len = 1  # type: ignore[misc]


def test_resolve_takes_a_contract_or_a_protocol_never_two_revisions():
    contract = ScoringContract.of("0.1.7", batch_size=2)
    assert ScoringContract.resolve(contract) is contract
    assert ScoringContract.resolve(contract, "latest") is contract  # the same revision
    assert ScoringContract.resolve(contract, max_seq_len=8).max_seq_len == 8
    assert ScoringContract.resolve(None, "0.1.1") == ScoringContract.of("0.1.1")
    with pytest.raises(ValueError, match="protocol='0.1.1' contradicts the contract's "
                                         "revision '0.1.7'"):
        ScoringContract.resolve(contract, "0.1.1")
    with pytest.raises(TypeError, match="contract must be a ScoringContract, got str"):
        ScoringContract.resolve("0.1.7")  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", ["0.1.1", "0.1.7"])
def test_scoring_with_a_contract_equals_scoring_with_its_parts(protocol):
    """score, compete and Screener give bit-identical results and name the contract's
    revision, whichever process-wide revision is in force."""
    weights = [random_weights(SMALL, 1), random_weights(SMALL, 2)]
    data = data_of(150)
    sig_reg = SIGRegConfig(slices=48)
    contract = ScoringContract.of(protocol, max_seq_len=16, batch_size=4, sig_reg_config=sig_reg)
    parts = {"protocol": protocol, "max_seq_len": 16, "batch_size": 4, "sig_reg_config": sig_reg}
    by_contract = score(weights[0], data, 7, model_config=SMALL, contract=contract)
    by_parts = score(weights[0], data, 7, model_config=SMALL, **parts)
    assert by_contract.protocol == by_parts.protocol == protocol
    assert by_contract.loss == by_parts.loss
    np.testing.assert_array_equal(by_contract.embedding, by_parts.embedding)
    competition = compete(weights, data, 7, model_config=SMALL, contract=contract)
    assert competition.protocol == protocol
    assert competition.losses == compete(weights, data, 7, model_config=SMALL, **parts).losses
    screener = Screener(weights, np.ones(SMALL.embedding_dim), 7, model_config=SMALL,
                        contract=contract)
    assert screener.contract == contract and screener.revision.name == protocol
    assert screener.run_id() == Screener(weights, np.ones(SMALL.embedding_dim), 7,
                                         model_config=SMALL, **parts).run_id()
