"""The exact fast attention kernels (`attention_kernels`) compute what the materialised
reference does.

`attention_kernels.causal_attention` (flash kernel + closed-form -1e4 fill, or head recompute
under autograd, or SDPA + row recompute as the fallback) is compared with a materialised
reference with the -1e4 fill written out here.

The fill regime needs scores of magnitude ~1e4, where one float32 ulp is ~1e-3: two
correct float32 kernels that sum q . k in different orders then disagree in the
softmax by ~1e-3 relative, whatever the masking. To compare the *masking* at rtol
1e-5, the attention-level tests use integer q and k with head_dim 16, whose scores
(q . k / 4) are exact in float32 in any order; the model-level fill test runs in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from soma_models.v1.configs import ModelConfig
from soma_models.v1.torch.modules import attention, attention_kernels
from soma_models.v1.torch.modules.attention import apply_rope, causal_attention
from soma_models.v1.torch.modules.model import Model

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
    monkeypatch.setattr(attention_kernels, "_FLASH_WITH_LSE", None)
    q, k, v = fill_regime_inputs(seed=2)
    assert bool(attention_kernels.fill_affected_rows(q, k).any())
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
    monkeypatch.setattr(attention_kernels, "_FLASH_WITH_LSE", None)
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
