"""PyTorch <-> Flax parity on random weights: files, outputs, loss and gradients.

Both frameworks implement SPEC §3 in float32, so on the same canonical weights they must
agree far inside the golden tolerance. Run with `-s` to see the largest deviations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from soma_models.v1.configs import V1_PAD_TOKEN_ID, ModelConfig, SIGRegConfig
from soma_models.v1.flax import serde as flax_serde
from soma_models.v1.flax.loss import compute_loss as flax_loss
from soma_models.v1.flax.modules.model import Model as FlaxModel
from soma_models.v1.flax.modules.sig_reg import SIGReg as FlaxSIGReg
from soma_models.v1.torch import serde as torch_serde
from soma_models.v1.torch.loss import compute_loss as torch_loss
from soma_models.v1.torch.modules.model import Model as TorchModel
from soma_models.v1.torch.modules.sig_reg import SIGReg as TorchSIGReg

SIG_CONFIG = SIGRegConfig(slices=64)

# (config, batch, seq_len, position offset). The last one is longer than the Flax
# attention block (256), so it runs the blocked memory-linear path.
CASES = [
    (ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=2, num_heads=4), 2, 37, 0),
    (ModelConfig(embedding_dim=48, pwff_hidden_dim=96, num_layers=3, num_heads=3), 3, 20, 10**6),
    (ModelConfig(embedding_dim=64, pwff_hidden_dim=128, num_layers=1, num_heads=2), 1, 300, 12345),
]


def _inputs(config: ModelConfig, batch: int, seq: int, offset: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 258, (batch, seq)).astype(np.int64)
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -(seq // 3):] = V1_PAD_TOKEN_ID     # PAD targets count in the mean only
    pos = (np.arange(seq)[None] + offset).repeat(batch, 0).astype(np.int64)
    noise = rng.standard_normal((config.embedding_dim, SIG_CONFIG.slices)).astype(np.float32)
    return tokens, targets, pos, noise


def _deviation(name: str, got: np.ndarray, want: np.ndarray) -> float:
    worst = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))
    print(f"  {name}: max |flax - torch| = {worst:.3g} (max |torch| {np.abs(want).max():.3g})")
    return worst


def _torch_outputs(model: TorchModel, tokens, targets, pos, noise):
    model.eval()
    with torch.no_grad():
        reps = model.encode(torch.as_tensor(tokens), torch.as_tensor(pos))
        logits = model.predict(reps)
        loss, embedding = torch_loss(model, TorchSIGReg(SIG_CONFIG), tokens, targets, pos, noise)
    return reps.numpy(), logits.numpy(), float(loss), embedding.numpy()


@nnx.jit
def _flax_outputs(model: FlaxModel, tokens, targets, pos, noise):
    reps = model.encode(tokens, pos)
    loss, embedding = flax_loss(model, FlaxSIGReg(SIG_CONFIG), tokens, targets, pos, noise)
    return reps, model.predict(reps), loss, embedding


@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_file_runs_the_same_in_flax(case: int) -> None:
    config, batch, seq, offset = CASES[case]
    torch.manual_seed(case)
    torch_model = TorchModel(config)
    data = torch_model.save_bytes()
    flax_model = FlaxModel.load_bytes(data)
    flax_model.eval()
    assert flax_model.config == config
    assert flax_model.save_bytes() == data                      # bit-identical tensors back
    tokens, targets, pos, noise = _inputs(config, batch, seq, offset, seed=case)
    want = _torch_outputs(torch_model, tokens, targets, pos, noise)
    got = [np.asarray(x) for x in _flax_outputs(flax_model, tokens, targets, pos, noise)]
    print(f"case {case}: D={config.embedding_dim} H={config.num_heads} L={config.num_layers} "
          f"B={batch} S={seq} offset={offset}")
    for name, g, w in zip(("representations", "logits", "loss", "embedding"), got, want):
        _deviation(name, g, w)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_flax_file_loads_in_torch_bit_identically() -> None:
    config, batch, seq, offset = CASES[0]
    flax_model = FlaxModel(config, rngs=nnx.Rngs(11))
    data = flax_model.save_bytes()
    torch_model = TorchModel.load_bytes(data)
    assert torch_model.save_bytes() == data
    for key, array in flax_serde.canonical_arrays(flax_model).items():
        np.testing.assert_array_equal(torch_serde.canonical_arrays(torch_model)[key], array)
    flax_model.eval()
    tokens, targets, pos, noise = _inputs(config, batch, seq, offset, seed=5)
    want = _torch_outputs(torch_model, tokens, targets, pos, noise)
    got = [np.asarray(x) for x in _flax_outputs(flax_model, tokens, targets, pos, noise)]
    for name, g, w in zip(("representations", "logits", "loss", "embedding"), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=name)


def test_gradients_agree() -> None:
    """d loss / d every canonical parameter, mapped back through each framework's serde."""
    config = ModelConfig(embedding_dim=16, pwff_hidden_dim=32, num_layers=1, num_heads=4)
    batch, seq, offset = 2, 23, 77
    torch.manual_seed(3)
    torch_model = TorchModel(config).eval()
    flax_model = FlaxModel.load_bytes(torch_model.save_bytes())
    flax_model.eval()
    tokens, targets, pos, noise = _inputs(config, batch, seq, offset, seed=9)

    loss, _ = torch_loss(torch_model, TorchSIGReg(SIG_CONFIG), tokens, targets, pos, noise)
    loss.backward()
    grad_holder = TorchModel(config)
    grad_holder.load_state_dict({n: p.grad for n, p in torch_model.named_parameters()})
    want = torch_serde.canonical_arrays(grad_holder)

    sig_reg = FlaxSIGReg(SIG_CONFIG)

    def loss_fn(model: FlaxModel) -> jax.Array:
        return flax_loss(model, sig_reg, tokens, targets, pos, noise)[0]

    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)
    nnx_grads = nnx.jit(nnx.grad(loss_fn))(flax_model)
    # The same through plain JAX: jax.grad over the split parameter state.
    jax_grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest))))(params)
    for grads in (nnx_grads, jax_grads):
        got = flax_serde.canonical_arrays(nnx.merge(graphdef, grads, rest))
        assert got.keys() == want.keys()
        worst = 0.0
        for key in want:
            scale = float(np.abs(want[key]).max())
            worst = max(worst, float(np.abs(got[key] - want[key]).max()))
            np.testing.assert_allclose(got[key], want[key], rtol=1e-4,
                                       atol=1e-5 * max(scale, 1e-3), err_msg=key)
        print(f"gradients: max |flax - torch| = {worst:.3g} over {len(want)} tensors")
    assert any(np.abs(g).max() > 0 for g in want.values())


def test_blocked_path_was_exercised() -> None:
    """Guard: the long case must stay above the Flax block size, or it tests nothing new."""
    from soma_models.v1.flax.modules.attention import BLOCK_SIZE

    assert CASES[-1][2] > BLOCK_SIZE
    assert jax.devices()[0].platform in {"cpu", "gpu", "tpu"}
    assert jnp.zeros(1).dtype == jnp.float32
