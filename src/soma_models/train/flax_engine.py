"""The Flax engine (`engine.Engine`): the part of a run that is JAX's, driven by the same
framework-free `trainer.Trainer` as torch's (`soma-models train --framework flax`).

Devices and processes. The batch rows are split over a 1-D `jax.sharding` mesh of every
device of every JAX process (`flax_sharding.data_mesh`), parameters and optimizer state
replicated, so XLA inserts the gradient reductions itself and N devices compute what one
does (up to float summation order). Several processes join through
`flax_sharding.initialize_from_env` (`jax.distributed.initialize` from `JAX_*` or
torchrun's variables); each then reads only its contiguous block of every micro-batch's
rows (`local_rows`, `data.process_rows`), assembled into the global arrays with
`jax.make_array_from_process_local_data`, and process 0 writes every file. To the trainer
the mesh is one share (rank 0 of 1): micro-batches are global, so a run's numbers do not
depend on how many devices or processes compute them. A micro-batch whose rows do not
divide over the mesh (the curriculum's one-row micro-batches) is read by every process
and computed whole on every device: the same numbers, at the cost of that repetition.

The step is two jitted functions: the gradient of one micro-batch (the loss terms of
`soma_models.v1.flax.loss`, the same ones the torch step differentiates), accumulated on
the device, then the update (clip to `grad_clip` as `torch.nn.utils.clip_grad_norm_`
does, AdamW with decay on matrices, `train_step.decay_mask`) at the trainer's learning
rate, given as an argument so a schedule never recompiles. The randomness of each
micro-batch, as under torch, is a function of `(seed, step, micro-batch)`
(`schedule.micro_seed`): the SIGReg noise, and the dropout streams, restarted from that
micro-batch's key; so a resumed run draws what an uninterrupted one would, with no RNG
state to checkpoint.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from soma_models.train import config
from soma_models.train.config import TrainConfig
from soma_models.train.data import process_rows
from soma_models.train.engine import MicroBatch, load_weights
from soma_models.train.errors import TrainError
from soma_models.train.flax_sharding import DATA_AXIS, data_mesh, initialize_from_env
from soma_models.train.schedule import micro_seed
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import cross_entropy_rows, cross_entropy_sum, loss_terms
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.serde import canonical_arrays
from soma_models.v1.flax.train_step import decay_mask
from soma_models.v1.tokenizer import iter_batches


def _devices(device: str | None) -> list[jax.Device]:
    """The mesh's devices for `--device` (None: JAX's default backend), every process's,
    ordered by process so that process p holds the p-th block of rows."""
    several = jax.process_count() > 1
    if device is not None and ":" in device and several:
        raise TrainError(f"--device {device}: {jax.process_count()} JAX processes train on "
                         f"all their devices; give a platform (cpu, cuda) or no --device")
    if device is None:
        devices = jax.devices()
    else:
        platform = "cpu" if device == "cpu" else "gpu"
        try:
            devices = jax.devices(platform)
        except RuntimeError:
            raise TrainError(f"--device {device}: JAX has no {platform} backend "
                             f"here") from None
    if several:
        return sorted(devices, key=lambda d: (d.process_index, d.id))
    if device is not None and ":" in device:
        index = int(device.split(":", 1)[1])
        if index >= len(devices):
            raise TrainError(f"--device {device}: JAX sees {len(devices)} {platform} "
                             f"device(s)")
        return [devices[index]]
    return devices


def dropout_key(seed: int) -> np.ndarray:
    """A 63-bit `schedule.micro_seed` as the raw data of a threefry key: uint32 `[2]`."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def restarted_streams(rest: nnx.State, key_data: jax.Array) -> nnx.State:
    """The model's dropout streams (`rest`: their keys and counters) restarted from one key:
    stream i gets `fold_in(key, i)` and a zero counter."""
    leaves, treedef = jax.tree_util.tree_flatten(rest)
    fresh = []
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            base = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(leaf))
            fresh.append(jax.random.fold_in(base, i))
        else:
            fresh.append(jnp.zeros_like(leaf))
    return jax.tree_util.tree_unflatten(treedef, fresh)


