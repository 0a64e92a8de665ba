"""The published soma-models 0.1.x Flax API on our modules: `rngs` positional, call
keywords, the flax-style MultiHeadAttention constructor, SIGReg.compute, compute_loss's
published call, Serde / Serializable. Each published form is compared with our native
call, or with an independent computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
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
from soma_models.v1.flax import Model, SIGReg, compute_loss
from soma_models.v1.flax.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.flax.modules.encoder import Encoder
from soma_models.v1.flax.modules.layer import Layer
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward
from soma_models.v1.flax.serde import Serde, Serializable, canonical_arrays
from soma_models.v1.tokenizer import tokenize
from soma_models.v1.torch import Model as TorchModel
from soma_models.v1.torch.modules.attention import apply_rope as torch_apply_rope
from soma_models.v1.torch.serde import Serde as TorchSerde
from tests.v1 import numpy_reference as ref
from tests.v1.test_serde import assert_every_damage_listed, write_damaged_weights

SIZES = {"embedding_dim": 16, "pwff_hidden_dim": 32, "num_heads": 2}
CONFIG = ModelConfig(0.0, num_layers=2, **SIZES)
RTOL = ATOL = 1e-5


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(CONFIG, nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    (b,) = tokenize(bytes(range(40, 70)), 12, 3)                   # last row: EOS, PAD
    return tuple(np.array(x) for x in (b.token_ids, b.targets, b.pos_ids))


def _params(module: nnx.Module) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def _copy(target: nnx.Module, source: nnx.Module) -> nnx.Module:
    nnx.update(target, nnx.state(source, nnx.Param))
    return target


def test_rngs_positional_or_keyword_give_the_same_model() -> None:
    a, b = Model(CONFIG, nnx.Rngs(3)), Model(CONFIG, rngs=nnx.Rngs(3))
    jax.tree.map(np.testing.assert_array_equal, _params(a), _params(b))
    with pytest.raises(TypeError, match="rngs"):
        Model(CONFIG)


def test_encode_with_published_keywords_matches_native_and_numpy(model, batch) -> None:
    tokens, _, pos = batch
    native = model.encode(tokens, pos)
    np.testing.assert_array_equal(model.encode(input=tokens, positions=pos), native)
    np.testing.assert_array_equal(model(input=tokens, positions=pos), model(tokens, pos))
    np.testing.assert_array_equal(model.predict(embeddings=native), model.predict(native))
    sizes = ref.Sizes(dim=16, heads=2, layers=2, hidden=32)
    want = ref.encode(canonical_arrays(model), tokens, pos, sizes)
    np.testing.assert_allclose(np.asarray(native), want, rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="pos_ids= and positions="):
        model.encode(tokens, pos, positions=pos)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64])
def test_encode_takes_any_integer_dtype(model, dtype) -> None:
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    np.testing.assert_array_equal(model.encode(tokens.astype(dtype)),
                                  model.encode(tokens.astype(np.int32)))


def test_blocks_from_part_configs_match_the_models_blocks(model, batch) -> None:
    tokens, _, pos = batch
    x = model.embedding(jnp.asarray(tokens))
    encoder = _copy(Encoder(EncoderConfig(0.0, num_layers=2, **SIZES), nnx.Rngs(1)),
                    model.encoder)
    np.testing.assert_array_equal(encoder(input=x, positions=pos), model.encoder(x, pos))
    layer = _copy(Layer(LayerConfig(0.0, **SIZES), nnx.Rngs(1)), model.encoder.layers[0])
    np.testing.assert_array_equal(layer(context=x, positions=pos), model.encoder.layers[0](x, pos))
    pwff = _copy(PositionWiseFeedForward(PositionWiseFeedForwardConfig(0.0, 16, 32), nnx.Rngs(1)),
                 model.encoder.layers[0].pwff)
    np.testing.assert_array_equal(pwff(x), model.encoder.layers[0].pwff(x))
    arange = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
    np.testing.assert_array_equal(encoder(x), encoder(x, arange))


def test_attention_published_constructor_matches_config_constructor(batch) -> None:
    _, _, pos = batch
    config = ModelConfig(**SIZES, max_wavelength=500.0, scale_factor=2.0)
    native = MultiHeadAttention(config, rngs=nnx.Rngs(0))
    published = _copy(MultiHeadAttention(2, 16, dropout_rate=0.0, use_bias=True,
                                         deterministic=True, precision=None,
                                         param_dtype=jnp.float32, max_wavelength=500.0,
                                         scale_factor=2.0, rngs=nnx.Rngs(5)), native)
    x = jax.random.normal(jax.random.key(0), (3, 12, 16))
    want = native(x, pos)
    np.testing.assert_array_equal(published(x, positions=pos), want)
    np.testing.assert_array_equal(published(inputs=x, positions=pos, deterministic=True), want)
    # flax's attention_fn convention: a custom function gets [B, S, H, hd] and a causal mask
    calls = []

    def attention_fn(q, k, v, **kwargs):
        calls.append(sorted(kwargs))
        return nnx.dot_product_attention(q, k, v, **kwargs)

    custom = _copy(MultiHeadAttention(2, 16, attention_fn=attention_fn, max_wavelength=500.0,
                                      scale_factor=2.0, rngs=nnx.Rngs(5)), native)
    np.testing.assert_allclose(custom(x, positions=pos), want, rtol=RTOL, atol=ATOL)
    assert calls and "mask" in calls[0]


def test_attention_flax_keywords_take_effect() -> None:
    zeros = nnx.initializers.zeros_init()
    mha = MultiHeadAttention(2, 16, kernel_init=zeros, use_bias=False, rngs=nnx.Rngs(0))
    assert mha.query.bias is None and not np.asarray(mha.query.kernel[...]).any()
    assert not np.asarray(mha.output.kernel[...]).any()          # out_kernel_init = kernel_init
    ones = nnx.initializers.ones_init()
    mha = MultiHeadAttention(2, 16, out_kernel_init=ones, out_bias_init=ones, rngs=nnx.Rngs(0))
    assert (np.asarray(mha.output.kernel[...]) == 1).all()
    assert (np.asarray(mha.output.bias[...]) == 1).all()
    assert not np.asarray(mha.query.bias[...]).any()


def test_attention_dropout_at_call_time() -> None:
    mha = MultiHeadAttention(2, 16, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 16))
    quiet = mha(x, deterministic=True)
    noisy = mha(x, deterministic=False, rngs=nnx.Rngs(dropout=4))
    again = mha(x, deterministic=False, rngs=nnx.Rngs(dropout=4))
    assert not np.allclose(noisy, quiet)
    np.testing.assert_array_equal(noisy, again)


def test_apply_rope_published_and_native_forms() -> None:
    x = jax.random.normal(jax.random.key(2), (2, 7, 3, 8))
    pos = np.broadcast_to(np.arange(7) * 13, (2, 7))
    published = apply_rope(x, pos, 8)
    np.testing.assert_array_equal(published, apply_rope(x, pos, 10_000.0))
    np.testing.assert_array_equal(published, apply_rope(inputs=x, positions=pos, head_dim=8))
    scaled = apply_rope(x, pos, 8, 500.0, 2.0)
    np.testing.assert_array_equal(scaled, apply_rope(x, pos, 500.0, 2.0))
    want = torch_apply_rope(torch.from_numpy(np.array(x)), torch.from_numpy(pos.copy()),
                            8, 500.0, 2.0)
    np.testing.assert_allclose(np.asarray(scaled), want.numpy(), rtol=RTOL, atol=ATOL)


def test_sig_reg_rngs_positional_and_compute() -> None:
    config = SIGRegConfig(slices=32, coefficient=0.5)
    sig_reg = SIGReg(config, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 5, 16))
    noise = jax.random.normal(jax.random.key(4), (16, 32))
    value = sig_reg.compute(x, noise)
    np.testing.assert_array_equal(value, sig_reg(x, noise))
    np.testing.assert_array_equal(value, 0.5 * sig_reg.statistic(x, noise))
    drawn = [float(SIGReg(config, nnx.Rngs(9))(x)) for _ in range(2)]
    assert drawn[0] == drawn[1] and np.isfinite(drawn[0])


def test_compute_loss_published_call_keeps_the_chains_loss(model, batch) -> None:
    tokens, targets, pos = batch
    sig_reg = SIGReg(SIGRegConfig(slices=8), nnx.Rngs(0))
    noise = jax.random.normal(jax.random.key(5), (16, 8))
    loss, embedding = compute_loss(model, sig_reg, tokens, targets, noise=noise)
    reps = model.encode(tokens)
    log_probs = jax.nn.log_softmax(model.predict(reps), axis=-1)
    picked = np.take_along_axis(np.asarray(log_probs), targets[..., None], -1)[..., 0]
    ce = -np.where(targets != V1_PAD_TOKEN_ID, picked, 0.0).sum() / targets.size  # SPEC §6
    assert (targets == V1_PAD_TOKEN_ID).any()
    np.testing.assert_allclose(loss, ce + sig_reg.compute(reps, noise), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(embedding, reps.mean(1).mean(0), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(
        compute_loss(model, sig_reg, tokens, targets, positions=pos, noise=noise)[0],
        compute_loss(model, sig_reg, tokens, targets, pos, noise)[0])
    for dtype in (np.int16, np.int64, np.uint16):
        got = compute_loss(model, sig_reg, tokens.astype(dtype), targets.astype(dtype), noise=noise)
        np.testing.assert_array_equal(got[0], loss)
    row = np.arange(40, 52)[None]
    np.testing.assert_array_equal(
        compute_loss(model, sig_reg, row.astype(np.uint8), (row + 1).astype(np.uint8),
                     noise=noise)[0],
        compute_loss(model, sig_reg, row, row + 1, noise=noise)[0])
    with pytest.raises(TypeError, match="targets must be integers"):
        compute_loss(model, sig_reg, tokens, targets.astype(np.float32))


def test_serde_round_trips_and_matches_save_bytes(model, tmp_path) -> None:
    data = Serde(model).serialize()
    assert data == model.save_bytes()
    fresh = Model(CONFIG, nnx.Rngs(1))
    assert Serde(fresh).deserialize(data) is fresh
    jax.tree.map(np.testing.assert_array_equal, _params(fresh), _params(model))
    Serde(model).serialize_to_file(tmp_path / "m.safetensors")
    other = Serde(Model(CONFIG, nnx.Rngs(2))).deserialize_from_file(tmp_path / "m.safetensors")
    jax.tree.map(np.testing.assert_array_equal, _params(other), _params(model))
    loaded = Model.load(tmp_path / "m.safetensors", CONFIG, nnx.Rngs(0))    # rngs positional
    assert isinstance(loaded, Serializable) and loaded.config == CONFIG
    jax.tree.map(np.testing.assert_array_equal, _params(loaded), _params(model))


def test_serde_of_a_block_and_across_frameworks(model) -> None:
    layer = model.encoder.layers[1]
    fresh = Serde(Layer(LayerConfig(0.0, **SIZES), nnx.Rngs(3))).deserialize(
        Serde(layer).serialize())
    x, pos = np.asarray(jax.random.normal(jax.random.key(6), (1, 6, 16))), np.arange(6)[None]
    np.testing.assert_array_equal(fresh(x, pos), layer(x, pos))
    # A torch block's canonical bytes load into the Flax block, and compute the same.
    torch.manual_seed(0)
    torch_model = TorchModel(CONFIG).eval()
    flax_layer = Serde(Layer(LayerConfig(0.0, **SIZES), nnx.Rngs(3))).deserialize(
        TorchSerde(torch_model.encoder.layers[0]).serialize())
    with torch.no_grad():
        want = torch_model.encoder.layers[0](torch.from_numpy(np.array(x)),
                                             torch.from_numpy(pos)).numpy()
    np.testing.assert_allclose(np.asarray(flax_layer(x, positions=pos)), want,
                               rtol=RTOL, atol=ATOL)


def test_serde_refuses_a_damaged_file_listing_every_problem_and_writes_nothing(
        model, tmp_path) -> None:
    path = tmp_path / "damaged.safetensors"
    write_damaged_weights(canonical_arrays(model), path)   # not a complete model: no adoption
    target = Model(CONFIG, nnx.Rngs(1))
    before = _params(target)
    with pytest.raises(WeightsError) as info:
        Serde(target).deserialize_from_file(path)
    assert_every_damage_listed(info.value, path)
    jax.tree.map(np.testing.assert_array_equal, _params(target), before)


class Custom(nnx.Module):
    """Not one of our blocks: a bare parameter, a batch statistic, a nested module with a
    Linear and a LayerNorm, and an RNG stream (which is not a weight)."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.param = nnx.Param(jnp.zeros((4,)))
        self.count = nnx.BatchStat(jnp.zeros((2,)))
        self.inner = nnx.Sequential(nnx.Linear(4, 3, rngs=rngs), nnx.LayerNorm(3, rngs=rngs))
        self.dropout = nnx.Dropout(0.1, rngs=rngs)


