"""The on-chain loss for one batch: cross-entropy + 0.02 * SIGReg (SPEC §6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from soma_models.v1.aliases import pick
from soma_models.v1.configs import V1_PAD_TOKEN_ID
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg


def cross_entropy_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Σ over non-PAD targets of -log_softmax(logits)[target]. logits `[..., V]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return -jnp.sum(jnp.where(targets != V1_PAD_TOKEN_ID, picked, 0.0))


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
    logits = model.predict(representations)
    cross_entropy = cross_entropy_sum(logits, targets) / targets.size
    loss = cross_entropy + sig_reg(representations, noise=noise)
    embedding = representations.mean(axis=1).mean(axis=0)
    return loss, embedding
