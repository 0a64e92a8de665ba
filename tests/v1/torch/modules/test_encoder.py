"""The encoder computes RoPE's sin/cos once per forward and hands them to every layer;
that must be bit-for-bit what each layer computing its own from the positions gives
(outputs and gradients, with and without activation checkpointing)."""

from __future__ import annotations

import pytest
import torch

from soma_models.v1.configs import ModelConfig
from soma_models.v1.torch.modules.attention import apply_rope, rope_tables, rotate
from soma_models.v1.torch.modules.model import Model

CONFIG = ModelConfig(embedding_dim=32, pwff_hidden_dim=64, num_layers=3, num_heads=4)


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 40, CONFIG.embedding_dim, generator=generator)
    # Large, uneven positions: where the angle's rounding is most visible.
    pos = torch.randint(0, 2**20, (2, 40), generator=generator)
    return x, pos


def _per_layer(encoder: torch.nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    for layer in encoder.layers:
        x = layer(x, pos)            # no tables given: the layer computes its own
    return x


def test_tables_match_apply_rope() -> None:
    x, pos = _inputs()
    heads = x.view(2, 40, CONFIG.num_heads, CONFIG.head_dim)
    tables = rope_tables(pos, CONFIG.head_dim, CONFIG.max_wavelength)
    assert torch.equal(rotate(heads, tables), apply_rope(heads, pos, CONFIG.max_wavelength))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_tables_are_bit_identical(checkpointing: bool) -> None:
    torch.manual_seed(0)
    encoder = Model(CONFIG).encoder.train()
    encoder.activation_checkpointing = checkpointing
    x, pos = _inputs(1)
    weights = torch.randn(2, 40, CONFIG.embedding_dim, generator=torch.Generator().manual_seed(2))

    results = []
    for run in (encoder, lambda a, b: _per_layer(encoder, a, b)):
        encoder.zero_grad()
        leaf = x.clone().requires_grad_(True)
        out = run(leaf, pos)
        (out * weights).sum().backward()
        grads = [leaf.grad] + [p.grad.clone() for p in encoder.parameters()]
        results.append((out.detach(), grads))
    (shared, shared_grads), (own, own_grads) = results
    assert torch.equal(shared, own)
    assert all(torch.equal(a, b) for a, b in zip(shared_grads, own_grads, strict=True))
