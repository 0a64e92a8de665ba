"""Every golden case of the Rust runtime through the Flax modules.

Each case is checked twice: against the golden file's own tolerance (Burn's default,
rtol 5e-3) and against the tighter bound a faithful float32 implementation meets
(SPEC §9: rtol 1e-5, 1e-4 for chains of layers). Run with `-s` to see each case's
largest deviation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.golden import assert_matches_golden, build, case_id, cases, params

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.flax.modules.layer import layer_norm
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.schema import param_specs


def _set(variable: nnx.Variable, value: np.ndarray) -> None:
    assert variable.shape == value.shape, (variable.shape, value.shape)
    variable.set_value(jnp.asarray(value))


def _linear(weight: np.ndarray, bias: np.ndarray) -> nnx.Linear:
    layer = nnx.Linear(*weight.shape, rngs=nnx.Rngs(0))
    _set(layer.kernel, weight)
    _set(layer.bias, bias)
    return layer


def _model_config(cfg: dict) -> ModelConfig:
    return ModelConfig(
        embedding_dim=cfg["embedding_dim"], num_heads=cfg["num_heads"],
        num_layers=cfg["num_layers"], pwff_hidden_dim=cfg["pwff_hidden_dim"],
        vocab_size=cfg.get("vocab_size", 4), max_wavelength=cfg["max_wavelength"],
        scale_factor=cfg["scale_factor"])


def _model_with(arrays: dict[str, np.ndarray], config: ModelConfig):
    """A full model whose canonical tensors come from `arrays`; absent ones are zeros."""
    full = {s.key: arrays.get(s.key, np.zeros(s.shape, np.float32)) for s in param_specs(config)}
    model = Model.from_arrays(full, config)
    model.eval()
    return model


def run_case(case: dict) -> np.ndarray:
    kind, cfg, inputs = case["component"], case["config"], case["inputs"]
    if kind == "param":
        # A parameter round-trips through an nnx.Param unchanged.
        return np.asarray(nnx.Param(jnp.asarray(build(case["params"]["param"])))[...])
    if kind == "embedding":
        weight = params(case)["embedding.weight"]
        embed = nnx.Embed(*weight.shape, rngs=nnx.Rngs(0))
        _set(embed.embedding, weight)
        return np.asarray(embed(jnp.asarray(inputs["tokens"])))
    if kind == "layer_norm":
        p = params(case, "layer_norm.")
        norm = layer_norm(cfg["embedding_dim"], nnx.Rngs(0))
        _set(norm.scale, p["gamma"])
        _set(norm.bias, p["beta"])
        return np.asarray(norm(jnp.asarray(build(inputs["x"]))))
    if kind == "linear":
        p = params(case, "linear.")
        return np.asarray(_linear(p["weight"], p["bias"])(jnp.asarray(build(inputs["x"]))))
    if kind == "rope":
        x = jnp.asarray(build(inputs["x"]))
        pos = np.asarray(inputs["positions"])
        return np.asarray(apply_rope(x, pos, cfg["max_wavelength"], cfg["scale_factor"]))
    if kind == "attention":
        p = params(case, "mha.")
        dim, heads = cfg["num_features"], cfg["num_heads"]
        config = ModelConfig(embedding_dim=dim, num_heads=heads, pwff_hidden_dim=1, num_layers=1,
                             max_wavelength=cfg["max_wavelength"], scale_factor=cfg["scale_factor"])
        mha = MultiHeadAttention(config, rngs=nnx.Rngs(0))
        mha.eval()
        hd = dim // heads
        for proj in ("query", "key", "value"):
            _set(getattr(mha, proj).kernel, p[f"{proj}.weight"].reshape(dim, heads, hd))
            _set(getattr(mha, proj).bias, p[f"{proj}.bias"].reshape(heads, hd))
        _set(mha.output.kernel, p["output.weight"].reshape(heads, hd, dim))
        _set(mha.output.bias, p["output.bias"])
        return np.asarray(mha(jnp.asarray(build(inputs["x"])), np.asarray(inputs["positions"])))
    if kind == "pwff":
        p = params(case)
        ff = PositionWiseFeedForward(ModelConfig(embedding_dim=cfg["embedding_dim"],
                                                 pwff_hidden_dim=cfg["pwff_hidden_dim"],
                                                 num_heads=1, num_layers=1), rngs=nnx.Rngs(0))
        ff.eval()
        ff.linear_inner = _linear(p["linear_inner.weight"], p["linear_inner.bias"])
        ff.linear_outer = _linear(p["linear_outer.weight"], p["linear_outer.bias"])
        return np.asarray(ff(jnp.asarray(build(inputs["x"]))))
    if kind == "sig_reg":
        config = SIGRegConfig(t_max=cfg["t_max"], points=cfg["points"], slices=cfg["slices"])
        stat = SIGReg(config).statistic(jnp.asarray(build(inputs["x"])),
                                        jnp.asarray(build(inputs["noise"])))
        return np.asarray(stat).reshape(1)
    config = _model_config(cfg)
    pos = np.asarray(inputs["positions"])
    if kind == "encoder":
        model = _model_with({f"encoder.{k}": v for k, v in params(case).items()}, config)
        return np.asarray(model.encoder(jnp.asarray(build(inputs["x"])), pos))
    model = _model_with(params(case), config)
    reps = model.encode(np.asarray(inputs["tokens"]), pos)
    return np.asarray(reps if kind == "model_encode" else model.predict(reps))


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_golden_case(case: dict) -> None:
    assert_matches_golden(case, run_case(case))


def test_every_component_is_covered() -> None:
    handled = {"embedding", "layer_norm", "linear", "param", "rope", "attention", "pwff",
               "sig_reg", "encoder", "model_encode", "model_predict"}
    assert {c["component"] for c in cases()} == handled
