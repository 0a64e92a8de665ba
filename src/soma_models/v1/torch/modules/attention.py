"""Causal multi-head self-attention with RoPE, exactly as the runtime computes it.

The runtime masks the future by *replacing* those scores with -1e4 (not -inf, not an
added bias). Row i therefore has its (i + 1) visible scores plus n_i = S - 1 - i scores
that are all exactly -1e4, whose keys carry the values v_{i+1} .. v_{S-1}. With L_i the
log-sum-exp of the visible scores and F = -1e4, the runtime's softmax is exactly

    out_i = (1 - a_i) * causal_i + a_i * mean_{j > i} v_j,
    a_i   = sigmoid(log(n_i) + F - L_i),

where causal_i is what an ordinary causal (-inf masked) kernel returns. Two fast paths
use this, both memory-linear in the sequence length:

* without autograd (evaluation, scoring), PyTorch's CPU flash kernel hands back L_i
  alongside its output, and the closed form is applied to every row: no branch, no
  data-dependent work. The suffix means of v are accumulated in float64.
* with autograd (training) or where that kernel is missing, we run the fused causal
  kernel and recompute the materialised way only the rows the fill can touch. For a row
  whose largest visible score is more than ~104 above -1e4, a_i underflows to exactly 0
  in float32; the diagonal score q_i . k_i is visible and costs O(S hd), so it bounds
  the row maximum from below for free, and rows whose diagonal is above
  -1e4 + `FILL_SAFE_MARGIN` are provably unaffected. Ordinary weights never come close.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_MASK_FILL_VALUE,
    LayerConfig,
    ModelConfig,
    attention_settings,
)
from soma_models.v1.rope import rope_arguments, rope_timescales

# exp(-104) is below half of float32's smallest subnormal (2^-150 = exp(-103.97)), so it
# rounds to 0; 8 more for rounding slack between the diagonal we compute and the
# kernel's own scores (|scores| near 1e4 have an ulp of ~1e-3).
FILL_SAFE_MARGIN = 112.0
# Rows recomputed exactly are processed this many at a time: [rows, S] float32 scores.
EXACT_ROWS_PER_CHUNK = 256
# Closed form: rows where the fill's softmax mass a satisfies a (1 - a) above this are
# recomputed exactly (the float32 log-sum-exp would move them by up to ~5e-8 relative).
MIXED_ROW_BAND = 1e-4
# Autograd: heads with a row log-sum-exp beyond this are recomputed exactly (the fused
# backward's probability error is ~|L| x 6e-8 relative, 6e-6 at this bound).
LOGSUMEXP_EXACT_BOUND = 100.0

# PyTorch's CPU flash-attention op returns (output, logsumexp); it is private API, so we
# look it up once and fall back to the branch path when it is absent.
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def _timescale_tensor(head_dim: int, max_wavelength: float, device: torch.device) -> torch.Tensor:
    """The correctly rounded float32 timescales as a tensor, built once per device.

    Kept out of `torch.compile` graphs: the NumPy construction cannot be traced.
    """
    return torch.from_numpy(rope_timescales(head_dim, max_wavelength).copy()).to(device)


def apply_rope(inputs: torch.Tensor, positions: torch.Tensor | None = None,
               head_dim: int | None = None, max_wavelength: float | None = None,
               scale_factor: float | None = None, *,
               pos_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate `inputs` `[B, S, H, hd]` by `positions` (alias `pos_ids`) `[B, S]`.

    Half-split RoPE: angle[b, s, i] = (float32(pos) / max_wavelength ** (2i / hd)) /
    scale_factor; out = concat(a cos - b sin, b cos + a sin) with a, b the two halves of
    the last axis. Defaults: max_wavelength 10000, scale_factor 1. Also callable as
    `apply_rope(x, pos_ids, max_wavelength, scale_factor)` (see `rope.rope_arguments`).
    """
    x = inputs
    pos_ids = pick("apply_rope", "pos_ids", pos_ids, "positions", positions)
    if pos_ids is None:
        raise TypeError("apply_rope: missing the positions (positions= or pos_ids=)")
    head_size = x.shape[-1]
    max_wavelength, scale_factor = rope_arguments(head_size, head_dim, max_wavelength,
                                                  scale_factor)
    if scale_factor < 1.0:
        raise ValueError(f"scale_factor must be >= 1.0, got {scale_factor}")
    timescale = _timescale_tensor(head_size, max_wavelength, x.device)
    # A division by the timescale, not a product with an inverse frequency: they round
    # differently, and at large positions sin/cos amplify the difference.
    angle = (pos_ids.to(torch.float32)[:, :, None] / timescale) / scale_factor  # [B, S, hd/2]
    sin = torch.sin(angle)[:, :, None, :].to(x.dtype)
    cos = torch.cos(angle)[:, :, None, :].to(x.dtype)
    a, b = x[..., : head_size // 2], x[..., head_size // 2 :]
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """The runtime's attention, materialised: q, k, v `[..., S, hd]` -> `[..., S, hd]`.

    Scores of future keys are replaced by -1e4 before the softmax. Memory O(S^2).
    """
    seq = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, V1_MASK_FILL_VALUE)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def future_value_means(v: torch.Tensor) -> torch.Tensor:
    """`mean_{j > i} v_j` for every row i of v `[..., S, hd]` (zero on the last row).

    Accumulated in float64 so that the S-term suffix sums are correctly rounded to
    float32 (a float32 running sum would lose ~S ulps to cancellation).
    """
    seq = v.shape[-2]
    totals = v.double().flip(-2).cumsum(-2).flip(-2)                 # Σ_{j >= i} v_j
    after = torch.cat((totals[..., 1:, :], torch.zeros_like(totals[..., :1, :])), dim=-2)
    count = torch.arange(seq - 1, -1, -1, device=v.device, dtype=torch.float64)
    return (after / count.clamp(min=1.0)[:, None]).to(v.dtype)


