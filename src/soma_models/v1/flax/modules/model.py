"""The V1 model: embedding -> encoder -> final norm (representations) -> predictor (logits)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from soma_models.v1.aliases import pick
from soma_models.v1.configs import EncoderConfig, ModelConfig
from soma_models.v1.flax.modules.attention import HIGHEST, INIT_STD
from soma_models.v1.flax.modules.encoder import Encoder
from soma_models.v1.flax.modules.layer import layer_norm
from soma_models.v1.flax.serde import Serializable

__all__ = ["Encoder", "EncoderConfig", "Model", "ModelConfig", "Serializable",
           "default_pos_ids"]


def default_pos_ids(token_ids: jax.Array) -> jax.Array:
    """`0 .. S-1` on every row, shaped like `token_ids` `[B, S]`."""
    seq = token_ids.shape[-1]
    return jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), token_ids.shape)


def _check_token_range(token_ids: jax.Array, vocab_size: int) -> None:
    """Out-of-range ids would silently read NaN rows under JAX; refuse them when we can see
    them (concrete values: eager calls, or constants closed over by a traced function)."""
    if isinstance(token_ids, jax.core.Tracer) or token_ids.size == 0:
        return
    host = np.asarray(token_ids)  # a host-side check: no JAX op, so nothing gets traced
    low, high = int(host.min()), int(host.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), found values in "
                         f"[{low}, {high}]")


class Model(Serializable, nnx.Module):
    """V1 transformer. token_ids `[B, S]` (int), pos_ids `[B, S]` -> logits `[B, S, vocab]`.

    From-scratch init (as the PyTorch model): N(0, 0.02) weights, zero biases, unit norms;
    the residual projections use 0.02 / sqrt(2 * num_layers). Dropout (if the config has
    any) draws from `rngs`' "dropout" stream and is active only in `model.train()` mode.

    `Model(config, rngs)`: `rngs` positional or keyword. Weights: `save`/`save_bytes`/
    `load`/`load_bytes`/`from_arrays` (canonical safetensors, from `Serializable`).
    `input=`/`positions=`/`embeddings=` are accepted for `token_ids=`/`pos_ids=`/
    `representations=` (the published package's names).
    """

    def __init__(self, config: ModelConfig | None = None, rngs: nnx.Rngs | None = None):
        if rngs is None:
            raise TypeError("Model needs rngs: Model(config, nnx.Rngs(seed))")
        self.config = config = config or ModelConfig()
        normal = nnx.initializers.normal(INIT_STD)
        self.embedding = nnx.Embed(config.vocab_size, config.embedding_dim,
                                   embedding_init=normal, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        self.final_norm = layer_norm(config.embedding_dim, rngs)
        self.predictor = nnx.Linear(config.embedding_dim, config.vocab_size, kernel_init=normal,
                                    precision=HIGHEST, rngs=rngs)

    def encode(self, token_ids: jax.Array | np.ndarray | None = None,
               pos_ids: jax.Array | np.ndarray | None = None, *,
               input: jax.Array | np.ndarray | None = None,
               positions: jax.Array | np.ndarray | None = None) -> jax.Array:
        """Representations `[B, S, D]` (after the final LayerNorm).

        token_ids (alias `input`): `[B, S]`, any integer dtype; pos_ids (alias
        `positions`): `[B, S]`, None means `0 .. S-1` on every row.
        """
        token_ids = pick("Model.encode", "token_ids", token_ids, "input", input)
        pos_ids = pick("Model.encode", "pos_ids", pos_ids, "positions", positions)
        if token_ids is None:
            raise TypeError("Model.encode: missing token_ids (or input=)")
        token_ids = jnp.asarray(token_ids)
        if not jnp.issubdtype(token_ids.dtype, jnp.integer):
            raise TypeError(f"token_ids must be integers, got dtype {token_ids.dtype}")
        _check_token_range(token_ids, self.config.vocab_size)
        if pos_ids is None:
            pos_ids = default_pos_ids(token_ids)
        elif not hasattr(pos_ids, "shape"):
            pos_ids = np.asarray(pos_ids, dtype=np.int64)
        if tuple(pos_ids.shape) != tuple(token_ids.shape):
            raise ValueError(f"pos_ids shape {list(pos_ids.shape)} != token_ids shape "
                             f"{list(token_ids.shape)}")
        x = self.embedding(token_ids)
        return self.final_norm(self.encoder(x, pos_ids))

    def predict(self, representations: jax.Array | None = None, *,
                embeddings: jax.Array | None = None) -> jax.Array:
        """Logits `[B, S, vocab]` from representations (alias `embeddings`) `[B, S, D]`."""
        representations = pick("Model.predict", "representations", representations,
                               "embeddings", embeddings)
        return self.predictor(representations)

    def __call__(self, token_ids: jax.Array | np.ndarray | None = None,
                 pos_ids: jax.Array | np.ndarray | None = None, *,
                 input: jax.Array | np.ndarray | None = None,
                 positions: jax.Array | np.ndarray | None = None) -> jax.Array:
        """Logits `[B, S, vocab]`; arguments as `encode`."""
        return self.predict(self.encode(token_ids, pos_ids, input=input, positions=positions))