def test_serde_loads_the_one_param_of_a_plain_module() -> None:
    class One(nnx.Module):
        def __init__(self) -> None:
            self.param = nnx.Param(jnp.zeros((4,)))

    values = np.arange(1, 5, dtype=np.float32)
    module = One()
    assert Serde(module).deserialize(safetensors_save({"param": values})) is module
    np.testing.assert_array_equal(module.param.get_value(), values)


def test_serde_loads_any_nnx_module_by_attribute_path() -> None:
    module = Custom(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    arrays = {"param": rng.standard_normal(4), "count": np.array([1.0, 2.0]),
              "inner.layers.0.weight": rng.standard_normal((4, 3)),
              "inner.layers.0.bias": rng.standard_normal(3),
              "inner.layers.1.gamma": rng.standard_normal(3),
              "inner.layers.1.beta": rng.standard_normal(3)}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    assert Serde(module).deserialize(to_bytes(arrays)) is module
    np.testing.assert_array_equal(module.param.get_value(), arrays["param"])
    np.testing.assert_array_equal(module.count.get_value(), arrays["count"])
    np.testing.assert_array_equal(module.inner.layers[0].kernel.get_value(),
                                  arrays["inner.layers.0.weight"])
    np.testing.assert_array_equal(module.inner.layers[1].scale.get_value(),
                                  arrays["inner.layers.1.gamma"])
    # serialize writes the same names (no RNG state), so the bytes round-trip exactly
    data = Serde(module).serialize()
    assert SafetensorsFile(data).tensors.keys() == arrays.keys()
    fresh = Serde(Custom(nnx.Rngs(1))).deserialize(data)
    jax.tree.map(np.testing.assert_array_equal, _params(fresh), _params(module))


def test_serde_names_every_key_it_cannot_place_and_writes_nothing() -> None:
    module = Custom(nnx.Rngs(0))
    data = Serde(module).serialize()
    arrays = {k: SafetensorsFile(data).array(k) + 1 for k in SafetensorsFile(data).tensors}
    arrays["params"] = arrays.pop("param")           # a misspelt name, and one extra key
    arrays["inner.layers.2.weight"] = np.ones(3, np.float32)
    with pytest.raises(WeightsError) as info:
        Serde(module).deserialize(to_bytes(arrays))
    placed = [p for p in info.value.problems if "could not be placed" in p]
    assert placed == [("2 key(s) the module has no parameter for, so they could not be "
                       "placed: inner.layers.2.weight, params")]
    assert "1 missing key(s): param" in info.value.problems
    assert Serde(module).serialize() == data                       # nothing was written


def test_serde_adopts_a_model_of_other_sizes_with_one_warning(batch) -> None:
    # The file: a model of vocabulary 4, one layer; the module: CONFIG's (264, two layers).
    small = Model(ModelConfig(0.0, num_layers=1, vocab_size=4, **SIZES), nnx.Rngs(5))
    target = Model(CONFIG, nnx.Rngs(1))
    target.eval()
    with pytest.warns(WeightsWarning) as caught:
        assert Serde(target).deserialize(small.save_bytes()) is target
    (warning,) = [str(w.message) for w in caught]
    assert "(vocab_size 264 -> 4, num_layers 2 -> 1)" in warning and "\n" not in warning
    assert warning.endswith("shape changed: embedding.weight, predictor.weight, predictor.bias")
    assert target.config == small.config
    assert target.encoder.layers[0].attention.deterministic                  # still eval mode
    tokens, _, positions = batch
    tokens = tokens % 4
    np.testing.assert_array_equal(target(tokens, positions), small(tokens, positions))
    np.testing.assert_array_equal(target.predict(target.encode(tokens, positions)),
                                  small.predict(small.encode(tokens, positions)))
    assert target.save_bytes() == small.save_bytes()
    # The module's graph is whole: it splits and merges as any NNX module.
    graph, state = nnx.split(target)
    np.testing.assert_array_equal(nnx.merge(graph, state)(tokens, positions),
                                  small(tokens, positions))
