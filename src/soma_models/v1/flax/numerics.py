"""Float32 numerics shared by every Flax module: matmul precision, true division, sin/cos.

The runtime computes in plain float32 (SPEC §3). XLA, left to itself, may not: GPUs
default to TF32 matmuls, and a division by a broadcast value is rewritten into a product
with its reciprocal. Every Flax module takes both settings from here. `sin_cos` is about
speed: XLA:CPU evaluates float32 sin and cos one element at a time, ~10x slower than
torch's vectorised kernels, and SIGReg spends most of its time there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


# sin/cos on XLA:CPU: Cody-Waite reduction by pi/2 (pi/2 = C1 + C2 + C3; C1 has 8
# significant bits, so j * C1 is exact while |j| < 2^16) to r in [-pi/4, pi/4], then the
# classic single-precision minimax polynomials for sin and cos on r, and the quadrant
# j mod 4 picks and signs them. Measured against float64 over 4M arguments: at most
# 9.3e-8 absolute error for |x| <= SIN_COS_REDUCTION_LIMIT (1.5 ulp of values near 1;
# XLA's own: 3.3e-8, 0.56 ulp), no measurable bias; larger arguments take XLA's sin, cos.
_TWO_OVER_PI = np.float32(2 / np.pi)
_PI_OVER_2 = (np.float32(1.5703125), np.float32(4.837512969970703125e-4),
              np.float32(7.54978995489188216e-8))
_SIN_COEFFICIENTS = tuple(np.float32(c) for c in (-1.9515295891e-4, 8.3321608736e-3,
                                                  -1.6666654611e-1))
_COS_COEFFICIENTS = tuple(np.float32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3,
                                                  4.166664568298827e-2))
SIN_COS_REDUCTION_LIMIT = 8192.0


def _polynomial(r2: jax.Array, coefficients: tuple[np.float32, ...]) -> jax.Array:
    """Horner: c0 r2^(n-1) + ... + c_(n-1)."""
    value = coefficients[0] * r2
    for c in coefficients[1:-1]:
        value = (value + c) * r2
    return value + coefficients[-1]


def _reduced_sin_cos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin x, cos x) from one shared range reduction; |x| <= SIN_COS_REDUCTION_LIMIT."""
    j = jnp.round(x * _TWO_OVER_PI)
    c1, c2, c3 = _PI_OVER_2
    r = ((x - j * c1) - j * c2) - j * c3                  # x - j pi/2, in [-pi/4, pi/4]
    r2 = r * r
    sin_r = r + r * r2 * _polynomial(r2, _SIN_COEFFICIENTS)
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * _polynomial(r2, _COS_COEFFICIENTS)
    quadrant = j.astype(jnp.int32) & 3
    # sin(r + q pi/2), cos(r + q pi/2) for q = 0, 1, 2, 3: (s, c), (c, -s), (-s, -c), (-c, s).
    swap = (quadrant & 1) == 1
    sin_x, cos_x = jnp.where(swap, cos_r, sin_r), jnp.where(swap, sin_r, cos_r)
    sin_x = jnp.where(quadrant >= 2, -sin_x, sin_x)
    cos_x = jnp.where((quadrant == 1) | (quadrant == 2), -cos_x, cos_x)
    return sin_x, cos_x


def _cpu_sin_cos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    in_range = jnp.max(jnp.abs(x), initial=0.0) <= SIN_COS_REDUCTION_LIMIT
    return jax.lax.cond(in_range, _reduced_sin_cos, lambda v: (jnp.sin(v), jnp.cos(v)), x)


@jax.custom_jvp
def sin_cos(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sin x, cos x) of a float32 array, elementwise.

    On the CPU: one shared range reduction and two polynomials (within 1e-7, ~10x the
    speed of XLA:CPU's own sin and cos); XLA's sin and cos on every other backend, and on the CPU
    for an array with any |x| > SIN_COS_REDUCTION_LIMIT. Derivatives: (cos x, -sin x).
    """
    return jax.lax.platform_dependent(
        x, cpu=_cpu_sin_cos, default=lambda v: (jnp.sin(v), jnp.cos(v)))


@sin_cos.defjvp
def _sin_cos_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]):
    (x,), (dx,) = primals, tangents
    sin_x, cos_x = sin_cos(x)
    return (sin_x, cos_x), (cos_x * dx, -sin_x * dx)
