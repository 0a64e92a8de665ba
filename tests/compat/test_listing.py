"""Every public name of the published soma-models 0.1.1 / 0.1.7 (shared/upstream-api.md)
is importable from the same module path, and the configs keep their field order."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from soma_models.v1 import revisions

_CONFIGS = ["EncoderConfig", "LayerConfig", "ModelConfig", "PositionWiseFeedForwardConfig",
            "SIGRegConfig"]
_V1_CONSTANTS = ["V1_BATCH_SIZE", "V1_EMBEDDING_DIM", "V1_EOS_TOKEN_ID", "V1_MAX_SEQ_LEN",
                 "V1_MAX_WAVELENGTH", "V1_NUM_HEADS", "V1_NUM_LAYERS", "V1_PAD_TOKEN_ID",
                 "V1_PWFF_HIDDEN_DIM", "V1_SCALE_FACTOR", "V1_SIG_REG_COEFFICIENT",
                 "V1_SIG_REG_POINTS", "V1_SIG_REG_SLICES", "V1_SIG_REG_T_MAX", "V1_VOCAB_SIZE"]
_TOP = ["Model", "ModelConfig", "SIGReg", "SIGRegConfig", "compute_loss"]

# Module -> the names the listing gives for it (both versions together).
LISTING: dict[str, list[str]] = {
    "soma_models.utils": ["flatten_dict", "remap", "unflatten_dict"],
    "soma_models.utils.dict": ["flatten_dict", "unflatten_dict"],
    "soma_models.utils.remap": ["remap"],
    "soma_models.v1": ["ARCHITECTURE_VERSION"],
    "soma_models.v1.configs": _CONFIGS + _V1_CONSTANTS,
    "soma_models.v1.tokenizer": ["ByteSequenceBatch", "TokenizedSequence", "V1_BATCH_SIZE",
                                 "V1_EOS_TOKEN_ID", "V1_MAX_SEQ_LEN", "V1_PAD_TOKEN_ID",
                                 "tokenize"],
}
for framework in ("torch", "flax"):
    base = f"soma_models.v1.{framework}"
    LISTING |= {
        base: _TOP,
        f"{base}.loss": ["Model", "SIGReg", "V1_PAD_TOKEN_ID", "compute_loss"],
        f"{base}.modules": ["Model", "SIGReg"],
        f"{base}.modules.attention": ["MultiHeadAttention", "apply_rope"],
        f"{base}.modules.encoder": ["Encoder", "EncoderConfig", "Layer", "LayerConfig"],
        f"{base}.modules.layer": ["Layer", "LayerConfig", "MultiHeadAttention",
                                  "PositionWiseFeedForward", "PositionWiseFeedForwardConfig"],
        f"{base}.modules.model": ["Encoder", "EncoderConfig", "Model", "ModelConfig",
                                  "Serializable"],
        f"{base}.modules.pwff": ["PositionWiseFeedForward", "PositionWiseFeedForwardConfig"],
        f"{base}.modules.sig_reg": ["SIGReg", "SIGRegConfig"],
    }
LISTING["soma_models.v1.torch.serde"] = ["Serde", "Serializable", "load_safetensor_into", "remap"]
LISTING["soma_models.v1.flax.serde"] = ["Serde", "Serializable", "flatten_dict", "remap",
                                        "unflatten_dict"]

CASES = [(module, name) for module, names in LISTING.items() for name in names]


@pytest.mark.parametrize(("module", "name"), CASES, ids=[f"{m}:{n}" for m, n in CASES])
def test_name_is_importable(module: str, name: str) -> None:
    assert getattr(importlib.import_module(module), name) is not None


def test_quickstart_imports() -> None:
    from soma_models.v1.flax import Model as FlaxModel
    from soma_models.v1.flax import compute_loss as flax_loss
    from soma_models.v1.torch import Model, ModelConfig, SIGReg, SIGRegConfig, compute_loss

    from soma_models.v1.configs import ModelConfig as NativeConfig
    from soma_models.v1.flax.loss import compute_loss as native_flax_loss
    from soma_models.v1.torch.loss import compute_loss as native_loss
    from soma_models.v1.torch.modules.model import Model as NativeModel
    from soma_models.v1.torch.modules.sig_reg import SIGReg as NativeSIGReg

    assert (Model, SIGReg, compute_loss, ModelConfig) == (NativeModel, NativeSIGReg, native_loss,
                                                          NativeConfig)
    assert SIGRegConfig().slices == revisions.default_revision().sig_reg_slices
    assert flax_loss is native_flax_loss and FlaxModel.__module__.endswith("flax.modules.model")


def test_same_objects_everywhere() -> None:
    """A name re-exported in several modules is one object (isinstance works across them)."""
    for name in ("Model", "SIGReg", "compute_loss"):
        for framework in ("torch", "flax"):
            objects = {id(getattr(importlib.import_module(m), name))
                       for m, names in LISTING.items()
                       if name in names and m.startswith(f"soma_models.v1.{framework}")}
            assert len(objects) == 1, (framework, name)
    for name in _CONFIGS:
        objects = {id(getattr(importlib.import_module(m), name))
                   for m, names in LISTING.items() if name in names}
        assert len(objects) == 1, name


FIELDS = {
    "EncoderConfig": ["dropout_rate", "embedding_dim", "pwff_hidden_dim", "num_layers",
                      "num_heads", "max_wavelength", "scale_factor"],
    "LayerConfig": ["dropout_rate", "embedding_dim", "pwff_hidden_dim", "num_heads",
                    "max_wavelength", "scale_factor"],
    "ModelConfig": ["dropout_rate", "embedding_dim", "pwff_hidden_dim", "num_layers",
                    "num_heads", "vocab_size", "max_wavelength", "scale_factor"],
    "PositionWiseFeedForwardConfig": ["dropout_rate", "embedding_dim", "pwff_hidden_dim"],
    "SIGRegConfig": ["t_max", "points", "slices", "coefficient"],
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_config_fields_in_published_order(name: str) -> None:
    from soma_models.v1 import configs

    cls = getattr(configs, name)
    assert [f.name for f in dataclasses.fields(cls)] == FIELDS[name]
    values = {"dropout_rate": 0.1, "embedding_dim": 32, "pwff_hidden_dim": 64, "num_layers": 3,
              "num_heads": 4, "vocab_size": 300, "max_wavelength": 500.0, "scale_factor": 2.0,
              "t_max": 2.0, "points": 9, "slices": 8, "coefficient": 0.5}
    positional = cls(*(values[f] for f in FIELDS[name]))
    assert positional == cls(**{f: values[f] for f in FIELDS[name]})


def test_config_defaults_follow_the_selected_revision() -> None:
    from soma_models.v1 import configs

    revision = revisions.default_revision()
    assert configs.EncoderConfig(0.0).num_layers == revision.num_layers
    assert configs.ModelConfig(0.0).num_layers == revision.num_layers
    assert configs.SIGRegConfig().slices == revision.sig_reg_slices
    assert configs.LayerConfig(0.0).num_heads == configs.V1_NUM_HEADS == 8
    assert configs.PositionWiseFeedForwardConfig(0.0).pwff_hidden_dim == 8192


def test_architecture_version() -> None:
    import soma_models.v1

    assert soma_models.v1.ARCHITECTURE_VERSION == 1


@pytest.mark.parametrize("bad", [{"dropout_rate": 1.0}, {"num_heads": 3}, {"embedding_dim": 0}])
def test_part_configs_refuse_bad_values_by_name(bad: dict) -> None:
    from soma_models.v1.configs import EncoderConfig, LayerConfig

    for cls in (EncoderConfig, LayerConfig):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cls(**bad)
