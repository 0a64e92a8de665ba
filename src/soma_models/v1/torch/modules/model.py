"""The V1 model: embedding -> encoder -> final norm (representations) -> predictor (logits)."""

from __future__ import annotations

import math

import torch
from torch import nn

from soma_models.v1.aliases import pick
from soma_models.v1.configs import V1_LAYER_NORM_EPS, EncoderConfig, ModelConfig
from soma_models.v1.torch.modules.encoder import Encoder
from soma_models.v1.torch.serde import Serializable

__all__ = ["Encoder", "EncoderConfig", "Model", "ModelConfig", "Serializable",
           "default_pos_ids"]

INIT_STD = 0.02
_NARROW_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32,
                    torch.uint64)


def default_pos_ids(token_ids: torch.Tensor) -> torch.Tensor:
    """`0 .. S-1` on every row, shaped like `token_ids` `[B, S]`."""
    seq = token_ids.shape[-1]
    return torch.arange(seq, device=token_ids.device).expand(token_ids.shape)


class Model(Serializable, nn.Module):
    """V1 transformer. token_ids `[B, S]` (int), pos_ids `[B, S]` -> logits `[B, S, vocab]`.

    Weights: `save`/`save_bytes`/`load`/`load_bytes`/`from_arrays` (canonical
    safetensors, from `Serializable`). `input=`/`positions=`/`embeddings=` are accepted
    for `token_ids=`/`pos_ids=`/`representations=` (the published package's names).
    """

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
        """From-scratch init: N(0, 0.02) weights, zero biases, unit norms; the two
        projections that feed the residual stream are scaled by 1/sqrt(2 * num_layers)
        so that the stream's variance does not grow with depth."""
        if any(p.is_meta for p in self.parameters()):
            return
        residual_std = INIT_STD / math.sqrt(2 * self.config.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("attention.output", "linear_outer")) else INIT_STD
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def encode(self, token_ids: torch.Tensor | None = None, pos_ids: torch.Tensor | None = None,
               *, input: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Representations `[B, S, D]` (after the final LayerNorm).

        token_ids (alias `input`): `[B, S]`, any integer dtype; pos_ids (alias
        `positions`): `[B, S]`, None means `0 .. S-1` on every row.
        """
        token_ids = pick("Model.encode", "token_ids", token_ids, "input", input)
        pos_ids = pick("Model.encode", "pos_ids", pos_ids, "positions", positions)
        if token_ids is None:
            raise TypeError("Model.encode: missing token_ids (or input=)")
        if token_ids.dtype in _NARROW_INTEGERS:
            token_ids = token_ids.long()  # nn.Embedding indexes with int32/int64 only
        if pos_ids is None:
            pos_ids = default_pos_ids(token_ids)
        if pos_ids.shape != token_ids.shape:
            raise ValueError(f"pos_ids shape {list(pos_ids.shape)} != token_ids shape "
                             f"{list(token_ids.shape)}")
        x = self.embedding(token_ids)
        return self.final_norm(self.encoder(x, pos_ids))

    def predict(self, representations: torch.Tensor | None = None, *,
                embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, S, vocab]` from representations (alias `embeddings`) `[B, S, D]`."""
        representations = pick("Model.predict", "representations", representations,
                                "embeddings", embeddings)
        return self.predictor(representations)

    def forward(self, token_ids: torch.Tensor | None = None, pos_ids: torch.Tensor | None = None,
                *, input: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, S, vocab]`; arguments as `encode`."""
        return self.predict(self.encode(token_ids, pos_ids, input=input, positions=positions))
