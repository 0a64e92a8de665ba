"""Float32 exactness shared by every Flax module: matmul precision and true division.

The runtime computes in plain float32 (SPEC §3). XLA, left to itself, may not: GPUs
default to TF32 matmuls, and a division by a broadcast value is rewritten into a product
with its reciprocal. Every Flax module takes both settings from here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Every matmul runs in true float32, whatever the backend's default (TF32 on GPUs).
HIGHEST = jax.lax.Precision.HIGHEST


def exact_divide(numerator: jax.Array, denominator: jax.Array | float) -> jax.Array:
    """`numerator / denominator`, correctly rounded even when the denominator broadcasts.

    XLA rewrites `a / broadcast(b)` into `a * broadcast(1 / b)`, which is off by an ulp
    for about a quarter of RoPE's angles; at positions ~1e6 that turns into visible
    rotation errors. Materialising the broadcast behind an optimisation barrier keeps
    the true division.
    """
    shape = jnp.broadcast_shapes(jnp.shape(numerator), jnp.shape(denominator))
    denominator = jnp.broadcast_to(jnp.asarray(denominator, dtype=jnp.float32), shape)
    return numerator / jax.lax.optimization_barrier(denominator)
