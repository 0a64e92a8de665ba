"""The on-chain loss for one batch: cross-entropy + 0.02 * SIGReg (SPEC §6).

This file is the loss's only torch definition: `compute_loss` (the public one-call form),
the training step (`soma_models.v1.torch.train_step`, which `soma-models train` runs) and
the scoring backend (`evaluate.py`, through `cross_entropy_sum`) all build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from soma_models.v1.aliases import pick
from soma_models.v1.configs import V1_PAD_TOKEN_ID
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ over non-PAD targets of -log_softmax(logits)[target]. logits `[..., V]`."""
    # cross_entropy indexes with int64 only; ids arrive as int32 (iter_batches) or narrower.
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           targets.reshape(-1).long(), ignore_index=V1_PAD_TOKEN_ID,
                           reduction="sum")


@dataclass(frozen=True)
class LossTerms:
    """The on-chain loss of one batch, term by term (scalar tensors, differentiable).

    loss = cross_entropy + sig_reg; cross_entropy = ce_sum / every position of the batch.
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    sig_reg: torch.Tensor
    ce_sum: torch.Tensor


def loss_terms(representations: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               sig_reg: SIGReg, noise: torch.Tensor | None = None,
               sig_reg_rows: torch.Tensor | None = None) -> LossTerms:
    """The on-chain loss from a forward pass's outputs.

    representations: `[B, S, D]`; logits: `[B, S, vocab]`; targets: `[B, S]`.
    noise: SIGReg's `[D, slices]` (None draws it from torch's RNG).
    sig_reg_rows: optional indices into the `B * S` flattened positions: SIGReg on those
        only. SIGReg is a mean over positions, so a uniform random subset is an unbiased
        estimate of it (a training option; the chain uses every position).

    The cross-entropy is divided by *every* position of the batch, PAD targets
    included: PAD targets add nothing to the sum but count in the mean, as on chain.
    A SIGReg coefficient of 0 skips the statistic (it would be multiplied by 0).
    """
    ce_sum = cross_entropy_sum(logits, targets)
    cross_entropy = ce_sum / targets.numel()
    if sig_reg.config.coefficient == 0:
        regulariser = cross_entropy.new_zeros(())
    else:
        flat = representations.reshape(-1, representations.shape[-1])
        if sig_reg_rows is not None:
            flat = flat[sig_reg_rows]
        regulariser = sig_reg(flat, noise=noise)
    return LossTerms(cross_entropy + regulariser, cross_entropy, regulariser, ce_sum)


def _as_tensor(x: object, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.as_tensor(np.asarray(x), device=device)


def compute_loss(
    model: Model,
    sig_reg: SIGReg,
    token_ids: torch.Tensor,
    targets: torch.Tensor,
    pos_ids: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    *,
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable on-chain loss of one batch, and its embedding.

    token_ids, targets, pos_ids (alias `positions`): `[B, S]`, any integer dtype;
    `pos_ids=None` means `0..S-1` on every row.
    noise: `[D, slices]` (None draws it from torch's RNG).
    Returns `(loss, embedding)`: a scalar, and `[D]` = mean over sequence, then batch,
    of the representations (PAD/EOS positions included, as on chain).
    The terms are `loss_terms`'s.
    """
    model.config.require_contract_vocab()
    device = model.embedding.weight.device
    token_ids, targets = _as_tensor(token_ids, device), _as_tensor(targets, device)
    if token_ids.shape != targets.shape or token_ids.ndim != 2:
        raise ValueError(f"token_ids and targets must both be [batch, seq_len], got "
                         f"{list(token_ids.shape)} and {list(targets.shape)}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    pos_ids = pick("compute_loss", "pos_ids", pos_ids, "positions", positions)
    if pos_ids is not None:
        pos_ids = _as_tensor(pos_ids, device)
    if noise is not None:
        noise = _as_tensor(noise, device)
    representations = model.encode(token_ids, pos_ids)
    terms = loss_terms(representations, model.predict(representations), targets, sig_reg,
                       noise)
    embedding = representations.mean(dim=1).mean(dim=0)
    return terms.loss, embedding
