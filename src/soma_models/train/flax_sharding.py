"""Data-parallel training of the Flax model over a `jax.sharding.Mesh`.

The batch is split along its rows over the mesh's "data" axis; parameters and optimizer
state are replicated. The step is one `jax.jit` of the whole on-chain loss over the
*global* batch, so XLA inserts the cross-device reductions itself: N devices compute
the same loss and gradient as one device (up to float summation order) and every
device applies the same AdamW update.

    mesh = data_mesh()                                   # all local devices
    step = ShardedTrainStep(model, mesh, lr=1e-3, total_steps=1000)
    loss = step(token_ids, targets, pos_ids, noise)      # numpy [B, S] arrays, B % N == 0
    step.update_model()                                  # write params back into `model`

On one host with CPU only, `XLA_FLAGS=--xla_force_host_platform_device_count=N` makes N
CPU devices (set before JAX starts). Across hosts, call `jax.distributed.initialize()`
first and build the mesh over `jax.devices()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device JAX sees)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def adamw_schedule(lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
                   weight_decay: float = 0.1, grad_clip: float = 1.0,
                   betas: tuple[float, float] = (0.9, 0.95)) -> optax.GradientTransformation:
    """The torch trainer's optimizer in optax: clip, then AdamW with warmup + cosine;
    weight decay on matrices only."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=lr / max(warmup_steps, 1), peak_value=lr,
        warmup_steps=max(warmup_steps - 1, 0), decay_steps=max(total_steps - 1, 1),
        end_value=lr * min_ratio)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=betas[0], b2=betas[1], eps=1e-8, weight_decay=weight_decay,
                    mask=decay_mask))


class ShardedTrainStep:
    """One optimizer step of the on-chain loss with the batch sharded over `mesh`."""

    def __init__(self, model: Model, mesh: Mesh, *, lr: float = 1e-3, warmup_steps: int = 0,
                 total_steps: int = 1000, sig_reg_config: SIGRegConfig | None = None,
                 optimizer: optax.GradientTransformation | None = None):
        self.model = model
        self.mesh = mesh
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS, None))
        self.params = jax.device_put(params, self.replicated)
        self.tx = optimizer or adamw_schedule(lr, warmup_steps, total_steps)
        self.opt_state = jax.device_put(self.tx.init(self.params), self.replicated)
        sig_reg = SIGReg(sig_reg_config or SIGRegConfig())
        graphdef, rest = self.graphdef, self.rest

        def loss_fn(params, token_ids, targets, pos_ids, noise):
            model = nnx.merge(graphdef, params, rest)
            loss, _ = compute_loss(model, sig_reg, token_ids, targets, pos_ids, noise)
            return loss

        def step(params, opt_state, token_ids, targets, pos_ids, noise):
            loss, grads = jax.value_and_grad(loss_fn)(params, token_ids, targets, pos_ids,
                                                      noise)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(
            step,
            in_shardings=(self.replicated, self.replicated, self.rows, self.rows, self.rows,
                          self.replicated),
            out_shardings=(self.replicated, self.replicated, self.replicated),
            donate_argnums=(0, 1))

    def __call__(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                 noise: np.ndarray) -> float:
        """Train on one global batch (`[B, S]` arrays, B divisible by the mesh size)."""
        devices = self.mesh.devices.size
        if token_ids.shape[0] % devices:
            raise ValueError(f"batch of {token_ids.shape[0]} rows cannot be split evenly over "
                             f"{devices} devices")
        put = lambda a, s: jax.device_put(jnp.asarray(a), s)
        self.params, self.opt_state, loss = self._step(
            self.params, self.opt_state, put(token_ids, self.rows), put(targets, self.rows),
            put(pos_ids.astype(np.int32), self.rows), put(noise, self.replicated))
        return float(loss)

    def update_model(self) -> Model:
        """Write the trained parameters back into the `Model` (then `model.save(...)`)."""
        nnx.update(self.model, jax.device_get(self.params))
        return self.model