def micro_gradients(graphdef: nnx.GraphDef, sig_reg: SIGReg, compute_dtype: Any,
                    rest: nnx.State, params: nnx.State, token_ids: jax.Array,
                    targets: jax.Array, pos_ids: jax.Array, noise: jax.Array,
                    key_data: jax.Array) -> tuple[nnx.State, jax.Array, jax.Array]:
    """(float32 gradients, loss, cross-entropy sum per row `[R]`) of one micro-batch
    (token_ids, targets, pos_ids `[R, S]`, noise `[D, slices]`), dropout drawn from
    `key_data` (`dropout_key`); `rest`, the model's dropout streams, gives only their
    structure (bind it with the graphdef: it is not an input of the compiled step).

    compute_dtype: None computes in float32; `jnp.bfloat16` casts the float32 master
    weights to it for the forward pass (torch's bf16 autocast; the cross-entropy and
    SIGReg's cos/sin stay float32), and the gradients come back in float32.
    """
    streams = restarted_streams(rest, key_data)

    def terms(params: nnx.State) -> tuple[jax.Array, jax.Array]:
        if compute_dtype is not None:
            params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
        model = nnx.merge(graphdef, params, streams, copy=True)
        reps = model.encode(token_ids, pos_ids)
        logits = model.predict(reps)
        out = loss_terms(reps, logits, targets, sig_reg, noise)
        # Per row, so that each process can sum the rows it holds (the trainer's train_ce);
        # XLA shares the log-softmax with the loss's.
        return out.loss, cross_entropy_rows(logits, targets)

    (loss, ce_rows), grads = jax.value_and_grad(terms, has_aux=True)(params)
    return grads, loss, ce_rows


def apply_update(optimizer: optax.GradientTransformation, params: nnx.State, opt_state: Any,
           grads: nnx.State, scale: jax.Array, lr: jax.Array, clip: jax.Array
           ) -> tuple[nnx.State, Any, jax.Array]:
    """Scale the accumulated gradients (1 / micro-batches), clip them to a global norm of
    `clip` (inf: off) as torch's clip_grad_norm_ does, apply AdamW at `lr`."""
    grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
    norm = optax.tree.norm(grads)
    factor = jnp.minimum(1.0, clip / (norm + 1e-6))
    grads = jax.tree_util.tree_map(lambda g: g * factor, grads)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, norm


@nnx.jit
def _cross_entropy_sum(model: Model, token_ids: jax.Array, pos_ids: jax.Array,
                       targets: jax.Array) -> jax.Array:
    return cross_entropy_sum(model.predict(model.encode(token_ids, pos_ids)), targets)