def fill_weight(logsumexp: torch.Tensor) -> torch.Tensor:
    """a_i = sigmoid(log(n_i) - 1e4 - L_i) in float64: the softmax mass of the fill.

    logsumexp: `[..., S]` of the visible scores; n_i = S - 1 - i (the last row has none,
    log 0 = -inf gives a = 0). Float64 so that log(n_i) - 1e4 - L_i does not round
    at ulp(1e4) ~ 1e-3 on top of the error L_i already carries.
    """
    seq = logsumexp.shape[-1]
    count = torch.arange(seq - 1, -1, -1, device=logsumexp.device, dtype=torch.float64)
    return torch.sigmoid(torch.log(count) + V1_MASK_FILL_VALUE - logsumexp.double())


def _flash_with_logsumexp_available(q: torch.Tensor, dropout_p: float) -> bool:
    """The CPU flash op (output and log-sum-exp) applies: CPU, float, no dropout."""
    return (_FLASH_WITH_LSE is not None and q.device.type == "cpu" and dropout_p == 0.0
            and q.dtype in (torch.float32, torch.float64))


def _exact_rows_one_head(q_rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         rows: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Materialised attention for query rows `rows` `[n]` of one (batch, head).

    q_rows: `[n, hd]`, k, v: `[S, hd]` -> `[n, hd]`. Memory `[n, S]`.
    """
    scores = (q_rows @ k.transpose(0, 1)) / math.sqrt(q_rows.shape[-1])
    key_index = torch.arange(k.shape[0], device=k.device)
    scores = scores.masked_fill(key_index[None, :] > rows[:, None], V1_MASK_FILL_VALUE)
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                dropout_p: float) -> torch.Tensor:
    """Exact attention output for selected rows `[n, 3]` (batch, head, query), sorted.

    Rows are grouped per (batch, head) so that keys and values are used in place (no
    `[n, S, hd]` gather). Under autograd (and without dropout, whose mask would not be
    replayed) each chunk is checkpointed: the saved state stays O(hd) per row instead of
    the `[rows, S]` softmax, so memory stays linear in S.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    pairs, counts = torch.unique_consecutive(rows[:, :2], dim=0, return_counts=True)
    outputs = []
    for (b, h), pair_rows in zip(pairs.tolist(), rows[:, 2].split(counts.tolist())):
        for chunk in pair_rows.split(EXACT_ROWS_PER_CHUNK):
            args = (q[b, h, chunk], k[b, h], v[b, h], chunk, dropout_p)
            if grad and dropout_p == 0.0:
                outputs.append(checkpoint(_exact_rows_one_head, *args, use_reentrant=False))
            else:
                outputs.append(_exact_rows_one_head(*args))
    return torch.cat(outputs)


def _replace_rows(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  selected: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """`out` with the rows where `selected` `[B, H, S]` is True recomputed exactly."""
    if not bool(selected.any()):
        return out
    rows = selected.nonzero()
    exact = _exact_rows(q, k, v, rows, dropout_p)
    return out.index_put(tuple(rows.unbind(-1)), exact)


def fill_affected_rows(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean `[B, H, S]`: rows whose diagonal score does not rule out the -1e4 fill."""
    with torch.no_grad():
        diagonal = (q * k).sum(-1) / math.sqrt(q.shape[-1])
        return diagonal < V1_MASK_FILL_VALUE + FILL_SAFE_MARGIN


def closed_form_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The runtime's attention for every row from the flash kernel's log-sum-exp.

    q, k, v: `[B, H, S, hd]`, no autograd, no dropout. The kernel's float32 L_i is
    rounded to ulp(|L_i|)/2 (~5e-4 near the fill), which moves a_i by a_i (1 - a_i) x
    that; rows where a_i (1 - a_i) > `MIXED_ROW_BAND` -- the visible maximum within a
    few units of -1e4 + log n_i, where visible and filled keys really mix -- are
    recomputed the materialised way. Every other row is exact as it stands.
    """
    causal, logsumexp = _FLASH_WITH_LSE(q, k, v, 0.0, True)           # [B,H,S,hd], [B,H,S]
    weight = fill_weight(logsumexp)                                   # float64 [B, H, S]
    if not bool((weight > 0.0).any()):
        return causal                                                 # the ordinary case
    mixed = weight * (1.0 - weight) > MIXED_ROW_BAND
    out = causal.clone()
    # One (batch, head) at a time, and only where the fill has any weight: the float64
    # suffix sums then cost one head's `[S, hd]` of memory, not the whole tensor's.
    for b, h in (weight > 0.0).any(-1).nonzero().tolist():
        correction = future_value_means(v[b, h]) - causal[b, h]
        out[b, h].addcmul_(weight[b, h, :, None].to(causal.dtype), correction)
    return _replace_rows(out, q, k, v, mixed, 0.0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Exact causal attention (the runtime's -1e4 fill) in linear memory.

    q, k, v: `[B, H, S, hd]` -> `[B, H, S, hd]`.

    * No autograd: `closed_form_attention` (fused kernel + closed-form fill).
    * Autograd: the fused kernel, and whole heads recomputed the exact way where any
      row has |L_i| > `LOGSUMEXP_EXACT_BOUND`. That covers every row the fill can touch
      (their L_i is near -1e4), and also heads of huge scores generally: the fused
      backward rebuilds probabilities as exp(s - L) from a float32 L, whose rounding
      (relative |L| x 6e-8) would otherwise leak into the gradients.
    * Dropout or no flash op (e.g. CUDA): PyTorch's SDPA, and the rows whose diagonal
      score does not rule the fill out recomputed exactly.
    """
    if not _flash_with_logsumexp_available(q, dropout_p):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return _replace_rows(out, q, k, v, fill_affected_rows(q, k), dropout_p)
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return closed_form_attention(q, k, v)
    out, logsumexp = _FLASH_WITH_LSE(q, k, v, 0.0, True)
    heads = (logsumexp.detach().abs() > LOGSUMEXP_EXACT_BOUND).any(-1, keepdim=True)
    return _replace_rows(out, q, k, v, heads.expand(logsumexp.shape), 0.0)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: `[B, S, D]`, positions `[B, S]` -> `[B, S, D]`.

    Built from a config (`MultiHeadAttention(config)`, any config with `num_heads`,
    `embedding_dim`, `dropout_rate`, `max_wavelength`, `scale_factor`) or as the published
    package builds it: `MultiHeadAttention(num_heads, num_features, *, dropout_rate=0.0,
    use_bias=True, max_wavelength=10000.0, scale_factor=1.0)`.
    """

    def __init__(self, num_heads: int | ModelConfig | LayerConfig,
                 num_features: int | None = None, *, dropout_rate: float | None = None,
                 use_bias: bool = True, max_wavelength: float | None = None,
                 scale_factor: float | None = None):
        super().__init__()
        heads, dim, settings = attention_settings(num_heads, num_features, dropout_rate,
                                                  max_wavelength, scale_factor)
        self.num_heads = heads
        self.head_dim = dim // heads
        self.max_wavelength, self.scale_factor, self.dropout_rate = settings
        self.query = nn.Linear(dim, dim, bias=use_bias)
        self.key = nn.Linear(dim, dim, bias=use_bias)
        self.value = nn.Linear(dim, dim, bias=use_bias)
        self.output = nn.Linear(dim, dim, bias=use_bias)
        #: False forces the materialised O(S^2) path (tests, benchmarks).
        self.fused = True

    def forward(self, inputs: torch.Tensor, pos_ids: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`inputs` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1."""
        x = inputs
        pos_ids = pick("MultiHeadAttention", "pos_ids", pos_ids, "positions", positions)
        batch, seq, dim = x.shape
        if pos_ids is None:
            pos_ids = torch.arange(seq, device=x.device).expand(batch, seq)
        split = (batch, seq, self.num_heads, self.head_dim)
        rope = {"max_wavelength": self.max_wavelength, "scale_factor": self.scale_factor}
        q = apply_rope(self.query(x).view(split), pos_ids, **rope)
        k = apply_rope(self.key(x).view(split), pos_ids, **rope)
        v = self.value(x).view(split)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [B, H, S, hd]
        dropout_p = self.dropout_rate if self.training else 0.0
        attend = causal_attention if self.fused else masked_attention
        context = attend(q, k, v, dropout_p=dropout_p)
        return self.output(context.transpose(1, 2).reshape(batch, seq, dim))
