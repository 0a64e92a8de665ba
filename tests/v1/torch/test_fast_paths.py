"""The fast, memory-linear paths compute what the materialised ones do.

Attention: `causal_attention` (flash kernel + closed-form -1e4 fill, or head recompute
under autograd, or SDPA + row recompute as the fallback) against a materialised
reference with the -1e4 fill written out here. SIGReg: the chunked hand-differentiated
statistic against a direct `[positions, slices, points]` float64 formula written here.

The fill regime needs scores of magnitude ~1e4, where one float32 ulp is ~1e-3: two
correct float32 kernels that sum q . k in different orders then disagree in the
softmax by ~1e-3 relative, whatever the masking. To compare the *masking* at rtol
1e-5, the attention-level tests use integer q and k with head_dim 16, whose scores
(q . k / 4) are exact in float32 in any order; the model-level fill test runs in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.noise import quadrature, sig_reg_reference
from soma_models.v1.torch.modules import attention, sig_reg
from soma_models.v1.torch.modules.attention import apply_rope, causal_attention
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import sig_reg_statistic

RTOL = ATOL = 1e-5
FILL = -1.0e4


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The runtime's attention in float64, materialised: future scores replaced by -1e4."""
    q, k, v = q.double(), k.double(), v.double()
    seq = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, FILL), dim=-1) @ v


def visible_row_max(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`[..., S]`: each query's largest score over the keys it may see (float64)."""
    seq = q.shape[-2]
    scores = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, -math.inf).amax(-1)


def fill_regime_inputs(seed: int, batch: int = 2, heads: int = 3, seq: int = 96):
    """Integer q, k (head_dim 16, exact scores) whose scores straddle -1e4, random v.

    q = -m + noise, k = m + noise with m ~ 50 puts scores near -4 m^2 = -1e4 with a
    spread of ~100: early rows see only scores below the fill, later rows climb above.
    """
    generator = torch.Generator().manual_seed(seed)
    offset = torch.tensor([48.0, 50.0, 52.0])[:heads].view(1, heads, 1, 1)
    shape = (batch, heads, seq, 16)
    q = -offset + torch.randint(-3, 4, shape, generator=generator)
    k = offset + torch.randint(-3, 4, shape, generator=generator)
    v = torch.randn(shape, generator=generator)
    return q.float(), k.float(), v


def assert_regimes_occur(q: torch.Tensor, k: torch.Tensor) -> None:
    """The test data must really exercise the fill: pure-fill, mixed and ordinary rows."""
    row_max = visible_row_max(q, k)
    pure_fill = int((row_max < FILL - 104).sum())
    mixed = int(((row_max >= FILL - 104) & (row_max < FILL + 104)).sum())
    ordinary = int((row_max >= FILL + 104).sum())
    assert pure_fill > 10 and mixed > 10 and ordinary > 10, (pure_fill, mixed, ordinary)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL,
                 atol: float = ATOL) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# --- attention: forward -------------------------------------------------------------


def test_closed_form_matches_the_fill_in_every_regime() -> None:
    q, k, v = fill_regime_inputs(seed=0)
    assert_regimes_occur(q, k)
    expected = reference_attention(q, k, v)
    with torch.no_grad():
        fast = causal_attention(q, k, v)
        materialised = attention.masked_attention(q, k, v)
    # Sanity of the reference: the fill really moves these rows away from -inf masking.
    causal_only = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (causal_only - expected).abs().max() > 0.1
    assert_close(fast, expected)
    assert_close(materialised, expected)


def test_closed_form_in_float64_is_exact_to_rounding() -> None:
    q, k, v = fill_regime_inputs(seed=1)
    with torch.no_grad():
        fast = causal_attention(q.double(), k.double(), v.double())
    assert_close(fast, reference_attention(q, k, v), rtol=1e-12, atol=1e-12)


