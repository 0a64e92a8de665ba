"""The published soma-models 0.1.x PyTorch API on our modules: constructors, call keywords,
SIGReg.compute, compute_loss's published call, Serde / Serializable / load_safetensor_into.
Each published form is compared with our native call, or with an independent computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save as safetensors_save

from soma_models.errors import WeightsError, WeightsWarning
from soma_models.safetensors_io import SafetensorsFile, to_bytes
from soma_models.v1.configs import (
    V1_PAD_TOKEN_ID,
    EncoderConfig,
    LayerConfig,
    ModelConfig,
    PositionWiseFeedForwardConfig,
    SIGRegConfig,
)
from soma_models.v1.tokenizer import tokenize
from soma_models.v1.torch import Model, SIGReg, compute_loss
from soma_models.v1.torch.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.torch.modules.encoder import Encoder
from soma_models.v1.torch.modules.layer import Layer
from soma_models.v1.torch.modules.pwff import PositionWiseFeedForward
from soma_models.v1.torch.serde import Serde, Serializable, canonical_arrays, load_safetensor_into
from tests.v1 import numpy_reference as ref
from tests.v1.test_serde import assert_every_damage_listed, write_damaged_weights

SIZES = {"embedding_dim": 16, "pwff_hidden_dim": 32, "num_heads": 2}
CONFIG = ModelConfig(0.0, num_layers=2, **SIZES)
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> Model:
    torch.manual_seed(0)
    return Model(CONFIG).eval()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (b,) = tokenize(bytes(range(40, 70)), 12, 3)                   # last row: EOS, PAD
    return tuple(torch.tensor(x) for x in (b.token_ids, b.targets, b.pos_ids))


def test_encode_with_published_keywords_matches_native_and_numpy(model, batch) -> None:
    tokens, _, pos = batch
    with torch.no_grad():
        native = model.encode(tokens, pos)
        assert torch.equal(model.encode(input=tokens, positions=pos), native)
        assert torch.equal(model(input=tokens, positions=pos), model(tokens, pos))
        assert torch.equal(model.predict(embeddings=native), model.predict(native))
    sizes = ref.Sizes(dim=16, heads=2, layers=2, hidden=32)
    want = ref.encode(canonical_arrays(model), tokens.numpy(), pos.numpy(), sizes)
    np.testing.assert_allclose(native.numpy(), want, rtol=RTOL, atol=ATOL)


def test_the_same_argument_under_both_names_is_refused(model, batch) -> None:
    tokens, _, pos = batch
    with pytest.raises(TypeError, match="pos_ids= and positions="):
        model.encode(tokens, pos, positions=pos)
    with pytest.raises(TypeError, match="token_ids= and input="):
        model.encode(tokens, input=tokens)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_encode_takes_any_integer_dtype(model, dtype) -> None:
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.encode(tokens.to(dtype)), model.encode(tokens))


def _copy(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module:
    target.load_state_dict(source.state_dict())
    return target.eval()


def test_blocks_from_part_configs_match_the_models_blocks(model, batch) -> None:
    tokens, _, pos = batch
    with torch.no_grad():
        x = model.embedding(tokens)
        encoder = _copy(Encoder(EncoderConfig(0.0, num_layers=2, **SIZES)), model.encoder)
        assert torch.equal(encoder(x, positions=pos), model.encoder(x, pos))
        assert torch.equal(encoder(input=x, positions=pos), model.encoder(x, pos))
        layer = _copy(Layer(LayerConfig(0.0, **SIZES)), model.encoder.layers[0])
        assert torch.equal(layer(context=x, positions=pos), model.encoder.layers[0](x, pos))
        pwff = _copy(PositionWiseFeedForward(PositionWiseFeedForwardConfig(0.0, 16, 32)),
                     model.encoder.layers[0].pwff)
        assert torch.equal(pwff(x), model.encoder.layers[0].pwff(x))
        # positions omitted: 0..S-1 on every row
        arange = torch.arange(x.shape[1]).expand(x.shape[:2])
        assert torch.equal(encoder(x), encoder(x, arange))


def test_attention_published_constructor_matches_config_constructor(batch) -> None:
    tokens, _, pos = batch
    config = ModelConfig(**SIZES, max_wavelength=500.0, scale_factor=2.0)
    native = MultiHeadAttention(config).eval()
    published = _copy(MultiHeadAttention(2, 16, dropout_rate=0.0, use_bias=True,
                                          max_wavelength=500.0, scale_factor=2.0), native)
    x = torch.randn(3, 12, 16)
    with torch.no_grad():
        assert torch.equal(published(x, positions=pos), native(x, pos))
        assert torch.equal(published(inputs=x, positions=pos), native(x, pos))
    unbiased = MultiHeadAttention(2, 16, use_bias=False)
    assert all(name.endswith("weight") for name, _ in unbiased.named_parameters())
    assert (unbiased.max_wavelength, unbiased.scale_factor, unbiased.dropout_rate) == (
        10_000.0, 1.0, 0.0)
    with pytest.raises(TypeError, match="num_features"):
        MultiHeadAttention(2)
    with pytest.raises(ValueError, match="even head size"):
        MultiHeadAttention(4, 4)


def _numpy_rope(x: np.ndarray, pos: np.ndarray, wavelength: float, scale: float) -> np.ndarray:
    """SPEC §3.2 written out: float32 angle pos / wavelength^(2i/hd) / scale, half split."""
    half = x.shape[-1] // 2
    frac = np.arange(half, dtype=np.float32) * np.float32(2.0) / np.float32(x.shape[-1])
    timescale = (np.float64(np.float32(wavelength)) ** frac.astype(np.float64)).astype(np.float32)
    angle = (pos.astype(np.float32)[:, :, None] / timescale) / np.float32(scale)
    sin, cos = np.sin(angle)[:, :, None, :], np.cos(angle)[:, :, None, :]
    a, b = x[..., :half], x[..., half:]
    return np.concatenate((a * cos - b * sin, b * cos + a * sin), axis=-1)


def test_apply_rope_published_and_native_forms() -> None:
    x = torch.randn(2, 7, 3, 8)
    pos = torch.arange(7).expand(2, 7) * 13
    published = apply_rope(x, pos, 8)                                   # head_dim
    assert torch.equal(published, apply_rope(x, pos, 10_000.0))          # our max_wavelength
    assert torch.equal(published, apply_rope(inputs=x, positions=pos, head_dim=8))
    np.testing.assert_allclose(published.numpy(), _numpy_rope(x.numpy(), pos.numpy(), 1e4, 1.0),
                               rtol=RTOL, atol=ATOL)
    scaled = apply_rope(x, pos, 8, 500.0, 2.0)
    assert torch.equal(scaled, apply_rope(x, pos, 500.0, 2.0))
    assert torch.equal(scaled, apply_rope(x, pos_ids=pos, max_wavelength=500.0, scale_factor=2.0))
    np.testing.assert_allclose(scaled.numpy(), _numpy_rope(x.numpy(), pos.numpy(), 500.0, 2.0),
                               rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="scale_factor"):
        apply_rope(x, pos, 500.0, 2.0, 3.0)


def test_sig_reg_compute_is_coefficient_times_statistic() -> None:
    config = SIGRegConfig(slices=32, coefficient=0.5)
    sig_reg = SIGReg(config)
    x, noise = torch.randn(2, 5, 16), torch.randn(16, 32)
    value = sig_reg.compute(x, noise)
    assert torch.equal(value, sig_reg(x, noise))
    assert torch.equal(value, 0.5 * sig_reg.statistic(x, noise))
    torch.manual_seed(3)
    drawn = sig_reg(x)
    torch.manual_seed(3)
    assert torch.equal(drawn, sig_reg.compute(x, torch.randn(16, 32)))


def test_compute_loss_published_call_keeps_the_chains_loss(model, batch) -> None:
    tokens, targets, pos = batch
    sig_reg = SIGReg(SIGRegConfig(slices=8))
    noise = torch.randn(16, 8)
    with torch.no_grad():
        loss, embedding = compute_loss(model, sig_reg, tokens, targets, noise=noise)
        # SPEC §6: cross-entropy summed over non-PAD targets, divided by *every* position.
        reps = model.encode(tokens)
        logits = model.predict(reps)
        ce = F.cross_entropy(logits.reshape(-1, 264), targets.reshape(-1),
                             ignore_index=V1_PAD_TOKEN_ID, reduction="sum") / targets.numel()
        want = ce + sig_reg.compute(reps, noise)
    assert (targets == V1_PAD_TOKEN_ID).any()
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(embedding, reps.mean(1).mean(0))
    # positions omitted == 0..S-1; positions= is the alias of pos_ids=.
    arange = torch.arange(tokens.shape[1]).expand(tokens.shape)
    with torch.no_grad():
        assert torch.equal(compute_loss(model, sig_reg, tokens, targets, arange, noise)[0], loss)
        by_name = compute_loss(model, sig_reg, tokens, targets, positions=pos, noise=noise)[0]
        assert torch.equal(by_name, compute_loss(model, sig_reg, tokens, targets, pos, noise)[0])


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_compute_loss_takes_any_integer_dtype(model, batch, dtype) -> None:
    tokens, targets, pos = batch
    sig_reg, noise = SIGReg(SIGRegConfig(slices=8)), torch.randn(16, 8)
    with torch.no_grad():
        want = compute_loss(model, sig_reg, tokens, targets, pos, noise)[0]
        got = compute_loss(model, sig_reg, tokens.to(dtype), targets.to(dtype), pos.to(dtype),
                           noise)[0]
        assert torch.equal(got, want)
        # uint8 cannot hold EOS/PAD: a full row of data bytes
        row = torch.arange(40, 52)[None]
        want = compute_loss(model, sig_reg, row, row + 1, noise=noise)[0]
        got = compute_loss(model, sig_reg, row.to(torch.uint8), (row + 1).to(torch.uint8),
                           noise=noise)[0]
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="targets must be integers"):
        compute_loss(model, sig_reg, tokens, targets.float())


def test_serde_round_trips_a_model_and_matches_save_bytes(model, tmp_path) -> None:
    data = Serde(model).serialize()
    assert data == model.save_bytes()
    fresh = Model(CONFIG)
    assert Serde(fresh).deserialize(data) is fresh
    for key, value in canonical_arrays(model).items():
        np.testing.assert_array_equal(canonical_arrays(fresh)[key], value)
    Serde(model).serialize_to_file(tmp_path / "m.safetensors")
    other = Serde(Model(CONFIG)).deserialize_from_file(tmp_path / "m.safetensors")
    assert Model.load(tmp_path / "m.safetensors", CONFIG).state_dict().keys() == \
        other.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value)
    target = Model(CONFIG)
    assert load_safetensor_into(target, data) is None
    assert all(torch.equal(target.state_dict()[k], v) for k, v in model.state_dict().items())


def test_serde_of_a_block_uses_canonical_names_relative_to_it(model) -> None:
    layer = model.encoder.layers[1]
    data = Serde(layer).serialize()
    fresh = Serde(Layer(LayerConfig(0.0, **SIZES))).deserialize(data)
    x, pos = torch.randn(1, 6, 16), torch.arange(6)[None]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, pos), layer(x, pos))
    full = canonical_arrays(model)
    block = SafetensorsFile(data)
    assert set(block.tensors) == {k.removeprefix("encoder.layers.1.") for k in full
                                  if k.startswith("encoder.layers.1.")}
    for key in block.tensors:
        np.testing.assert_array_equal(block.array(key), full[f"encoder.layers.1.{key}"])


def test_serde_refuses_a_damaged_file_listing_every_problem_and_writes_nothing(
        model, tmp_path) -> None:
    path = tmp_path / "damaged.safetensors"
    write_damaged_weights(canonical_arrays(model), path)   # not a complete model: no adoption
    target = Model(CONFIG)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        Serde(target).deserialize_from_file(path)
    assert_every_damage_listed(info.value, path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Serde(object())  # type: ignore[arg-type]


class Custom(torch.nn.Module):
    """Not one of our blocks: a bare parameter, a buffer, and a Linear and LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.param = torch.nn.Parameter(torch.zeros(4))
        self.register_buffer("count", torch.zeros(2))
        self.inner = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def test_serde_loads_the_one_param_of_a_plain_module() -> None:
    module = torch.nn.Module()
    module.param = torch.nn.Parameter(torch.zeros(4))
    values = np.arange(1, 5, dtype=np.float32)
    assert Serde(module).deserialize(safetensors_save({"param": values})) is module
    np.testing.assert_array_equal(module.param.detach().numpy(), values)


