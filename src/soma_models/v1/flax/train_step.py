"""The Flax training step: optimizer and one step of the on-chain loss, as pure functions.

The mirror of `soma_models.v1.torch.train_step`. `ShardedTrainStep`
(`soma_models.train.flax_sharding`) jits `train_step` with its batch sharded over a mesh;
examples/flax_train_step.py jits it on one device:

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(3e-4, weight_decay=0.1, max_grad_norm=1.0)
    opt_state = optimizer.init(params)
    step = jax.jit(functools.partial(train_step, graphdef, sig_reg, optimizer))
    params, rest, opt_state, loss = step(params, rest, opt_state,
                                         token_ids, targets, pos_ids, noise)
    nnx.update(model, params, rest)            # then model.save(...)

The loss is `soma_models.v1.flax.loss.compute_loss`, differentiated with respect to the
parameters only. `rest` (everything but the parameters: the dropout streams' counters) goes
in and comes out advanced, so every step draws new dropout masks; binding it into the jitted
function instead would freeze the masks. The SIGReg noise is an argument (`[D, slices]`,
fresh per step), drawn by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx

from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.weight_decay import is_decayed


def decay_mask(params: nnx.State) -> nnx.State:
    """True where AdamW's weight decay applies (`soma_models.v1.weight_decay.is_decayed`:
    matrices), False for biases and norms; a tree shaped like `params`."""
    return jax.tree_util.tree_map(lambda p: is_decayed(p.shape), params)


def make_optimizer(learning_rate: float | Callable[[jax.Array], jax.Array] = 3e-4,
                   weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8, max_grad_norm: float | None = None
                   ) -> optax.GradientTransformation:
    """AdamW with weight decay on matrices only (`decay_mask`); gradients clipped to a
    global norm of `max_grad_norm` first when it is set. `learning_rate` may be an optax
    schedule (a function of the step count)."""
    adamw = optax.adamw(learning_rate, b1=betas[0], b2=betas[1], eps=eps,
                        weight_decay=weight_decay, mask=decay_mask)
    if max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw)


def train_step(graphdef: nnx.GraphDef, sig_reg: SIGReg, optimizer: optax.GradientTransformation,
               params: nnx.State, rest: nnx.State, opt_state: optax.OptState,
               token_ids: jax.Array, targets: jax.Array, pos_ids: jax.Array, noise: jax.Array
               ) -> tuple[nnx.State, nnx.State, optax.OptState, jax.Array]:
    """One AdamW step on the on-chain loss of a `[B, S]` batch with SIGReg noise `[D, slices]`.

    `graphdef`, `params`, `rest`: `nnx.split(model, nnx.Param, ...)`. Returns the new
    parameters, the advanced `rest` (new dropout masks next step), the new optimizer state
    and the loss before the update. Pure: jit it with `graphdef`, `sig_reg` and `optimizer`
    bound (e.g. `functools.partial`).
    """

    # A copy, so that the caller's `rest` is never advanced in place (eager calls share
    # Variables otherwise). nnx.value_and_grad differentiates the Params and carries the
    # dropout counters' updates back to `model` across the gradient's trace.
    model = nnx.merge(graphdef, params, rest, copy=True)

    def loss_of(model: nnx.Module) -> jax.Array:
        return compute_loss(model, sig_reg, token_ids, targets, pos_ids, noise)[0]

    loss, grads = nnx.value_and_grad(loss_of)(model)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), nnx.split(model, nnx.Param, ...)[2], \
        opt_state, loss
