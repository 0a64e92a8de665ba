"""Position-wise feed-forward: Linear -> exact GELU -> Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from soma_models.v1.configs import ModelConfig, PositionWiseFeedForwardConfig

__all__ = ["PositionWiseFeedForward", "PositionWiseFeedForwardConfig"]


class PositionWiseFeedForward(nn.Module):
    """`[..., D]` -> `[..., D]` through a `pwff_hidden_dim` hidden layer.

    `config`: a `PositionWiseFeedForwardConfig`, or any config with its fields.
    """

    def __init__(self, config: PositionWiseFeedForwardConfig | ModelConfig):
        super().__init__()
        self.linear_inner = nn.Linear(config.embedding_dim, config.pwff_hidden_dim)
        self.linear_outer = nn.Linear(config.pwff_hidden_dim, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The runtime's GELU is the exact erf form, not the tanh approximation.
        hidden = F.gelu(self.linear_inner(x), approximate="none")
        return self.linear_outer(self.dropout(hidden))
