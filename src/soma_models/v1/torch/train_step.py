"""The torch training step: optimizer, speed options, and one step of the on-chain loss.

`soma-models train` (`soma_models.train.trainer`) runs exactly these functions; a script
that trains on its own uses `train_step`:

    model = Model(preset("medium"))
    optimizer = make_optimizer(model, lr=3e-4, weight_decay=0.1)
    prepare_model(model, activation_checkpointing=False, compile=False)
    result = train_step(model, SIGReg(), optimizer, (token_ids, targets, pos_ids))

A step is `backward` (forward, the on-chain loss of `soma_models.v1.torch.loss`, and its
gradient; once per micro-batch when gradients are accumulated) then `apply_update`
(clip, AdamW).

What makes it fast (measured in benchmarks/bench.py):
* attention runs PyTorch's flash kernel (memory linear in the sequence length), with
  the runtime's -1e4 fill kept exact (see modules/attention.py);
* SIGReg is chunked with a hand-written backward (modules/sig_reg.py);
* AdamW is the fused kernel where PyTorch has one for the parameters' device (CPU and
  CUDA in recent PyTorch), else the multi-tensor `foreach` one;
* optional: bfloat16 autocast with float32 master weights, activation checkpointing
  (recompute each block in the backward pass), `torch.compile`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from soma_models.v1.torch.loss import LossTerms, loss_terms
from soma_models.v1.torch.modules.attention import MultiHeadAttention
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg
from soma_models.v1.weight_decay import is_decayed

OPTIMIZER_IMPLEMENTATIONS = ("auto", "fused", "foreach", "loop")


def _check_model(model: nn.Module) -> Model:
    if not isinstance(model, Model):
        raise TypeError(f"expected a soma_models V1 torch Model, got {type(model).__name__}")
    return model


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, in `model.parameters()` order within each: the parameters
    `soma_models.v1.weight_decay.is_decayed` (matrices) with `weight_decay`, the rest
    (biases, norms) without."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if is_decayed(param.shape) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                   implementation: str = "auto") -> torch.optim.AdamW:
    """AdamW over `model`'s parameters (`parameter_groups`: weight decay on matrices only).

    implementation: "auto" (fused where supported, else foreach), "fused", "foreach",
    or "loop" (PyTorch's per-parameter reference loop; for comparisons, and for
    FSDP-sharded parameters).
    """
    if implementation not in OPTIMIZER_IMPLEMENTATIONS:
        raise ValueError(f"optimizer implementation must be auto, fused, foreach or loop, "
                         f"got {implementation!r}")
    groups = parameter_groups(model, weight_decay)
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if implementation == "auto":
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):   # no fused kernel for this device/dtype
            return torch.optim.AdamW(groups, foreach=True, **kwargs)
    if implementation == "fused":
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=implementation == "foreach", **kwargs)


def check_bf16_autocast(device: torch.device) -> None:
    """The bf16 policy: autocast wherever the device computes in bfloat16.

    That is CUDA devices with bf16 support, and CPUs: PyTorch's CPU autocast runs
    everywhere, is fast on CPUs with native bf16 units (AMX, AVX512-BF16) and slower
    than float32 without them (most x86 CPUs before AMX), which is the user's call, not
    a correctness problem. Weights, optimizer state, the loss and SIGReg stay float32
    either way. Anything else is refused with the reason.
    """
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError("bf16 autocast requested but this CUDA device has no bfloat16 "
                             "support")
    elif device.type != "cpu":
        raise ValueError(f"bf16 autocast is supported on CUDA and CPU devices, not "
                         f"{device.type}")


def check_compile(device: torch.device, backend: str | Callable[..., Any] = "inductor"
                  ) -> None:
    """Refuse, in one line, a `torch.compile` of the blocks that cannot work on `device`.

    The default backend (inductor) generates Triton kernels on CUDA and C++ on the CPU,
    so it needs Triton, or a C++ compiler (`$CXX`, g++ or clang++), respectively.
    """
    if not hasattr(torch.compiler, "set_stance"):
        raise ValueError(f"compiling the blocks needs torch >= 2.6 (torch.compiler.set_stance "
                         f"keeps evaluation eager), found torch {torch.__version__}")
    if backend != "inductor":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("torch.compile on CUDA needs Triton (pip install triton), which is "
                             "not installed")
    elif device.type == "cpu":
        compilers = (os.environ.get("CXX"), "g++", "clang++")
        if not any(name and shutil.which(name) for name in compilers):
            raise ValueError("torch.compile on the CPU needs a C++ compiler ($CXX, g++ or "
                             "clang++), and none was found on PATH")
    else:
        raise ValueError(f"torch.compile is supported on CUDA and CPU devices, not {device.type}")


def prepare_model(model: Model, *, activation_checkpointing: bool = False,
                  compile: bool = False, fused_attention: bool = True,
                  compile_backend: str | Callable[..., Any] = "inductor") -> Model:
    """Set the speed/memory options on `model` in place, and return it.

    activation_checkpointing: recompute each encoder block in the backward pass
        (activation memory of one block instead of all; ~1/3 more compute). Gradients
        are bit for bit the same.
    compile: `torch.compile` each encoder block in place (`nn.Module.compile`, so the
        state dict keeps its canonical keys, and DDP and FSDP2 wrap the model as usual;
        `check_compile` refuses devices where it cannot work). Blocks are compiled
        rather than the whole step because every block is the same graph: it is traced
        once and reused, and it is the unit FSDP2 shards. The exact attention's fill
        check is data dependent, so each block is two graphs around it. The first step
        pays the compile time; see benchmarks/README.md for whether it pays off.
    fused_attention: False forces the materialised O(S^2) attention (comparisons only).
    compile_backend: `torch.compile`'s backend, a name or a callable ("inductor";
        "aot_eager" traces the same graphs without generating code: tests).

    Compiled blocks run only in the training forward; evaluating the model (eval mode
    or no autograd: held-out loss, the exact score) runs them eagerly (`Encoder`).
    """
    _check_model(model)
    model.encoder.activation_checkpointing = activation_checkpointing
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fused = fused_attention
    if compile:
        check_compile(model.embedding.weight.device, compile_backend)
        for layer in model.encoder.layers:
            layer.compile(backend=compile_backend)
    return model


@dataclass(frozen=True)
class StepResult:
    """Detached float values of one step (the loss before the update)."""

    loss: float
    cross_entropy: float
    sig_reg: float
    grad_norm: float | None


def batch_tensors(batch: Any, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(token_ids, targets, pos_ids) as int64 `[B, S]` tensors on `device`, from a tuple
    of arrays/tensors or an `ArrayBatch`."""
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


