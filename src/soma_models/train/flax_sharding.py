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
CPU devices (set before JAX starts). Across hosts, call `initialize_from_env()` first
(`jax.distributed.initialize`, configured from the environment; see `distributed_settings`)
and build the mesh over `jax.devices()`, every host's devices: each process then passes
its own rows, `B / jax.process_count()` of the global batch, and the same noise.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from soma_models.v1.configs import SIGRegConfig
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.train_step import make_optimizer, train_step

DATA_AXIS = "data"


# (variable, what it names) read by `distributed_settings`, JAX's names first.
_COORDINATOR = ("JAX_COORDINATOR_ADDRESS", "MASTER_ADDR")
_PROCESS_COUNT = ("JAX_NUM_PROCESSES", "WORLD_SIZE")
_PROCESS_ID = ("JAX_PROCESS_ID", "RANK")
# Launchers whose environment `jax.distributed.initialize()` reads by itself.
_AUTO_DETECTED = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _first(environ: Mapping[str, str], names: Sequence[str]) -> tuple[str, str] | None:
    for name in names:
        if environ.get(name, "") != "":
            return name, environ[name]
    return None


def _count(found: tuple[str, str], minimum: int) -> int:
    name, text = found
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer >= "
                         f"{minimum}")
    return value


def distributed_settings(environ: Mapping[str, str] | None = None) -> dict | None:
    """The `jax.distributed.initialize` arguments the environment describes, `{}` to let
    JAX detect a SLURM or Open MPI launch itself, or None for a single process.

    Read, JAX's names first, then torchrun's: the coordinator `JAX_COORDINATOR_ADDRESS`
    (host:port) or `MASTER_ADDR` (JAX's coordinator at port `MASTER_PORT` + 1, since
    torchrun's store holds `MASTER_PORT`, default 29500); the number of processes
    `JAX_NUM_PROCESSES` or `WORLD_SIZE`; this process's index `JAX_PROCESS_ID` or `RANK`.
    One process (count 1, or no coordinator and no count) is None. A bad value is a
    one-line ValueError naming the variable.
    """
    environ = os.environ if environ is None else environ
    count = _first(environ, _PROCESS_COUNT)
    processes = _count(count, 1) if count else None
    coordinator = _first(environ, _COORDINATOR)
    if processes == 1:
        return None
    if coordinator is None:
        if processes is not None:
            raise ValueError(f"environment variable {count[0]}={processes} asks for several "
                             f"processes but neither {' nor '.join(_COORDINATOR)} names the "
                             "coordinator")
        detected = any(_count((n, environ[n]), 1) > 1 for n in _AUTO_DETECTED
                       if environ.get(n, "") != "")
        return {} if detected else None
    if processes is None:
        raise ValueError(f"environment variable {coordinator[0]} names a coordinator but "
                         f"neither {' nor '.join(_PROCESS_COUNT)} gives the process count")
    process = _first(environ, _PROCESS_ID)
    if process is None:
        raise ValueError(f"several processes ({count[0]}={processes}) but neither "
                         f"{' nor '.join(_PROCESS_ID)} gives this process's index")
    process_id = _count(process, 0)
    if process_id >= processes:
        raise ValueError(f"environment variable {process[0]}={process_id}: expected an "
                         f"index below the process count {processes}")
    address = coordinator[1]
    if coordinator[0] == "MASTER_ADDR":
        # torchrun's own store listens on MASTER_PORT: JAX's coordinator takes the next one.
        port = _count(("MASTER_PORT", environ.get("MASTER_PORT") or "29500"), 1)
        address = f"{address}:{port + 1}"
    return {"coordinator_address": address, "num_processes": processes,
            "process_id": process_id}


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """`jax.distributed.initialize` with `distributed_settings(environ)`; call it before
    anything else touches JAX. Returns whether this is a multi-process run (False: one
    process, nothing to join). A failure to join is a one-line RuntimeError."""
    settings = distributed_settings(environ)
    if settings is None:
        return False
    # CPU devices of different processes talk through gloo (JAX's CPU default has no
    # cross-process collectives); GPUs and TPUs are not affected by this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**settings)
    except Exception as exc:  # JAX's runtime errors span lines; the launch needs one
        where = (f" with coordinator {settings['coordinator_address']} (process "
                 f"{settings['process_id']} of {settings['num_processes']})" if settings else "")
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise RuntimeError(f"jax.distributed.initialize failed{where}: {reason}") from exc
    return True


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
        """Train on one global batch: this process's rows `[B / processes, S]` (all of
        it in one process), the global batch divisible by the mesh size; `noise`
        `[D, slices]`, the same in every process."""
        devices = self.mesh.devices.size
        rows = token_ids.shape[0] * jax.process_count()
        if rows % devices:
            raise ValueError(f"batch of {rows} rows cannot be split evenly over "
                             f"{devices} devices")
        self.params, self.rest, self.opt_state, loss = self._step(
            self.params, self.rest, self.opt_state, *self.global_batch(
                token_ids, targets, pos_ids, noise))
        return float(loss)

    def global_batch(self, token_ids: np.ndarray, targets: np.ndarray, pos_ids: np.ndarray,
                     noise: np.ndarray) -> tuple[jax.Array, ...]:
        """This process's rows as the global arrays the step takes (rows split over the
        mesh, noise replicated). One host-to-device copy each; nothing gathered."""
        def put(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
            return jax.make_array_from_process_local_data(sharding, np.asarray(a))

        return (put(token_ids, self.rows), put(targets, self.rows),
                put(np.asarray(pos_ids).astype(np.int32), self.rows),
                put(noise, self.replicated))

    def update_model(self) -> Model:
        """Write the trained parameters back into the `Model` (then `model.save(...)`)."""
        nnx.update(self.model, jax.device_get(self.params), jax.device_get(self.rest))
        return self.model
