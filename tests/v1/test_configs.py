from __future__ import annotations

import pytest

from soma_models.v1 import configs
from soma_models.v1.configs import ModelConfig, SIGRegConfig


def test_defaults_are_the_networks_v1() -> None:
    # The default revision is "0.1.7" (the test run does not set SOMA_MODELS_PROTOCOL).
    c = ModelConfig()
    assert (c.embedding_dim, c.num_heads, c.num_layers, c.pwff_hidden_dim, c.vocab_size) == (
        2048, 8, 24, 8192, 264)
    assert c.head_dim == 256 and c.max_wavelength == 10_000.0 and c.scale_factor == 1.0
    s = SIGRegConfig()
    assert (s.t_max, s.points, s.slices, s.coefficient) == (3.0, 17, 256, 0.02)
    assert (configs.V1_PAD_TOKEN_ID, configs.V1_EOS_TOKEN_ID) == (256, 257)
    assert (configs.V1_MAX_SEQ_LEN, configs.V1_BATCH_SIZE) == (1024, 16)
    assert configs.V1_NUM_LAYERS == 24 and configs.V1_SIG_REG_SLICES == 256


@pytest.mark.parametrize("protocol, layers, slices", [
    ("0.1.1", 32, 1024), ("0.1.7", 24, 256), ("latest", 24, 256)])
def test_for_protocol_builds_either_revision(protocol: str, layers: int, slices: int) -> None:
    assert ModelConfig.for_protocol(protocol).num_layers == layers
    assert configs.preset("v1", protocol).num_layers == layers
    assert SIGRegConfig.for_protocol(protocol).slices == slices
    assert ModelConfig.for_protocol(protocol, num_layers=2).num_layers == 2


@pytest.mark.parametrize("kwargs, field", [
    ({"num_heads": 3}, "num_heads"),
    ({"embedding_dim": 12, "num_heads": 4}, "head_dim"),
    ({"scale_factor": 0.5}, "scale_factor"),
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"num_layers": -1}, "num_layers"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"pwff_hidden_dim": 0}, "pwff_hidden_dim"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
])
def test_impossible_model_configs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"points": 1}, "points"), ({"slices": 0}, "slices"), ({"t_max": 0.0}, "t_max"),
])
def test_impossible_sig_reg_configs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SIGRegConfig(**kwargs)


def test_small_vocab_is_legal_but_not_for_the_contract() -> None:
    c = ModelConfig(vocab_size=4, embedding_dim=4, num_heads=2, num_layers=1, pwff_hidden_dim=8)
    with pytest.raises(ValueError, match="vocab_size 4 is too small"):
        c.require_contract_vocab()
    ModelConfig(vocab_size=258, embedding_dim=4, num_heads=2).require_contract_vocab()


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown config preset 'huge'"):
        configs.preset("huge")