def forward(module: nn.Module, token_ids: torch.Tensor, pos_ids: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(representations `[B, S, D]`, logits `[B, S, vocab]`).

    `module` is a `Model`, or a wrapper whose `forward(token_ids, pos_ids)` returns both
    (DDP and FSDP hook `forward`, so a wrapped model must produce both in one call; see
    `soma_models.train.distributed.TrainingModule`).
    """
    if isinstance(module, Model):
        representations = module.encode(token_ids, pos_ids)
        return representations, module.predict(representations)
    return module(token_ids, pos_ids)


def backward(module: nn.Module, sig_reg: SIGReg, token_ids: torch.Tensor,
             targets: torch.Tensor, pos_ids: torch.Tensor, *,
             noise: torch.Tensor | None = None, sig_reg_rows: torch.Tensor | None = None,
             autocast_bf16: bool = False, accumulation: int = 1) -> LossTerms:
    """Forward, the on-chain loss, and `(loss / accumulation).backward()`; returns the terms.

    Gradients add to what `.grad` holds: over `accumulation` micro-batches they sum to
    the gradient of the mean loss.
    autocast_bf16: the forward runs in bfloat16 autocast (`check_bf16_autocast`); the
    loss and SIGReg are computed in float32 from its outputs.
    """
    device = token_ids.device
    if autocast_bf16:
        check_bf16_autocast(device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        representations, logits = forward(module, token_ids, pos_ids)
    terms = loss_terms(representations, logits, targets, sig_reg, noise, sig_reg_rows)
    (terms.loss / accumulation if accumulation != 1 else terms.loss).backward()
    return terms


def apply_update(optimizer: torch.optim.Optimizer, parameters: Iterable[torch.Tensor],
                 max_grad_norm: float | None = None,
                 before_step: Callable[[float | None], None] | None = None) -> float | None:
    """Clip the gradients' global norm to `max_grad_norm` (if set) and take the optimizer
    step. Returns the norm before clipping (None without clipping; `float("inf")`
    measures it without clipping). The gradients stay in `.grad` until the caller
    clears them (`train_step` before its backward, the trainer right after the update).
    `before_step(grad_norm)`, if given, runs between the clip and the step; raising there
    skips the step (the trainer refuses a non-finite loss or norm that way)."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm))
    if before_step is not None:
        before_step(grad_norm)
    optimizer.step()
    return grad_norm


def train_step(model: Model, sig_reg: SIGReg, optimizer: torch.optim.Optimizer,
               batch: Any, *, noise: torch.Tensor | None = None,
               autocast_bf16: bool = False, max_grad_norm: float | None = None,
               ) -> StepResult:
    """One optimizer step on the on-chain loss of `batch`.

    model: a `Model` (options set by `prepare_model`). batch: (token_ids, targets,
    pos_ids) `[B, S]` each, or an object with those attributes (`ArrayBatch`).
    noise: SIGReg's `[D, slices]` noise (None: fresh `torch.randn`, as in training).
    autocast_bf16: run the forward in bfloat16 autocast, weights and optimizer state
        stay float32 (see `check_bf16_autocast`). max_grad_norm: clip if set.
    """
    _check_model(model)
    device = model.embedding.weight.device
    token_ids, targets, pos_ids = batch_tensors(batch, device)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    terms = backward(model, sig_reg, token_ids, targets, pos_ids, noise=noise,
                     autocast_bf16=autocast_bf16)
    grad_norm = apply_update(optimizer, model.parameters(), max_grad_norm)
    return StepResult(float(terms.loss.detach()), float(terms.cross_entropy.detach()),
                      float(terms.sig_reg.detach()), grad_norm)