def test_fallback_path_matches_the_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the flash op (e.g. on CUDA): SDPA + diagonal-flagged row recompute."""
    monkeypatch.setattr(attention, "_FLASH_WITH_LSE", None)
    q, k, v = fill_regime_inputs(seed=2)
    assert bool(attention.fill_affected_rows(q, k).any())
    with torch.no_grad():
        fast = causal_attention(q, k, v)
    assert_close(fast, reference_attention(q, k, v))


def test_ordinary_scores_long_sequence() -> None:
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 2048, 16, generator=generator) * 2 for _ in range(3))
    with torch.no_grad():
        fast = causal_attention(q, k, v)
    assert_close(fast, reference_attention(q, k, v))


# --- attention: gradients -----------------------------------------------------------


def gradients(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    out.backward(upstream.to(out.dtype))
    return (out.detach(), *(t.grad for t in inputs))


def test_gradients_in_the_fill_regime() -> None:
    q, k, v = fill_regime_inputs(seed=4)
    assert_regimes_occur(q, k)
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    fast = gradients(causal_attention, q, k, v, upstream)
    expected = gradients(reference_attention, q, k, v, upstream)
    for got, want in zip(fast, expected):
        # Gradients through a softmax over scores ~1e4 (dq = dS k / 4 with |k| ~ 50):
        # the float32 materialised path itself is only this close to float64.
        assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_gradients_long_sequence_ordinary_scores() -> None:
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 1536, 16, generator=generator) * 2 for _ in range(3))
    upstream = torch.randn(q.shape, generator=generator)
    fast = gradients(causal_attention, q, k, v, upstream)
    expected = gradients(reference_attention, q, k, v, upstream)
    for got, want in zip(fast, expected):
        # A 1536-term softmax backward in float32: absolute error relative to the
        # gradient's scale (single small entries carry float32's cancellation).
        assert_close(got, want, atol=ATOL * float(want.abs().max()))


def test_fallback_gradients_ordinary_scores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "_FLASH_WITH_LSE", None)
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, 300, 16, generator=generator) for _ in range(3))
    upstream = torch.randn(q.shape, generator=generator)
    for got, want in zip(gradients(causal_attention, q, k, v, upstream),
                         gradients(reference_attention, q, k, v, upstream)):
        assert_close(got, want)


# --- whole model: fused vs materialised ---------------------------------------------

SMALL = ModelConfig(embedding_dim=64, pwff_hidden_dim=128, num_layers=2, num_heads=4,
                    vocab_size=264)


def model_pair(config: ModelConfig, weight_std: float | None, dtype: torch.dtype):
    torch.manual_seed(8)
    fast = Model(config)
    if weight_std is not None:
        with torch.no_grad():
            for name, param in fast.named_parameters():
                if param.ndim == 2:
                    param.normal_(0.0, weight_std)
    fast = fast.to(dtype)
    slow = Model(config).to(dtype)
    slow.load_state_dict(fast.state_dict())
    for module in slow.modules():
        if isinstance(module, attention.MultiHeadAttention):
            module.fused = False
    return fast, slow


def first_layer_qk(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first layer's rotated q, k `[B, H, S, hd]`, recomputed from the model's parts."""
    layer = model.encoder.layers[0]
    att = layer.attention
    h = layer.norm_1(model.embedding(tokens))
    pos = torch.arange(tokens.shape[1]).expand(tokens.shape)
    split = (*tokens.shape, att.num_heads, att.head_dim)
    q = apply_rope(att.query(h).view(split), pos, att.max_wavelength)
    k = apply_rope(att.key(h).view(split), pos, att.max_wavelength)
    return q.transpose(1, 2), k.transpose(1, 2)


def test_model_with_large_weights_float64() -> None:
    """N(0, 16^2) weights: some of the first layer's rows see only fill-level scores."""
    fast, slow = model_pair(SMALL, weight_std=16.0, dtype=torch.float64)
    tokens = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        q, k = first_layer_qk(fast, tokens)
        row_max = visible_row_max(q, k)
        assert int((row_max < FILL - 104).sum()) > 0, "no fill-affected rows: raise the std"
        assert int((row_max > FILL + 104).sum()) > 0
        assert_close(fast.encode(tokens), slow.encode(tokens))


