"""One pre-norm transformer block."""

from __future__ import annotations

import torch
from torch import nn

from soma_models.v1.aliases import pick
from soma_models.v1.configs import (
    V1_LAYER_NORM_EPS,
    LayerConfig,
    ModelConfig,
    PositionWiseFeedForwardConfig,
)
from soma_models.v1.torch.modules.attention import MultiHeadAttention
from soma_models.v1.torch.modules.pwff import PositionWiseFeedForward

__all__ = ["Layer", "LayerConfig", "MultiHeadAttention", "PositionWiseFeedForward",
           "PositionWiseFeedForwardConfig"]


class Layer(nn.Module):
    """x + Attention(LN_1(x)), then x + PWFF(LN_2(x)); `[B, S, D]` -> `[B, S, D]`.

    `config`: a `LayerConfig`, or any config with its fields (`ModelConfig`, `EncoderConfig`).
    """

    def __init__(self, config: LayerConfig | ModelConfig):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.embedding_dim, eps=V1_LAYER_NORM_EPS)
        self.attention = MultiHeadAttention(config)
        self.norm_2 = nn.LayerNorm(config.embedding_dim, eps=V1_LAYER_NORM_EPS)
        self.pwff = PositionWiseFeedForward(config)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, context: torch.Tensor, pos_ids: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`context` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1."""
        x = context
        pos_ids = pick("Layer", "pos_ids", pos_ids, "positions", positions)
        x = x + self.dropout(self.attention(self.norm_1(x), pos_ids))
        return x + self.dropout(self.pwff(self.norm_2(x)))
