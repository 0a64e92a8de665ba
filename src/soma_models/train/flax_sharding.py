"""Data-parallel training of the Flax model over a `jax.sharding.Mesh`.

The batch is split along its rows over the mesh's "data" axis; parameters and optimizer
state are replicated. The step is the library's (`soma_models.v1.flax.train_step`), one
`jax.jit` of the whole on-chain loss over the *global* batch, so XLA inserts the
cross-device reductions itself: N devices compute the same loss and gradient as one device
(up to float summation order) and every device applies the same AdamW update.

    mesh = data_mesh()                                   # all local devices
    step = ShardedTrainStep(model, mesh, lr=1e-3, total_steps=1000)
    loss = step(token_ids, targets, pos_ids, noise)      # numpy [B, S] arrays, B % N == 0
    step.update_model()                                  # write params back into `model`

On one host with CPU only, `XLA_FLAGS=--xla_force_host_platform_device_count=N` makes N
CPU devices (set before JAX starts). Across hosts, call `jax.distributed.initialize()`
first and build the mesh over `jax.devices()`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.train_step import make_optimizer, train_step

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named "data" over `devices` (default: every device JAX sees)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA_AXIS,))


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           min_ratio: float = 0.1) -> optax.Schedule:
    """`soma_models.train.schedule.learning_rate` as an optax schedule (same value at
    every step; tests/train/test_schedule.py checks it): linear warmup from
    `peak / warmup_steps` to `peak` over steps 0 .. warmup-1, then a half cosine from
    `peak` at step `warmup_steps` to `min_ratio * peak` at `total_steps`."""
    decay = optax.cosine_decay_schedule(peak, decay_steps=max(1, total_steps - warmup_steps),
                                        alpha=min_ratio)
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(peak / warmup_steps, peak,
                                   transition_steps=max(warmup_steps - 1, 1))
    return optax.join_schedules([warmup, decay], boundaries=[warmup_steps])


def adamw_schedule(lr: float, warmup_steps: int, total_steps: int, min_ratio: float = 0.1,
                   weight_decay: float = 0.1, grad_clip: float = 1.0,
                   betas: tuple[float, float] = (0.9, 0.95)) -> optax.GradientTransformation:
    """The torch trainer's optimizer in optax: clip, then AdamW (`flax.train_step.
    make_optimizer`: weight decay on matrices only) on the trainer's schedule."""
    return make_optimizer(learning_rate_schedule(lr, warmup_steps, total_steps, min_ratio),
                          weight_decay=weight_decay, betas=betas, eps=1e-8,
                          max_grad_norm=grad_clip if grad_clip > 0 else None)


class ShardedTrainStep:
    """One optimizer step of the on-chain loss with the batch sharded over `mesh`."""

    def __init__(self, model: Model, mesh: Mesh, *, lr: float = 1e-3, warmup_steps: int = 0,
                 total_steps: int = 1000, sig_reg_config: SIGRegConfig | None = None,
                 optimizer: optax.GradientTransformation | None = None):
        self.model = model
        self.mesh = mesh
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.rows = NamedSharding(mesh, PartitionSpec(DATA_AXIS, None))
        self.params = jax.device_put(params, self.replicated)
        self.rest = jax.device_put(rest, self.replicated)    # dropout counters: advanced
        self.tx = optimizer or adamw_schedule(lr, warmup_steps, total_steps)
        self.opt_state = jax.device_put(self.tx.init(self.params), self.replicated)
        sig_reg = SIGReg(sig_reg_config or SIGRegConfig())
        step = functools.partial(train_step, self.graphdef, sig_reg, self.tx)

        self._step = jax.jit(
            step,
            in_shardings=(self.replicated, self.replicated, self.replicated, self.rows,
                          self.rows, self.rows, self.replicated),
            out_shardings=(self.replicated,) * 4,
            donate_argnums=(0, 1, 2))

    def __call__(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                 noise: np.ndarray) -> float:
        """Train on one global batch (`[B, S]` arrays, B divisible by the mesh size)."""
        devices = self.mesh.devices.size
        if token_ids.shape[0] % devices:
            raise ValueError(f"batch of {token_ids.shape[0]} rows cannot be split evenly over "
                             f"{devices} devices")

        def put(a, s):
            return jax.device_put(jnp.asarray(a), s)

        self.params, self.rest, self.opt_state, loss = self._step(
            self.params, self.rest, self.opt_state, put(token_ids, self.rows),
            put(targets, self.rows),
            put(pos_ids.astype(np.int32), self.rows), put(noise, self.replicated))
        return float(loss)

    def update_model(self) -> Model:
        """Write the trained parameters back into the `Model` (then `model.save(...)`)."""
        nnx.update(self.model, jax.device_get(self.params), jax.device_get(self.rest))
        return self.model