def test_serde_loads_any_module_by_its_state_dict_names() -> None:
    rng = np.random.default_rng(0)
    arrays = {"param": rng.standard_normal(4), "count": np.array([1.0, 2.0]),
              "inner.0.weight": rng.standard_normal((4, 3)),          # [in, out], canonical
              "inner.0.bias": rng.standard_normal(3),
              "inner.1.gamma": rng.standard_normal(3), "inner.1.beta": rng.standard_normal(3)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    module = Custom()
    assert Serde(module).deserialize(to_bytes(arrays)) is module
    state = module.state_dict()
    np.testing.assert_array_equal(state["param"].numpy(), arrays["param"])
    np.testing.assert_array_equal(state["count"].numpy(), arrays["count"])
    np.testing.assert_array_equal(state["inner.0.weight"].numpy(), arrays["inner.0.weight"].T)
    np.testing.assert_array_equal(state["inner.1.weight"].numpy(), arrays["inner.1.gamma"])
    # serialize writes the same names, so the bytes round-trip exactly
    assert SafetensorsFile(Serde(module).serialize()).tensors.keys() == arrays.keys()
    fresh = Serde(Custom()).deserialize(Serde(module).serialize())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_serde_names_every_key_it_cannot_place_and_writes_nothing() -> None:
    module = Custom()
    data = Serde(module).serialize()
    arrays = {k: SafetensorsFile(data).array(k) + 1 for k in SafetensorsFile(data).tensors}
    arrays["params"] = arrays.pop("param")           # a misspelt name, and one extra key
    arrays["inner.2.weight"] = np.ones(3, np.float32)
    with pytest.raises(WeightsError) as info:
        Serde(module).deserialize(to_bytes(arrays))
    placed = [p for p in info.value.problems if "could not be placed" in p]
    assert placed == [("2 key(s) the module has no parameter for, so they could not be "
                       "placed: inner.2.weight, params")]
    assert "1 missing key(s): param" in info.value.problems
    assert Serde(module).serialize() == data                       # nothing was written


def test_serde_adopts_a_model_of_other_sizes_with_one_warning(batch) -> None:
    # The file: a model of vocabulary 4, one layer; the module: CONFIG's (264, two layers).
    torch.manual_seed(1)
    small = Model(ModelConfig(0.0, num_layers=1, vocab_size=4, **SIZES)).eval()
    target = Model(CONFIG).eval()
    with pytest.warns(WeightsWarning) as caught:
        assert Serde(target).deserialize(small.save_bytes()) is target
    (warning,) = [str(w.message) for w in caught]
    assert "(vocab_size 264 -> 4, num_layers 2 -> 1)" in warning and "\n" not in warning
    assert warning.endswith("shape changed: embedding.weight, predictor.weight, predictor.bias")
    assert target.config == small.config and not target.training
    tokens, _, positions = batch
    tokens = tokens % 4
    with torch.no_grad():
        assert torch.equal(target(tokens, positions), small(tokens, positions))
        assert torch.equal(target.predict(target.encode(tokens, positions)),
                           small.predict(small.encode(tokens, positions)))
    assert target.save_bytes() == small.save_bytes()


def test_model_is_serializable_and_loads_with_the_published_call(model, tmp_path) -> None:
    assert isinstance(model, Serializable)
    model.save(tmp_path / "w.safetensors")
    for loaded in (Model.load(tmp_path / "w.safetensors", CONFIG),
                   Model.load_bytes(model.save_bytes(), CONFIG)):
        assert loaded.config == CONFIG
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
