"""One init rule, three users: the torch `Model`, the Flax `Model` and the streaming
`write_initial_weights` draw every canonical key from the same distribution.

The expected distribution is written out here, independently of `initial_std`:
N(0, 0.02) for the embedding and linear weights, N(0, 0.02 / sqrt(2 L)) for the two
residual projections, 0 for biases and beta, 1 for gamma. Sample statistics of each
tensor are compared with it at ~5 standard errors, so a wrong std on any single key
(the residual scale is sqrt(6) ~ 2.4x here) fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flax import nnx

from soma_models.safetensors_io import SafetensorsFile
from soma_models.v1.configs import ModelConfig
from soma_models.v1.flax import serde as flax_serde
from soma_models.v1.flax.modules.model import Model as FlaxModel
from soma_models.v1.initialization import initial_mean, initial_std, write_initial_weights
from soma_models.v1.schema import param_specs
from soma_models.v1.torch import serde as torch_serde
from soma_models.v1.torch.modules.model import Model as TorchModel

CONFIG = ModelConfig(embedding_dim=64, pwff_hidden_dim=128, num_layers=3, num_heads=4)


def expected(key: str, kind: str) -> tuple[float, float]:
    """(mean, std) of a fresh parameter, from the documented rule."""
    if kind == "norm_gamma":
        return 1.0, 0.0
    if kind in ("linear_bias", "norm_beta"):
        return 0.0, 0.0
    if key.endswith(("attention.output.weight", "pwff.linear_outer.weight")):
        return 0.0, 0.02 / math.sqrt(2 * CONFIG.num_layers)
    return 0.0, 0.02


def _torch_arrays() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return torch_serde.canonical_arrays(TorchModel(CONFIG))


def _flax_arrays() -> dict[str, np.ndarray]:
    return flax_serde.canonical_arrays(FlaxModel(CONFIG, rngs=nnx.Rngs(0)))


def _streamed_arrays(tmp_path) -> dict[str, np.ndarray]:
    path = tmp_path / "init.safetensors"
    write_initial_weights(path, CONFIG, seed=0)
    weights = SafetensorsFile(path)
    return {key: np.array(weights.array(key)) for key in weights.tensors}


def test_rule_is_the_documented_one() -> None:
    for spec in param_specs(CONFIG):
        assert (initial_mean(spec), initial_std(spec, CONFIG)) == pytest.approx(
            expected(spec.key, spec.kind), rel=1e-12), spec.key


@pytest.mark.parametrize("user", ["torch", "flax", "streamed"])
def test_every_key_has_the_rule_s_distribution(user: str, tmp_path) -> None:
    arrays = {"torch": _torch_arrays, "flax": _flax_arrays,
              "streamed": lambda: _streamed_arrays(tmp_path)}[user]()
    assert sorted(arrays) == sorted(spec.key for spec in param_specs(CONFIG))
    for spec in param_specs(CONFIG):
        values = np.asarray(arrays[spec.key], np.float64)
        assert values.shape == spec.shape, spec.key
        mean, std = expected(spec.key, spec.kind)
        if std == 0.0:
            np.testing.assert_array_equal(values, mean, err_msg=f"{user}: {spec.key}")
            continue
        n = values.size
        # Standard errors of the sample mean and sample std of n normal draws.
        assert abs(values.mean() - mean) < 5 * std / math.sqrt(n), f"{user}: {spec.key} mean"
        assert abs(values.std() / std - 1) < 5 / math.sqrt(2 * n), \
            f"{user}: {spec.key} std {values.std():.5f}, expected {std:.5f}"


def test_three_users_agree_key_by_key(tmp_path) -> None:
    """Sample std per key, side by side: every pair within a few standard errors."""
    users = [_torch_arrays(), _flax_arrays(), _streamed_arrays(tmp_path)]
    for spec in param_specs(CONFIG):
        stds = [float(np.std(np.asarray(a[spec.key], np.float64))) for a in users]
        _, std = expected(spec.key, spec.kind)
        tolerance = 10 * std / math.sqrt(2 * math.prod(spec.shape))
        assert max(stds) - min(stds) <= tolerance, f"{spec.key}: {stds}"
