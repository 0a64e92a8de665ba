"""The V1 model: embedding -> encoder -> final norm (representations) -> predictor (logits)."""

from __future__ import annotations

import os
from typing import Self

import torch
from torch import nn

from soma_models.v1.configs import V1_LAYER_NORM_EPS, ModelConfig
from soma_models.v1.initialization import initial_mean, initial_std
from soma_models.v1.schema import param_specs
from soma_models.v1.torch.modules.encoder import Encoder
from soma_models.v1.torch.serde import torch_name


def default_pos_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """`0 .. S-1` on every row, shaped like `token_ids` `[B, S]`."""
    seq = token_ids.shape[-1]
    return torch.arange(seq, device=token_ids.device).expand(token_ids.shape)


class Model(nn.Module):
    """V1 transformer. token_ids `[B, S]` (int), pos_ids `[B, S]` -> logits `[B, S, vocab]`."""

    def __init__(self, config: ModelConfig | None = None):
        super().__init__()
        self.config = config = config or ModelConfig()
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.encoder = Encoder(config)
        self.final_norm = nn.LayerNorm(config.embedding_dim, eps=V1_LAYER_NORM_EPS)
        self.predictor = nn.Linear(config.embedding_dim, config.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """From-scratch init: every canonical parameter drawn by the schema's rule
        (`soma_models.v1.initialization`), in schema order from torch's RNG."""
        if any(p.is_meta for p in self.parameters()):
            return
        for spec in param_specs(self.config):
            param = self.get_parameter(torch_name(spec))
            std = initial_std(spec, self.config)
            if std == 0.0:
                nn.init.constant_(param, initial_mean(spec))
            else:
                nn.init.normal_(param, initial_mean(spec), std)

    def encode(self, token_ids: torch.Tensor, pos_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Representations `[B, S, D]` (after the final LayerNorm)."""
        if pos_ids is None:
            pos_ids = default_pos_ids(token_ids)
        if pos_ids.shape != token_ids.shape:
            raise ValueError(f"pos_ids shape {list(pos_ids.shape)} != token_ids shape "
                             f"{list(token_ids.shape)}")
        x = self.embedding(token_ids)
        return self.final_norm(self.encoder(x, pos_ids))

    def predict(self, representations: torch.Tensor) -> torch.Tensor:
        """Logits `[B, S, vocab]` from representations `[B, S, D]`."""
        return self.predictor(representations)

    def forward(self, token_ids: torch.Tensor, pos_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(self.encode(token_ids, pos_ids))

    # --- weights (canonical safetensors; see soma_models.v1.torch.serde) ---
    def save(self, path: str | os.PathLike) -> None:
        from soma_models.v1.torch import serde

        serde.save(self, path)

    def save_bytes(self) -> bytes:
        from soma_models.v1.torch import serde

        return serde.to_bytes(self)

    @classmethod
    def load(cls, path: str | os.PathLike, config: ModelConfig | None = None, *,
             device: torch.device | str | None = None) -> Self:
        """Load canonical weights; `config=None` infers sizes from the file (V1 heads)."""
        from soma_models.v1.torch import serde

        return serde.load(path, config, device=device, model_cls=cls)

    @classmethod
    def load_bytes(cls, data: bytes | bytearray | memoryview, config: ModelConfig | None = None,
                   *, device: torch.device | str | None = None) -> Self:
        from soma_models.v1.torch import serde

        return serde.load(data, config, device=device, model_cls=cls)