@pytest.mark.parametrize("seq", [64, 1024])
def test_model_ordinary_weights_forward_and_gradients(seq: int) -> None:
    fast, slow = model_pair(SMALL, weight_std=None, dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert_close(fast.encode(tokens), slow.encode(tokens))
    for model in (fast, slow):
        model(tokens).square().mean().backward()
    slow_grads = dict(slow.named_parameters())
    for name, param in fast.named_parameters():
        assert_close(param.grad, slow_grads[name].grad, rtol=1e-4, atol=1e-6)


# --- SIGReg -------------------------------------------------------------------------

def direct_sig_reg(x: torch.Tensor, noise: torch.Tensor, config: SIGRegConfig) -> torch.Tensor:
    """SPEC §5 with the `[positions, slices, points]` tensor materialised, float64."""
    t, phi, weights = (torch.from_numpy(a).double() for a in quadrature(config))
    directions = noise.double() / noise.double().norm(dim=0, keepdim=True)
    p = x.double().reshape(-1, x.shape[-1]) @ directions                 # [P, slices]
    angle = p[:, :, None] * t                                            # [P, slices, points]
    c, z = torch.cos(angle).mean(1), torch.sin(angle).mean(1)
    return (config.slices * (((c - phi) ** 2 + z * z) * weights).sum(-1)).mean()


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sig_reg_chunked_equals_direct(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    monkeypatch.setattr(sig_reg, "POSITIONS_PER_CHUNK", 37)   # several uneven chunks
    config = SIGRegConfig(slices=256)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 50, 96, generator=generator) * scale
    noise = torch.randn(96, 256, generator=generator)
    fast = sig_reg_statistic(x, noise, config)
    assert_close(fast, direct_sig_reg(x, noise, config))
    reference = sig_reg_reference(x.numpy(), noise.numpy(), config)
    np.testing.assert_allclose(float(fast), reference, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_sig_reg_gradients_equal_direct(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    monkeypatch.setattr(sig_reg, "POSITIONS_PER_CHUNK", 37)
    config = SIGRegConfig(slices=256)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(2, 60, 96, generator=generator) * scale
    noise = torch.randn(96, 256, generator=generator)
    x_fast, noise_fast = x.clone().requires_grad_(), noise.clone().requires_grad_()
    sig_reg_statistic(x_fast, noise_fast, config).backward()
    x_ref = x.double().requires_grad_()
    noise_ref = noise.double().requires_grad_()
    direct_sig_reg(x_ref, noise_ref, config).backward()
    # Gradients are ~1/positions each: compare relative to the largest entry.
    for got, want in ((x_fast.grad, x_ref.grad), (noise_fast.grad, noise_ref.grad)):
        scale_of = float(want.abs().max())
        assert_close(got / scale_of, want / scale_of)


def test_sig_reg_float64_and_no_grad_paths_agree() -> None:
    config = SIGRegConfig(slices=128)
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(4, 40, 32, generator=generator)
    noise = torch.randn(32, 128, generator=generator)
    with torch.no_grad():
        value32 = sig_reg_statistic(x, noise, config)
    value64 = sig_reg_statistic(x.double(), noise.double(), config)
    assert value64.dtype == torch.float64
    assert_close(value32, value64)
    assert_close(value64, direct_sig_reg(x, noise, config), rtol=1e-12, atol=1e-12)


# --- training step ------------------------------------------------------------------


def reference_step_gradients(model: Model, tokens: torch.Tensor, targets: torch.Tensor,
                             noise: torch.Tensor, config: SIGRegConfig):
    """Loss and gradients with materialised attention and the direct SIGReg formula."""
    for module in model.modules():
        if isinstance(module, attention.MultiHeadAttention):
            module.fused = False
    model.zero_grad(set_to_none=True)
    reps = model.encode(tokens)
    logits = model.predict(reps)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           targets.reshape(-1), ignore_index=256,
                                           reduction="sum") / targets.numel()
    loss = ce + config.coefficient * direct_sig_reg(reps, noise, config).float()
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_step_gradients_match_a_materialised_step(checkpointing: bool) -> None:
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, prepare_model, train_step

    config = SIGRegConfig(slices=64)
    fast, slow = model_pair(SMALL, weight_std=None, dtype=torch.float32)
    generator = torch.Generator().manual_seed(14)
    tokens = torch.randint(0, 258, (2, 96), generator=generator)
    targets = torch.randint(0, 258, (2, 96), generator=generator)
    targets[:, -5:] = 256                                   # PAD targets count in the mean
    noise = torch.randn(SMALL.embedding_dim, config.slices, generator=generator)
    pos_ids = torch.arange(96).expand(2, 96)
    prepare_model(fast, activation_checkpointing=checkpointing)
    optimizer = make_optimizer(fast, lr=0.0)              # lr 0: the step leaves weights as is
    result = train_step(fast, SIGReg(config), optimizer, (tokens, targets, pos_ids), noise=noise)
    expected_loss, expected_grads = reference_step_gradients(slow, tokens, targets, noise, config)
    np.testing.assert_allclose(result.loss, expected_loss, rtol=RTOL)
    np.testing.assert_allclose(result.loss, result.cross_entropy + result.sig_reg, rtol=1e-6)
    for name, param in fast.named_parameters():
        assert_close(param.grad, expected_grads[name], rtol=1e-4, atol=1e-6)


def test_train_step_updates_weights_and_accepts_array_batches() -> None:
    from soma_models.v1.tokenizer import iter_batches
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, train_step

    config = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2)
    model = Model(config)
    before = model.predictor.weight.detach().clone()
    batch = next(iter(iter_batches(bytes(range(200)) * 3, max_seq_len=64, batch_size=2)))
    result = train_step(model, SIGReg(SIGRegConfig(slices=16)), make_optimizer(model, lr=1e-2),
                        batch, max_grad_norm=1.0)
    assert result.grad_norm is not None and result.grad_norm > 0.0
    assert math.isfinite(result.loss)
    assert not torch.equal(before, model.predictor.weight)


def test_bf16_autocast_runs_on_cpu_with_float32_loss_terms() -> None:
    # The one bf16 policy (train_step.check_bf16_autocast): CPU autocast is allowed, the
    # loss stays float32 and near the float32 step's.
    from soma_models.v1.torch.modules.sig_reg import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, train_step

    torch.manual_seed(0)
    model = Model(ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2))
    reference = Model(model.config)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    batch = (tokens, torch.roll(tokens, -1, 1), torch.arange(16).expand(2, 16))
    noise = torch.randn(32, 8)
    sig_reg = SIGReg(SIGRegConfig(slices=8))
    low = train_step(model, sig_reg, make_optimizer(model), batch, noise=noise,
                     autocast_bf16=True)
    full = train_step(reference, sig_reg, make_optimizer(reference), batch, noise=noise)
    assert math.isfinite(low.loss)
    assert low.loss == pytest.approx(full.loss, rel=2e-2)


def test_bf16_autocast_is_refused_on_devices_without_bf16() -> None:
    from soma_models.v1.torch.train_step import check_bf16_autocast

    check_bf16_autocast(torch.device("cpu"))
    with pytest.raises(ValueError, match="bf16 autocast is supported on CUDA and CPU"):
        check_bf16_autocast(torch.device("meta"))


def test_make_optimizer_decays_matrices_only() -> None:
    from soma_models.v1.torch.train_step import make_optimizer

    model = Model(ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=1, num_heads=2))
    optimizer = make_optimizer(model, weight_decay=0.1)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2), name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for implementation in ("fused", "foreach", "loop"):
        make_optimizer(model, implementation=implementation)
    with pytest.raises(ValueError, match="auto, fused, foreach or loop"):
        make_optimizer(model, implementation="turbo")
