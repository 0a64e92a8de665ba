"""Fast training-step helpers: optimizer, speed options, and one step of the on-chain loss.

    model = Model(preset("medium"))
    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    prepare_model(model, activation_checkpointing=False, compile=False)
    result = train_step(model, SIGReg(), optimizer, (token_ids, targets, pos_ids))

What makes it fast (each measured in benchmarks/bench.py):
* attention runs PyTorch's flash kernel (memory linear in the sequence length), with
  the runtime's -1e4 fill kept exact (see modules/attention.py);
* SIGReg is chunked with a hand-written backward (modules/sig_reg.py);
* AdamW is the fused kernel where PyTorch has one for the parameters' device (CPU and
  CUDA in recent PyTorch), else the multi-tensor `foreach` one;
* optional: bfloat16 autocast with float32 master weights (CUDA only), activation
  checkpointing (recompute each block in the backward pass), `torch.compile`.

The loss is exactly `soma_models.v1.torch.loss.compute_loss`'s: cross-entropy summed over
non-PAD targets divided by every position, plus `coefficient * SIGReg(representations)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from soma_models.v1.torch.loss import cross_entropy_sum
from soma_models.v1.torch.modules.attention import MultiHeadAttention
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg


def _check_model(model: nn.Module) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"expected a soma_models V1 torch Model, got {type(model).__name__}")
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: matrices (linears, embedding) decay, biases and norms do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   implementation: str = "auto") -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (weight decay on matrices only).

    implementation: "auto" (fused where supported, else foreach), "fused", "foreach",
    or "loop" (PyTorch's per-parameter reference loop; for comparisons).
    """
    groups = parameter_groups(model, weight_decay)
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if implementation == "auto":
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):   # no fused kernel for this device/dtype
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if implementation == "fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    if implementation == "foreach":
        return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if implementation == "loop":
        return torch.optim.AdamW(groups, foreach=False, **kwargs)
    raise ValueError(f"optimizer implementation must be auto, fused, foreach or loop, "
                     f"got {implementation!r}")


def check_bf16_autocast(device: torch.device) -> None:
    """bfloat16 autocast is offered on CUDA only; refuse anything else with the reason."""
    if device.type != "cuda":
        raise ValueError(
            f"bf16 autocast is only supported on CUDA devices (model is on {device.type}): "
            f"CPU bfloat16 matmuls are slower than float32 without native bf16 units and "
            f"this library trains in float32 there")
    if not torch.cuda.is_bf16_supported():
        raise ValueError("bf16 autocast requested but this CUDA device has no bfloat16 support")


def prepare_model(model: Model, *, activation_checkpointing: bool = False,
                  compile: bool = False, fused_attention: bool = True) -> Model:
    """Set the speed/memory options on `model` in place, and return it.

    activation_checkpointing: recompute each encoder block in the backward pass
        (activation memory of one block instead of all; ~1/3 more compute).
    compile: `torch.compile` each encoder block in place (`nn.Module.compile`, so the
        state dict keeps its canonical keys). The first steps pay the compile time;
        see benchmarks/README.md for whether it pays off on your machine.
    fused_attention: False forces the materialised O(S^2) attention (comparisons only).
    """
    _check_model(model)
    model.encoder.activation_checkpointing = activation_checkpointing
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused = fused_attention
    if compile:
        for layer in model.encoder.layers:
            layer.compile()
    return model


@dataclass(frozen=True)
class StepResult:
    """Detached float values of one step (the loss before the update)."""

    loss: float
    cross_entropy: float
    sig_reg: float
    grad_norm: float | None


def _batch_tensors(batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(token_ids, targets, pos_ids) as int64 tensors from a tuple or an ArrayBatch."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 3:
            raise ValueError(f"batch must be (token_ids, targets, pos_ids), got {len(batch)} items")
        parts: Iterable[Any] = batch
    else:
        parts = (batch.token_ids, batch.targets, batch.pos_ids)
    tensors = tuple(
        (p if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p))).to(
            device=device, dtype=torch.int64) for p in parts)
    token_ids, targets, pos_ids = tensors
    if token_ids.ndim != 2 or targets.shape != token_ids.shape or pos_ids.shape != token_ids.shape:
        raise ValueError(f"token_ids, targets and pos_ids must all be [batch, seq_len], got "
                         f"{list(token_ids.shape)}, {list(targets.shape)}, {list(pos_ids.shape)}")
    return tensors


def loss_terms(model: Model, sig_reg: SIGReg, token_ids: torch.Tensor,
               targets: torch.Tensor, pos_ids: torch.Tensor,
               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross_entropy, coefficient * SIGReg): the on-chain loss's two terms, differentiable."""
    representations = model.encode(token_ids, pos_ids)
    logits = model.predict(representations)
    cross_entropy = cross_entropy_sum(logits, targets) / targets.numel()
    return cross_entropy, sig_reg(representations.float(), noise=noise)


def train_step(model: Model, sig_reg: SIGReg, optimizer: torch.optim.Optimizer,
               batch: Any, *, noise: torch.Tensor | None = None,
               autocast_bf16: bool = False, max_grad_norm: float | None = None,
               ) -> StepResult:
    """One optimizer step on the on-chain loss of `batch`.

    model: a `Model` (options set by `prepare_model`). batch: (token_ids, targets,
    pos_ids) `[B, S]` each, or an object with those attributes (`ArrayBatch`).
    noise: SIGReg's `[D, slices]` noise (None: fresh `torch.randn`, as in training).
    autocast_bf16: run the forward in bfloat16 autocast, weights and optimizer state
        stay float32 (CUDA only; refused elsewhere). max_grad_norm: clip if set.
    """
    _check_model(model)
    device = model.embedding.weight.device
    token_ids, targets, pos_ids = _batch_tensors(batch, device)
    if autocast_bf16:
        check_bf16_autocast(device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        cross_entropy, regulariser = loss_terms(model, sig_reg, token_ids, targets, pos_ids,
                                                noise)
    loss = cross_entropy + regulariser
    loss.backward()
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
    optimizer.step()
    return StepResult(float(loss.detach()), float(cross_entropy.detach()),
                      float(regulariser.detach()), grad_norm)

