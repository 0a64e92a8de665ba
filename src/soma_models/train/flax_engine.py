"""The Flax engine (`engine.Engine`): the part of a run that is JAX's, driven by the same
framework-free `trainer.Trainer` as torch's (`soma-models train --framework flax`).

One process; its batch rows are split over a 1-D `jax.sharding` mesh of the host's
devices (`flax_sharding.data_mesh`), parameters and optimizer state replicated, so XLA
inserts the gradient reductions itself and N devices compute what one does (up to float
summation order). Several hosts are not driven by the trainer yet: use
`flax_sharding.initialize_from_env` with `ShardedTrainStep` (a refusal here says so).

The step is two jitted functions: the gradient of one micro-batch (the loss terms of
`soma_models.v1.flax.loss`, the same ones the torch step differentiates), accumulated on
the device, then the update (clip to `grad_clip` as `torch.nn.utils.clip_grad_norm_`
does, AdamW with decay on matrices, `train_step.decay_mask`) at the trainer's learning
rate, given as an argument so a schedule never recompiles. The SIGReg noise of each
micro-batch is drawn from `schedule.micro_seed(seed, step, micro-batch)`; the dropout
streams are the model's own and are carried from step to step, and checkpointed, so a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from soma_models.train.config import TrainConfig
from soma_models.train.errors import TrainError
from soma_models.train.flax_sharding import DATA_AXIS, data_mesh
from soma_models.train.schedule import micro_seed
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import cross_entropy_sum, loss_terms
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg
from soma_models.v1.flax.serde import canonical_arrays
from soma_models.v1.flax.train_step import decay_mask
from soma_models.v1.tokenizer import ArrayBatch, iter_batches

RNG_PREFIX = "rng.flax."


def _devices(device: str | None) -> list[jax.Device]:
    """The mesh's devices for `--device` (None: every device of JAX's default backend)."""
    if device is None:
        return jax.local_devices()
    platform = "cpu" if device == "cpu" else "gpu"
    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError:
        raise TrainError(f"--device {device}: JAX has no {platform} backend here") from None
    if ":" in device:
        index = int(device.split(":", 1)[1])
        if index >= len(devices):
            raise TrainError(f"--device {device}: JAX sees {len(devices)} {platform} "
                             f"device(s)")
        return [devices[index]]
    return devices


def micro_gradients(graphdef: nnx.GraphDef, sig_reg: SIGReg, compute_dtype: Any,
                    params: nnx.State, rest: nnx.State, token_ids: jax.Array,
                    targets: jax.Array, pos_ids: jax.Array, noise: jax.Array
                    ) -> tuple[nnx.State, nnx.State, jax.Array, jax.Array]:
    """(float32 gradients, advanced `rest`, loss, cross-entropy sum) of one micro-batch.

    compute_dtype: None computes in float32; `jnp.bfloat16` casts the float32 master
    weights to it for the forward pass (torch's bf16 autocast; the cross-entropy and
    SIGReg's cos/sin stay float32), and the gradients come back in float32.
    """

    def terms(params: nnx.State) -> tuple[jax.Array, tuple[jax.Array, nnx.State]]:
        if compute_dtype is not None:
            params = jax.tree_util.tree_map(lambda p: p.astype(compute_dtype), params)
        model = nnx.merge(graphdef, params, rest, copy=True)
        reps = model.encode(token_ids, pos_ids)
        out = loss_terms(reps, model.predict(reps), targets, sig_reg, noise)
        return out.loss, (out.ce_sum, nnx.split(model, nnx.Param, ...)[2])

    (loss, (ce_sum, rest)), grads = jax.value_and_grad(terms, has_aux=True)(params)
    return grads, rest, loss, ce_sum


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


def _load_weights(path: str | Path, model_config: ModelConfig) -> Model:
    try:
        return Model.load(path, model_config)
    except (OSError, ValueError) as exc:
        raise TrainError(" ".join(str(exc).split())) from None


class FlaxEngine:
    """One process's Flax side of a run; its methods are `engine.Engine`'s."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str | None = None):
        if jax.process_count() > 1:
            raise TrainError(f"--framework flax: the trainer drives one JAX process (this is "
                             f"{jax.process_count()}); train several hosts with "
                             f"soma_models.train.flax_sharding.ShardedTrainStep")
        self.mesh = data_mesh(_devices(device))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rows = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS, None))

    # ------------------------------------------------------------ processes
    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_reduce_mean(self, values: list[float]) -> list[float]:
        return values

    def shutdown(self) -> None:
        pass

    # ------------------------------------------------------------ setup
    def build(self, cfg: TrainConfig, model_config: ModelConfig) -> None:
        self.cfg = cfg
        self.model_config = model_config
        model = (_load_weights(cfg.init_from, model_config) if cfg.init_from
                 else Model(model_config, rngs=nnx.Rngs(cfg.seed)))
        # What `Trainer.module` shows: the model as built. The trained weights live in
        # `self.params` (replicated over the mesh); `gather()` gives a model holding them.
        self.module = model
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.params = jax.device_put(params, self.replicated)
        self.rest = jax.device_put(rest, self.replicated)
        sig_reg = SIGReg(SIGRegConfig(slices=cfg.sig_reg_slices,
                                      coefficient=cfg.sig_reg_coefficient))
        # The rate is a hyperparameter in the state, set at every update from the trainer.
        self.optimizer = optax.inject_hyperparams(optax.adamw)(
            learning_rate=cfg.lr, b1=cfg.beta1, b2=cfg.beta2, eps=1e-8,
            weight_decay=cfg.weight_decay, mask=decay_mask)
        self.opt_state = jax.device_put(self.optimizer.init(self.params), self.replicated)
        self._grads = jax.jit(functools.partial(micro_gradients, self.graphdef, sig_reg,
                                                jnp.bfloat16 if cfg.bf16 else None))
        self._add = jax.jit(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b),
                            donate_argnums=0)
        self._apply = jax.jit(functools.partial(apply_update, self.optimizer),
                              donate_argnums=(0, 1))
        self.grads: nnx.State | None = None
        self.accumulated = 0

    # ------------------------------------------------------------ the step
    def _put(self, array: np.ndarray, dtype: Any) -> jax.Array:
        return jax.device_put(np.asarray(array, dtype=dtype), self.rows)

    def backward(self, micro_batches: Sequence[tuple[int, ArrayBatch]],
                 step: int) -> tuple[float, float]:
        """Gradients of this step's micro-batches `(global index, rows)`, summed on the
        device; returns the sums of their losses and cross-entropy sums."""
        cfg = self.cfg
        losses = []
        for micro, batch in micro_batches:
            noise = np.random.default_rng(micro_seed(cfg.seed, step, micro, 1)).standard_normal(
                (self.model_config.embedding_dim, cfg.sig_reg_slices), dtype=np.float32)
            grads, self.rest, loss, ce_sum = self._grads(
                self.params, self.rest, self._put(batch.token_ids, np.int32),
                self._put(batch.targets, np.int32), self._put(batch.pos_ids, np.int32),
                jax.device_put(noise, self.replicated))
            self.grads = grads if self.grads is None else self._add(self.grads, grads)
            self.accumulated += 1
            losses.append((loss, ce_sum))
        values = np.asarray(jax.device_get(losses), dtype=np.float64)   # one round trip
        return float(values[:, 0].sum()), float(values[:, 1].sum())

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
    def gather(self) -> Model:
        """A plain `Model` holding the current weights (on the host's default device)."""
        return nnx.merge(self.graphdef, jax.device_get(self.params), jax.device_get(self.rest))

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

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optax state's leaves by their path in the state (count, mu, nu per param)."""
        return {name: np.asarray(leaf) for name, leaf in
                _named_leaves(jax.device_get(self.opt_state))}

    def load(self, weights: Path, optimizer_state: dict[str, np.ndarray]) -> None:
        params = nnx.split(_load_weights(weights, self.model_config), nnx.Param, ...)[1]
        self.params = jax.device_put(params, self.replicated)
        names = _named_leaves(self.opt_state)
        missing = [name for name, _ in names if name not in optimizer_state]
        if missing:
            raise TrainError(f"checkpoint optimizer state lacks {missing[0]} (and "
                             f"{len(missing) - 1} more): not written by --framework flax")
        leaves = [jnp.asarray(optimizer_state[name], dtype=leaf.dtype) for name, leaf in names]
        treedef = jax.tree_util.tree_structure(self.opt_state)
        self.opt_state = jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves),
                                        self.replicated)

    def rng_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The dropout streams' keys and counters (`rest`) as byte arrays."""
        tensors = {}
        for name, leaf in _named_leaves(jax.device_get(self.rest)):
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            tensors[RNG_PREFIX + name] = np.asarray(leaf)
        return tensors, {}

    def set_rng_state(self, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        leaves = []
        for name, leaf in _named_leaves(self.rest):
            saved = tensors.get(RNG_PREFIX + name)
            if saved is None:
                raise TrainError(f"checkpoint lacks the Flax RNG state {name}: not written "
                                 f"by --framework flax")
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaves.append(jax.random.wrap_key_data(jnp.asarray(saved),
                                                       impl=jax.random.key_impl(leaf)))
            else:
                leaves.append(jnp.asarray(saved, dtype=leaf.dtype))
        treedef = jax.tree_util.tree_structure(self.rest)
        self.rest = jax.device_put(jax.tree_util.tree_unflatten(treedef, leaves),
                                   self.replicated)