def _named_leaves(tree: Any) -> list[tuple[str, Any]]:
    """`(path, leaf)` of every leaf, paths as dotted names (stable for a given structure)."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                        for k in path)
        out.append((name, leaf))
    return out


class FlaxEngine:
    """One process's Flax side of a run; its methods are `engine.Engine`'s."""

    rank = 0        # the mesh is the trainer's one share: see the module docstring
    world_size = 1

    def __init__(self, device: str | None = None):
        try:
            self.joined = (not jax.distributed.is_initialized()
                           and initialize_from_env())
        except (ValueError, RuntimeError) as exc:  # a bad variable, or no coordinator
            raise TrainError(str(exc)) from None
        self.process, self.processes = jax.process_index(), jax.process_count()
        self.is_main = self.process == 0
        devices = _devices(device)
        local = sum(d.process_index == self.process for d in devices)
        if local * self.processes != len(devices):
            raise TrainError(f"--framework flax: the {self.processes} JAX processes hold "
                             f"{len(devices)} devices unevenly (this one {local}); every "
                             f"process needs as many devices")
        self.mesh = data_mesh(devices)
        self.mesh_size = len(devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS, None))

    # ------------------------------------------------------------ processes
    def barrier(self) -> None:
        if self.processes > 1:
            multihost_utils.sync_global_devices("soma-models")

    def broadcast(self, obj: Any) -> Any:
        """Process 0's JSON-able `obj` on every process."""
        if self.processes == 1:
            return obj
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if self.is_main else None
        size = int(multihost_utils.broadcast_one_to_all(
            np.int32(0 if data is None else len(data))))
        buffer = data if data is not None else np.zeros(size, np.uint8)
        received = multihost_utils.broadcast_one_to_all(buffer)
        return json.loads(np.asarray(received, np.uint8).tobytes())

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        if self.processes == 1:
            return values
        # JAX moves float32 (no x64): each value travels as float32 high and low parts.
        wide = np.asarray(values, np.float64)
        high = wide.astype(np.float32)
        parts = np.stack([high, (wide - high).astype(np.float32)])
        gathered = np.asarray(multihost_utils.process_allgather(parts), np.float64)
        return [float(v) for v in gathered.sum(axis=1).mean(axis=0)]

    def shutdown(self) -> None:
        if self.joined:
            jax.distributed.shutdown()
            self.joined = False

    # ------------------------------------------------------------ setup
    def build(self, cfg: TrainConfig, model_config: ModelConfig) -> None:
        micro = config.batch_layout(cfg, 1).micro_batch_size
        if micro % self.mesh_size:
            raise TrainError(f"--micro-batch-size {micro}: the rows of a micro-batch are split "
                             f"over the mesh's {self.mesh_size} devices; give a multiple of "
                             f"{self.mesh_size}")
        self.cfg = cfg
        self.model_config = model_config
        model = (load_weights(Model, cfg.init_from, model_config) if cfg.init_from
                 else Model(model_config, rngs=nnx.Rngs(cfg.seed)))
        # What `Trainer.module` shows: the model as built. The trained weights live in
        # `self.params` (replicated over the mesh); `gather()` gives a model holding them.
        self.module = model
        self.graphdef, params, self.streams = nnx.split(model, nnx.Param, ...)
        self.params = self._replicated(params)
        sig_reg = SIGReg(SIGRegConfig(slices=cfg.sig_reg_slices,
                                      coefficient=cfg.sig_reg_coefficient))
        # The rate is a hyperparameter in the state, set at every update from the trainer.
        self.optimizer = optax.inject_hyperparams(optax.adamw)(
            learning_rate=cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
            weight_decay=cfg.weight_decay, mask=decay_mask)
        self.opt_state = self._replicated(self.optimizer.init(params))
        self._grads = jax.jit(functools.partial(micro_gradients, self.graphdef, sig_reg,
                                                jnp.bfloat16 if cfg.bf16 else None,
                                                self.streams))
        self._add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                            donate_argnums=0)
        self._apply = jax.jit(functools.partial(apply_update, self.optimizer),
                              donate_argnums=(0, 1))
        self.grads: nnx.State | None = None
        self.accumulated = 0

    def _replicated(self, tree: Any) -> Any:
        """Host values, the same in every process, as arrays replicated over the mesh."""
        def put(value: Any) -> jax.Array:
            value = np.asarray(value)
            return jax.make_array_from_callback(value.shape, self.replicated,
                                                lambda index: value[index])

        return jax.tree_util.tree_map(put, tree)

    # ------------------------------------------------------------ the step
    def _splits(self, rows: int) -> bool:
        """Whether a micro-batch of `rows` global rows is split over the mesh (else every
        device computes all of it)."""
        return rows % self.mesh_size == 0

    def local_rows(self, rows: np.ndarray) -> np.ndarray:
        """This process's block of the micro-batch's rows (all of them if it is not split)."""
        if not self._splits(len(rows)):
            return np.asarray(rows)
        return process_rows(rows, self.process, self.processes)

    def _put(self, local: np.ndarray, split: bool) -> jax.Array:
        """This process's rows (int32) as the global array: row-sharded, or replicated."""
        local = np.asarray(local, dtype=np.int32)
        if not split:
            return jax.make_array_from_process_local_data(self.replicated, local, local.shape)
        return jax.make_array_from_process_local_data(
            self.rows, local, (local.shape[0] * self.processes, *local.shape[1:]))

    @staticmethod
    def _local_sum(rows: jax.Array) -> float:
        """The sum of the entries of a `[R]` array held on this process (each once)."""
        held = {(index.start, index.stop): shard.data
                for shard in rows.addressable_shards for index in shard.index}
        return float(sum(np.asarray(data, np.float64).sum() for data in held.values()))

    def backward(self, micro_batches: Sequence[MicroBatch], step: int) -> tuple[float, float]:
        """Gradients of this step's micro-batches, summed on the device; returns the sum
        of their losses and the cross-entropy sum of the rows this process read."""
        cfg = self.cfg
        losses, ce_rows = [], []
        for micro in micro_batches:
            split, batch = self._splits(micro.rows), micro.batch
            noise = np.random.default_rng(micro_seed(cfg.seed, step, micro.index, 1)
                                          ).standard_normal(
                (self.model_config.embedding_dim, cfg.sig_reg_slices), dtype=np.float32)
            grads, loss, ce = self._grads(
                self.params, self._put(batch.token_ids, split),
                self._put(batch.targets, split), self._put(batch.pos_ids, split),
                *self._replicated((noise,
                                   dropout_key(micro_seed(cfg.seed, step, micro.index, 0)))))
            self.grads = grads if self.grads is None else self._add(self.grads, grads)
            self.accumulated += 1
            losses.append(loss)
            ce_rows.append(ce)
        loss_total = float(np.asarray(jax.device_get(losses), np.float64).sum())
        return loss_total, sum(self._local_sum(ce) for ce in ce_rows)

    def update(self, lr: float, before_step: Callable[[float], None]) -> float:
        """Clip and apply the accumulated gradients at rate `lr`. `before_step(norm)` runs
        first and may raise: then nothing is applied (the norm comes from a separate,
        cheap reduction, so the update itself stays one compiled call)."""
        assert self.grads is not None, "update() before backward()"
        scale = 1.0 / self.accumulated
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = float(optax.tree.norm(self.grads)) * scale
        try:
            before_step(norm)
            self.params, self.opt_state, _ = self._apply(
                self.params, self.opt_state, self.grads, jnp.float32(scale), jnp.float32(lr),
                jnp.float32(clip))
        finally:
            self.grads, self.accumulated = None, 0
        return norm

    # ------------------------------------------------------------ whole states
    def gather(self) -> Model | None:
        """On process 0, a plain `Model` holding the current weights (host arrays)."""
        if not self.is_main:
            return None
        return nnx.merge(self.graphdef, jax.device_get(self.params), self.streams, copy=True)

    @staticmethod
    def non_finite(plain: Model) -> list[str]:
        return [key for key, value in canonical_arrays(plain).items()
                if not np.isfinite(value).all()]

    @staticmethod
    def cross_entropy(plain: Model, data: bytes, max_seq_len: int, batch_size: int) -> float:
        """Nats per predicted token on `data` cut as scoring cuts it, in evaluation mode."""
        plain.eval()
        total, count = 0.0, 0
        for batch in iter_batches(data, max_seq_len, batch_size):
            total += float(_cross_entropy_sum(plain, np.asarray(batch.token_ids, np.int32),
                                              np.asarray(batch.pos_ids, np.int32),
                                              np.asarray(batch.targets, np.int32)))
            count += batch.num_data_tokens
        plain.train()
        return total / count

    @staticmethod
    def save_weights(plain: Model, path: Path) -> None:
        plain.save(path)

    def optimizer_state(self) -> dict[str, np.ndarray] | None:
        """On process 0, the optax state's leaves by their path in the state (count, mu, nu
        per param)."""
        if not self.is_main:
            return None
        return {name: np.asarray(leaf) for name, leaf in
                _named_leaves(jax.device_get(self.opt_state))}

    def load(self, weights: Path, optimizer_state: dict[str, np.ndarray]) -> None:
        params = nnx.split(load_weights(Model, weights, self.model_config), nnx.Param, ...)[1]
        self.params = self._replicated(params)
        names = _named_leaves(self.opt_state)
        missing = [name for name, _ in names if name not in optimizer_state]
        if missing:
            raise TrainError(f"checkpoint optimizer state lacks {missing[0]} (and "
                             f"{len(missing) - 1} more): not written by --framework flax")
        leaves = [np.asarray(optimizer_state[name], dtype=leaf.dtype) for name, leaf in names]
        treedef = jax.tree_util.tree_structure(self.opt_state)
        self.opt_state = self._replicated(jax.tree_util.tree_unflatten(treedef, leaves))

    def rng_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Nothing: every draw is a function of `(seed, step, micro-batch)`."""
        return {}, {}

    def set_rng_state(self, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        """Nothing to put back (checkpoints of earlier versions carried the dropout streams
        as "rng.flax.*" arrays; they are not needed)."""
