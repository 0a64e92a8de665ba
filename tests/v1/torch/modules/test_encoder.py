"""The encoder computes RoPE's tables once per forward and hands them to every layer;
that must be bit-for-bit what each layer computing its own from the positions gives
(outputs and gradients, with and without activation checkpointing: checkpointing
changes no gradient bit). The rotation is the half-split formula, bit for bit."""

from __future__ import annotations

import pytest
import torch

from soma_models.v1.configs import ModelConfig
from soma_models.v1.rope import rope_timescales
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


def test_rotate_is_the_half_split_formula_bit_for_bit() -> None:
    # rotate computes x cos + swap(x) signed_sin; the formula is written with the halves:
    # concat(a cos - b sin, b cos + a sin), angles from the float32 timescales.
    x, pos = _inputs(3)
    heads = x.view(2, 40, CONFIG.num_heads, CONFIG.head_dim)
    timescale = torch.from_numpy(rope_timescales(CONFIG.head_dim, CONFIG.max_wavelength).copy())
    angle = (pos.to(torch.float32)[:, :, None] / timescale)[:, :, None, :]
    sin, cos = torch.sin(angle), torch.cos(angle)
    a, b = heads[..., : CONFIG.head_dim // 2], heads[..., CONFIG.head_dim // 2 :]
    expected = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    tables = rope_tables(pos, CONFIG.head_dim, CONFIG.max_wavelength)
    assert torch.equal(rotate(heads, tables), expected)


def test_tables_in_the_compute_dtype() -> None:
    # Built once in bf16 (what the encoder does under autocast), the tables are the
    # float32 ones rounded once, and rotating with them needs no cast.
    _, pos = _inputs(4)
    full = rope_tables(pos, CONFIG.head_dim, CONFIG.max_wavelength)
    low = rope_tables(pos, CONFIG.head_dim, CONFIG.max_wavelength, dtype=torch.bfloat16)
    for f, b in zip(full, low, strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(b, f.to(torch.bfloat16))
    heads = torch.randn(2, 40, CONFIG.num_heads, CONFIG.head_dim).to(torch.bfloat16)
    assert torch.equal(rotate(heads, low), rotate(heads, full))


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


def test_a_model_compiled_whole_evaluates_and_trains() -> None:
    # The encoder keeps compiled blocks eager when evaluating; a model someone compiles
    # whole is traced through that switch instead (no stance change inside a graph).
    torch.manual_seed(7)
    model = Model(CONFIG).eval()
    compiled = torch.compile(model, backend="aot_eager")
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(compiled(tokens), model(tokens))
    model.train()
    compiled(tokens).sum().backward()
    assert model.embedding.weight.grad is not None
