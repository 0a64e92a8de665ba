"""The stack of transformer blocks (no final norm: the model owns it)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soma_models.v1.configs import ModelConfig
from soma_models.v1.torch.modules.layer import Layer


class Encoder(nn.Module):
    """`num_layers` pre-norm blocks: `[B, S, D]`, pos_ids `[B, S]` -> `[B, S, D]`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        #: Recompute each block's activations in the backward pass (saves memory).
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, pos_ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, pos_ids, use_reentrant=False)
            else:
                x = layer(x, pos_ids)
        return x
