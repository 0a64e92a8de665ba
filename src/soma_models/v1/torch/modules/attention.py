"""Causal multi-head self-attention with RoPE, exactly as the runtime computes it.

The runtime masks the future by *replacing* those scores with -1e4 (not -inf, not an
added bias). For ordinary rows that is indistinguishable from -inf: once the row's
largest visible score is more than ~104 above -1e4, exp(-1e4 - max) underflows to
exactly 0 in float32. So we run PyTorch's fused causal kernel (memory linear in the
sequence length) and then recompute, the exact materialised way, only the rows where
the fill could matter. The diagonal score q_i . k_i is always visible and costs O(S hd)
to compute, so it bounds each row's maximum from below for free: rows whose diagonal is
above -1e4 + `FILL_SAFE_MARGIN` are provably unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from soma_models.v1.configs import V1_MASK_FILL_VALUE, ModelConfig
from soma_models.v1.rope import rope_timescales

# exp(-104) is below float32's smallest subnormal (~1.4e-45 = exp(-103.3)); 8 more for
# rounding slack between the diagonal we compute and the kernel's own scores.
FILL_SAFE_MARGIN = 112.0
# Rows recomputed exactly are processed this many at a time to bound memory.
EXACT_ROWS_PER_CHUNK = 256


def apply_rope(x: torch.Tensor, pos_ids: torch.Tensor, max_wavelength: float,
               scale_factor: float = 1.0) -> torch.Tensor:
    """Rotate `x` `[B, S, H, hd]` by positions `pos_ids` `[B, S]` (half-split RoPE).

    angle[b, s, i] = (float32(pos) / max_wavelength ** (2i / hd)) / scale_factor;
    out = concat(a cos - b sin, b cos + a sin) with a, b the two halves of the last axis.
    """
    if scale_factor < 1.0:
        raise ValueError(f"scale_factor must be >= 1.0, got {scale_factor}")
    head_dim = x.shape[-1]
    timescale = torch.from_numpy(rope_timescales(head_dim, max_wavelength).copy()).to(x.device)
    # A division by the timescale, not a product with an inverse frequency: they round
    # differently, and at large positions sin/cos amplify the difference.
    angle = (pos_ids.to(torch.float32)[:, :, None] / timescale) / scale_factor  # [B, S, hd/2]
    sin = torch.sin(angle)[:, :, None, :].to(x.dtype)
    cos = torch.cos(angle)[:, :, None, :].to(x.dtype)
    a, b = x[..., : head_dim // 2], x[..., head_dim // 2 :]
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


def _exact_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
                dropout_p: float) -> torch.Tensor:
    """Exact attention output for selected rows. rows: `[n, 3]` (batch, head, query)."""
    outputs = []
    for chunk in rows.split(EXACT_ROWS_PER_CHUNK):
        b, h, i = chunk.unbind(-1)
        q_rows = q[b, h, i]                       # [n, hd]
        k_rows, v_rows = k[b, h], v[b, h]         # [n, S, hd]
        scores = (k_rows @ q_rows[:, :, None])[:, :, 0] / math.sqrt(q.shape[-1])  # [n, S]
        key_index = torch.arange(k.shape[-2], device=q.device)
        scores = scores.masked_fill(key_index[None, :] > i[:, None], V1_MASK_FILL_VALUE)
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        outputs.append((weights[:, None, :] @ v_rows)[:, 0])
    return torch.cat(outputs)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Exact causal attention in linear memory. q, k, v: `[B, H, S, hd]`."""
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    with torch.no_grad():
        diagonal = (q * k).sum(-1) / math.sqrt(q.shape[-1])          # [B, H, S]
        unsafe = diagonal < V1_MASK_FILL_VALUE + FILL_SAFE_MARGIN
        rows = unsafe.nonzero() if bool(unsafe.any()) else None
    if rows is None:
        return out
    exact = _exact_rows(q, k, v, rows, dropout_p)
    return out.index_put(tuple(rows.unbind(-1)), exact)


class MultiHeadAttention(nn.Module):
    """Causal self-attention: `[B, S, D]`, pos_ids `[B, S]` -> `[B, S, D]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.embedding_dim
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.max_wavelength = config.max_wavelength
        self.scale_factor = config.scale_factor
        self.dropout_rate = config.dropout_rate
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, dim)
        #: False forces the materialised O(S^2) path (tests, benchmarks).
        self.fused = True

    def forward(self, x: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        split = (batch, seq, self.num_heads, self.head_dim)
        q = apply_rope(self.query(x).view(split), pos_ids, self.max_wavelength, self.scale_factor)
        k = apply_rope(self.key(x).view(split), pos_ids, self.max_wavelength, self.scale_factor)
        v = self.value(x).view(split)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [B, H, S, hd]
        dropout_p = self.dropout_rate if self.training else 0.0
        attend = causal_attention if self.fused else masked_attention
        context = attend(q, k, v, dropout_p=dropout_p)
        return self.output(context.transpose(1, 2).reshape(batch, seq, dim))
