"""The stack of transformer blocks (no final norm: the model owns it)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soma_models.v1.aliases import pick
from soma_models.v1.configs import EncoderConfig, LayerConfig, ModelConfig
from soma_models.v1.torch.modules.attention import compute_dtype
from soma_models.v1.torch.modules.layer import Layer

__all__ = ["Encoder", "EncoderConfig", "Layer", "LayerConfig"]


def _eager_blocks() -> contextlib.AbstractContextManager:
    """Blocks compiled for training (`train_step.prepare_model(compile=True)`) run eagerly
    when evaluating: scores are the eager float32 computation, bit for bit, whatever code
    the compiler would have generated. Inside a graph being traced (someone compiled the
    whole model) there is nothing to switch, and torch < 2.6 has no stance to switch to
    (`train_step.check_compile` refuses to compile blocks there)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return set_stance("force_eager")


class Encoder(nn.Module):
    """`num_layers` pre-norm blocks: `[B, S, D]`, pos_ids `[B, S]` -> `[B, S, D]`.

    `config`: an `EncoderConfig`, or any config with its fields (`ModelConfig`).
    """

    def __init__(self, config: EncoderConfig | ModelConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        #: Recompute each block's activations in the backward pass (saves memory).
        self.activation_checkpointing = False

    def forward(self, input: torch.Tensor, pos_ids: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`input` `[B, S, D]`; `pos_ids` (alias `positions`) `[B, S]`, None: 0..S-1."""
        x = input
        pos_ids = pick("Encoder", "pos_ids", pos_ids, "positions", positions)
        if pos_ids is None:
            pos_ids = torch.arange(x.shape[1], device=x.device).expand(x.shape[:2])
        if len(self.layers) == 0:
            return x
        # Every layer rotates by the same positions: RoPE's tables once per forward, in
        # the dtype q and k come out in (bf16 under autocast), so no layer casts them.
        rope = self.layers[0].attention.rope_tables(pos_ids, compute_dtype(x))
        training = self.training and torch.is_grad_enabled()
        with contextlib.nullcontext() if training else _eager_blocks():
            for layer in self.layers:
                if self.activation_checkpointing and training:
                    x = checkpoint(layer, x, pos_ids, rope=rope, use_reentrant=False)
                else:
                    x = layer(x, pos_ids, rope=rope)
        return x
