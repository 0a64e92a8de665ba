"""Causal multi-head self-attention with RoPE (SPEC §3.2), as the runtime computes it.

    q, k, v   = x W_q + b_q, x W_k + b_k, x W_v + b_v          split into H heads of hd
    q, k      = rope(q, positions), rope(k, positions)          half-split rotation
    scores    = q k^T / sqrt(hd), future entries replaced by -1e4 (not -inf)
    out       = softmax(scores) v, heads merged, then W_o, b_o

`masked_attention` is that formula written out (O(S^2) memory): the reference, and the
path taken when `MultiHeadAttention.fused` is False. By default the module runs
`attention_kernels.causal_attention`, which computes the same numbers in linear memory
on PyTorch's fused kernels.

RoPE's sin/cos depend only on the positions, which every layer shares: `rope_tables`
builds them once (the encoder does, per forward, in the compute dtype) and `rotate`
applies them to q and k.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_MASK_FILL_VALUE,
    LayerConfig,
    ModelConfig,
    attention_settings,
)
from soma_models.v1.rope import rope_arguments, rope_timescales
from soma_models.v1.torch.modules.attention_kernels import causal_attention

#: RoPE's tables: cos and signed sin, each `[B, S, 1, hd]` (broadcast over heads).
RopeTables = tuple[torch.Tensor, torch.Tensor]


@torch.compiler.disable
@functools.lru_cache(maxsize=32)
def _timescale_tensor(head_dim: int, max_wavelength: float, device: torch.device) -> torch.Tensor:
    """The correctly rounded float32 timescales as a tensor, built once per device.

    Kept out of `torch.compile` graphs: the NumPy construction cannot be traced.
    """
    return torch.from_numpy(rope_timescales(head_dim, max_wavelength).copy()).to(device)


def rope_tables(pos_ids: torch.Tensor, head_dim: int, max_wavelength: float,
                scale_factor: float = 1.0, device: torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> RopeTables:
    """cos, signed sin `[B, S, 1, hd]` for `rotate`, in `dtype` (the rotation's dtype).

    With angle[b, s, i] = (float32(pos) / timescale_i) / scale_factor, timescale_i =
    max_wavelength ** (2i / hd) (`rope.rope_timescales`), i < hd/2:
    cos = [cos(angle), cos(angle)] and signed sin = [-sin(angle), sin(angle)] along the
    last axis. Angles and sin/cos are computed in float32 and rounded to `dtype` once, so
    a bf16 forward casts them once per forward, not per layer and per q and k.
    """
    if scale_factor < 1.0:
        raise ValueError(f"scale_factor must be >= 1.0, got {scale_factor}")
    device = pos_ids.device if device is None else device
    timescale = _timescale_tensor(head_dim, float(max_wavelength), device)
    # A division by the timescale, not a product with an inverse frequency: they round
    # differently, and at large positions sin/cos amplify the difference.
    angle = (pos_ids.to(torch.float32)[:, :, None] / timescale) / scale_factor  # [B, S, hd/2]
    sin, cos = torch.sin(angle), torch.cos(angle)
    cos = torch.cat((cos, cos), dim=-1)[:, :, None, :].to(dtype)
    signed_sin = torch.cat((-sin, sin), dim=-1)[:, :, None, :].to(dtype)
    return cos, signed_sin


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections of `x` come out in: autocast's where it is on for x's
    device, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def rotate(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Half-split rotation of `x` `[B, S, H, hd]`: concat(a cos - b sin, b cos + a sin),
    a and b the two halves of the last axis.

    Written as x * cos + swap(x) * signed_sin with swap(x) = concat(b, a) (`torch.roll`
    by half): the same products and sums, so bit for bit the formula above
    (a cos + b (-sin) rounds exactly as a cos - b sin), in four kernels forward and four
    backward, with no slices (whose backward fills zeros) and no concat of the halves.
    Tables in another dtype than `x` are cast here (a caller that shares them across
    layers builds them in the compute dtype instead).
    """
    cos, signed_sin = rope
    if cos.dtype != x.dtype:
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    swapped = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return x * cos + swapped * signed_sin


def apply_rope(inputs: torch.Tensor, positions: torch.Tensor | None = None,
               head_dim: int | None = None, max_wavelength: float | None = None,
               scale_factor: float | None = None, *,
               pos_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate `inputs` `[B, S, H, hd]` by `positions` (alias `pos_ids`) `[B, S]`.

    `rotate(inputs, rope_tables(...))`. Defaults: max_wavelength 10000, scale_factor 1.
    Also callable as `apply_rope(x, pos_ids, max_wavelength, scale_factor)` (see
    `rope.rope_arguments`).
    """
    pos_ids = pick("apply_rope", "pos_ids", pos_ids, "positions", positions)
    if pos_ids is None:
        raise TypeError("apply_rope: missing the positions (positions= or pos_ids=)")
    head_size = inputs.shape[-1]
    max_wavelength, scale_factor = rope_arguments(head_size, head_dim, max_wavelength,
                                                  scale_factor)
    tables = rope_tables(pos_ids, head_size, max_wavelength, scale_factor, inputs.device)
    return rotate(inputs, tables)


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

    def rope_tables(self, pos_ids: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> RopeTables:
        """This module's RoPE tables for positions `[B, S]`, in `dtype` (shareable across
        layers built from the same config)."""
        return rope_tables(pos_ids, self.head_dim, self.max_wavelength, self.scale_factor,
                           dtype=dtype)

    def forward(self, inputs: torch.Tensor, pos_ids: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None,
                rope: RopeTables | None = None) -> torch.Tensor:
        """`inputs` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1.

        `rope`: precomputed `rope_tables(pos_ids)`; when given, the positions are not read.
        """
        pos_ids = pick("MultiHeadAttention", "pos_ids", pos_ids, "positions", positions)
        batch, seq, dim = inputs.shape
        dtype = compute_dtype(inputs)
        # Under autocast, one cast of the input instead of one in each of the three
        # projections (and one cast of its gradient back); a no-op otherwise.
        x = inputs.to(dtype)
        if rope is None:
            if pos_ids is None:
                pos_ids = torch.arange(seq, device=x.device).expand(batch, seq)
            rope = self.rope_tables(pos_ids, dtype)
        split = (batch, seq, self.num_heads, self.head_dim)
        q = rotate(self.query(x).view(split), rope)
        k = rotate(self.key(x).view(split), rope)
        v = self.value(x).view(split)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))               # [B, H, S, hd]
        dropout_p = self.dropout_rate if self.training else 0.0
        attend = causal_attention if self.fused else masked_attention
        context = attend(q, k, v, dropout_p=dropout_p)
        return self.output(context.transpose(1, 2).reshape(batch, seq, dim))
