"""The on-chain loss for one batch: cross-entropy + 0.02 * SIGReg (SPEC §6)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soma_models.v1.aliases import pick
from soma_models.v1.configs import V1_PAD_TOKEN_ID
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg


def _target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log_softmax(logits)[target] per position `targets.shape`, 0 where the target is PAD."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.where(targets != V1_PAD_TOKEN_ID, picked, 0.0)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Σ over non-PAD targets of -log_softmax(logits)[target]. logits `[..., V]`."""
    return -jnp.sum(_target_log_probs(logits, targets))


def cross_entropy_rows(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per row, Σ over its non-PAD targets of -log_softmax(logits)[target].

    logits `[R, S, V]`, targets `[R, S]` -> `[R]`; the rows add up to `cross_entropy_sum`.
    """
    return -jnp.sum(_target_log_probs(logits, targets), axis=-1)


class LossTerms(NamedTuple):
    """The on-chain loss of one batch, term by term (scalars, differentiable); the mirror
    of `soma_models.v1.torch.loss.LossTerms`.

    loss = cross_entropy + sig_reg; cross_entropy = ce_sum / every position of the batch.
    """

    loss: jax.Array
    cross_entropy: jax.Array
    sig_reg: jax.Array
    ce_sum: jax.Array


def loss_terms(representations: jax.Array, logits: jax.Array, targets: jax.Array,
               sig_reg: SIGReg, noise: jax.Array | None = None) -> LossTerms:
    """The on-chain loss from a forward pass's outputs: representations `[B, S, D]`, logits
    `[B, S, V]`, integer targets `[B, S]`, SIGReg noise `[D, slices]` (None: drawn)."""
    ce_sum = cross_entropy_sum(logits, targets)
    cross_entropy = ce_sum / targets.size
    regulariser = sig_reg(representations, noise=noise)
    return LossTerms(cross_entropy + regulariser, cross_entropy, regulariser, ce_sum)


def compute_loss(
    model: Model,
    sig_reg: SIGReg,
    token_ids: jax.Array | np.ndarray,
    targets: jax.Array | np.ndarray,
    pos_ids: jax.Array | np.ndarray | None = None,
    noise: jax.Array | np.ndarray | None = None,
    *,
    positions: jax.Array | np.ndarray | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Differentiable on-chain loss of one batch, and its embedding.

    token_ids, targets, pos_ids (alias `positions`): `[B, S]`, any integer dtype;
    `pos_ids=None` means `0..S-1` on every row.
    noise: `[D, slices]` (None draws it from `sig_reg`'s rngs).
    Returns `(loss, embedding)`: a scalar, and `[D]` = mean over sequence, then batch,
    of the representations (PAD/EOS positions included, as on chain).

    The cross-entropy is divided by *every* position of the batch, PAD targets
    included: PAD targets add nothing to the sum but count in the mean, as on chain.
    Works under `nnx.jit` / `nnx.value_and_grad` and under `jax.jit` / `jax.grad` of a
    function that `nnx.merge`s the model. When the noise comes from `sig_reg`'s rngs, pass
    `sig_reg` into the transformed function as an argument (not a closure) so its rng
    stream may advance: `nnx.value_and_grad(lambda m, s: compute_loss(m, s, ...)[0])(model,
    sig_reg)` differentiates with respect to `model` only.
    """
    model.config.require_contract_vocab()
    token_ids, targets = jnp.asarray(token_ids), jnp.asarray(targets)
    if token_ids.shape != targets.shape or token_ids.ndim != 2:
        raise ValueError(f"token_ids and targets must both be [batch, seq_len], got "
                         f"{list(token_ids.shape)} and {list(targets.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must be integers, got dtype {targets.dtype}")
    targets = targets.astype(jnp.int32)  # any integer dtype; uint8 cannot be compared to PAD
    pos_ids = pick("compute_loss", "pos_ids", pos_ids, "positions", positions)
    representations = model.encode(token_ids, pos_ids)
    loss = loss_terms(representations, model.predict(representations), targets, sig_reg,
                      noise).loss
    embedding = representations.mean(axis=1).mean(axis=0)
    return loss, embedding
