"""The Flax rows of gpu_check.py: the same measurements through JAX (imported on first use).

JAX runs on its default backend (CUDA when jax has a CUDA plugin, else the CPU: the rows
then say so). gpu_check.py sets XLA_PYTHON_CLIENT_PREALLOCATE=false first, so that JAX
takes GPU memory as it needs it instead of 75% of it beside torch.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.scoring import Score, score


def backend() -> str:
    """JAX's default backend ("gpu", "cpu", ...) and its first device, for the headers."""
    import jax

    return f"{jax.default_backend()} ({jax.devices()[0].device_kind})"


def on_gpu() -> bool:
    import jax

    return jax.default_backend() == "gpu"


def block(x: Any) -> Any:
    import jax

    return jax.block_until_ready(x)


def score_both(arrays: dict[str, np.ndarray], data: bytes, config: ModelConfig,
               sig_reg: SIGRegConfig, seq_len: int, batch_size: int
               ) -> tuple[tuple[Score, float], tuple[Score, float]]:
    """((score, seconds) with Flax on JAX's CPU, the same on JAX's default device)."""
    import jax

    out = []
    for device in (jax.devices("cpu")[0], jax.devices()[0]):
        with jax.default_device(device):
            start = time.perf_counter()
            result = score(arrays, data, 0, model_config=config, sig_reg_config=sig_reg,
                           max_seq_len=seq_len, batch_size=batch_size, framework="flax")
            out.append((result, time.perf_counter() - start))
    return out[0], out[1]


def training_step(config: ModelConfig, slices: int, rows: int, seq: int, bf16: bool = True):
    """One Flax step as `soma-models train --framework flax [--bf16]` runs it
    (`flax_engine.micro_gradients`, then `apply_update`: clip, AdamW), as a closure; and
    the model's FLOPs per token (6 N + 12 L D S, N without the embedding table)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from soma_models.train.flax_engine import apply_update, dropout_key, micro_gradients
    from soma_models.v1.flax.modules.model import Model
    from soma_models.v1.flax.modules.sig_reg import SIGReg
    from soma_models.v1.flax.train_step import decay_mask

    model = Model(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=decay_mask)
    state = {"params": params, "opt": optimizer.init(params)}
    grads_fn = jax.jit(functools.partial(micro_gradients, graphdef,
                                         SIGReg(SIGRegConfig(slices=slices)),
                                         jnp.bfloat16 if bf16 else None, rest))
    apply_fn = jax.jit(functools.partial(apply_update, optimizer), donate_argnums=(0, 1))
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 256, (rows, seq + 1)).astype(np.int32)
    batch = (jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]),
             jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
             jnp.asarray(rng.standard_normal((config.embedding_dim, slices)),
                         dtype=jnp.float32))
    one, lr, clip = jnp.float32(1.0), jnp.float32(1e-4), jnp.float32(1.0)
    key = jnp.asarray(dropout_key(1))

    def step() -> None:
        grads, loss, _ = grads_fn(state["params"], *batch, key)
        state["params"], state["opt"], _ = apply_fn(state["params"], state["opt"], grads,
                                                    one, lr, clip)
        block(loss)

    n = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    n -= config.vocab_size * config.embedding_dim
    return step, 6 * n + 12 * config.num_layers * config.embedding_dim * seq


def peak_gib() -> float | None:
    """JAX's peak device memory so far (None where the backend does not report it)."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30
