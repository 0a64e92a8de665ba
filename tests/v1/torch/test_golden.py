"""Every golden case of the Rust runtime through the PyTorch modules.

Each case is checked twice: against the golden file's own tolerance (Burn's default,
rtol 5e-3) and against the tighter bound a faithful float32 implementation meets
(SPEC §9: rtol 1e-5, 1e-4 for chains of layers).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.golden import assert_matches_golden, build, case_id, cases, params

from soma_models.v1.configs import V1_LAYER_NORM_EPS, ModelConfig, SIGRegConfig
from soma_models.v1.torch.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.pwff import PositionWiseFeedForward
from soma_models.v1.torch.modules.sig_reg import SIGReg


def _linear(weight: np.ndarray, bias: np.ndarray) -> torch.nn.Linear:
    layer = torch.nn.Linear(*weight.shape)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight.T))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer


def _attention_config(cfg: dict) -> ModelConfig:
    return ModelConfig(embedding_dim=cfg["num_features"], num_heads=cfg["num_heads"],
                       pwff_hidden_dim=1, num_layers=1, max_wavelength=cfg["max_wavelength"],
                       scale_factor=cfg["scale_factor"])


def run_case(case: dict) -> np.ndarray:
    kind, cfg, inputs = case["component"], case["config"], case["inputs"]
    with torch.no_grad():
        if kind == "param":
            return torch.from_numpy(build(case["params"]["param"])).numpy()
        if kind == "embedding":
            table = torch.from_numpy(params(case)["embedding.weight"])
            emb = torch.nn.Embedding.from_pretrained(table)
            return emb(torch.tensor(inputs["tokens"])).numpy()
        if kind == "layer_norm":
            p = params(case, "layer_norm.")
            norm = torch.nn.LayerNorm(cfg["embedding_dim"], eps=V1_LAYER_NORM_EPS)
            norm.weight.copy_(torch.from_numpy(p["gamma"]))
            norm.bias.copy_(torch.from_numpy(p["beta"]))
            return norm(torch.from_numpy(build(inputs["x"]))).numpy()
        if kind == "linear":
            p = params(case, "linear.")
            return _linear(p["weight"], p["bias"])(torch.from_numpy(build(inputs["x"]))).numpy()
        if kind == "rope":
            x = torch.from_numpy(build(inputs["x"]))
            pos = torch.tensor(inputs["positions"])
            return apply_rope(x, pos, cfg["max_wavelength"], cfg["scale_factor"]).numpy()
        if kind == "attention":
            p = params(case, "mha.")
            mha = MultiHeadAttention(_attention_config(cfg)).eval()
            for proj in ("query", "key", "value", "output"):
                setattr(mha, proj, _linear(p[f"{proj}.weight"], p[f"{proj}.bias"]))
            return mha(torch.from_numpy(build(inputs["x"])),
                       torch.tensor(inputs["positions"])).numpy()
        if kind == "pwff":
            p = params(case)
            ff = PositionWiseFeedForward(ModelConfig(embedding_dim=cfg["embedding_dim"],
                                                     pwff_hidden_dim=cfg["pwff_hidden_dim"],
                                                     num_heads=1, num_layers=1)).eval()
            ff.linear_inner = _linear(p["linear_inner.weight"], p["linear_inner.bias"])
            ff.linear_outer = _linear(p["linear_outer.weight"], p["linear_outer.bias"])
            return ff(torch.from_numpy(build(inputs["x"]))).numpy()
        if kind == "sig_reg":
            config = SIGRegConfig(t_max=cfg["t_max"], points=cfg["points"], slices=cfg["slices"])
            stat = SIGReg(config).statistic(torch.from_numpy(build(inputs["x"])),
                                            torch.from_numpy(build(inputs["noise"])))
            return stat.reshape(1).numpy()
        model_config = ModelConfig(
            embedding_dim=cfg["embedding_dim"], num_heads=cfg["num_heads"],
            num_layers=cfg["num_layers"], pwff_hidden_dim=cfg["pwff_hidden_dim"],
            vocab_size=cfg.get("vocab_size", 4), max_wavelength=cfg["max_wavelength"],
            scale_factor=cfg["scale_factor"])
        pos = torch.tensor(inputs["positions"])
        if kind == "encoder":
            arrays = {f"encoder.{k}": v for k, v in params(case).items()}
            model = _model_with(arrays, model_config)
            return model.encoder(torch.from_numpy(build(inputs["x"])), pos).numpy()
        model = _model_with(params(case), model_config)
        reps = model.encode(torch.tensor(inputs["tokens"]), pos)
        return (reps if kind == "model_encode" else model.predict(reps)).numpy()


def _model_with(arrays: dict[str, np.ndarray], config: ModelConfig):
    """A full model whose canonical tensors come from `arrays`; absent ones are zeros."""
    from soma_models.v1.schema import param_specs

    full = {s.key: arrays.get(s.key, np.zeros(s.shape, np.float32)) for s in param_specs(config)}
    return Model.from_arrays(full, config).eval()


@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_golden_case(case: dict) -> None:
    assert_matches_golden(case, run_case(case))


def test_every_component_is_covered() -> None:
    components = {c["component"] for c in cases()}
    assert components == {"embedding", "layer_norm", "linear", "param", "rope", "attention",
                          "pwff", "sig_reg", "encoder", "model_encode", "model_predict"}
