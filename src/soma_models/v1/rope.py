"""RoPE timescales, framework-free (SPEC §3.2).

`timescale_i = max_wavelength ** (2 i / head_dim)` in float32. We evaluate the power in
float64 and round once to float32, which is the correctly rounded value; it equals what
the runtime's libm `powf` gives for every V1 head size, whereas some frameworks' vector
`pow` kernels are one ulp off for a few `i`. One ulp matters: angles are
`position / timescale`, and at positions around 1e6 an ulp of the timescale moves the
angle by a visible fraction of a radian.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def _timescales(head_dim: int, max_wavelength: float) -> np.ndarray:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    frac = (np.arange(head_dim // 2, dtype=np.float32) * np.float32(2.0)) / np.float32(head_dim)
    out = (np.float64(np.float32(max_wavelength)) ** frac.astype(np.float64)).astype(np.float32)
    out.setflags(write=False)
    return out


def rope_timescales(head_dim: int, max_wavelength: float) -> np.ndarray:
    """float32 `[head_dim // 2]` timescales (read-only, cached)."""
    return _timescales(int(head_dim), float(max_wavelength))


#: RoPE's base wavelength when none is given (V1's).
DEFAULT_MAX_WAVELENGTH = 10_000.0


def rope_arguments(head_size: int, head_dim: float | None, max_wavelength: float | None,
                   scale_factor: float | None) -> tuple[float, float]:
    """`(max_wavelength, scale_factor)` for `apply_rope` called in either form.

    The published form is `apply_rope(inputs, positions, head_dim, max_wavelength=10000,
    scale_factor=1.0)`; ours was `apply_rope(x, pos_ids, max_wavelength, scale_factor)`.
    The third positional argument is read as `head_dim` when it is an integer equal to the
    inputs' last axis (`head_size`), and as our `max_wavelength` otherwise (then a fourth
    positional argument is our `scale_factor`). Keywords are unambiguous.
    """
    published = (head_dim is None or (not isinstance(head_dim, bool)
                                      and float(head_dim) == float(head_size)
                                      and float(head_dim).is_integer()))
    if published:
        wavelength = DEFAULT_MAX_WAVELENGTH if max_wavelength is None else max_wavelength
        return float(wavelength), 1.0 if scale_factor is None else float(scale_factor)
    if max_wavelength is not None and scale_factor is not None:
        raise TypeError(f"apply_rope: third argument {head_dim!r} is not the head size "
                        f"({head_size}), so it was read as max_wavelength and the fourth as "
                        f"scale_factor, but scale_factor= was given too")
    scale = max_wavelength if max_wavelength is not None else scale_factor
    return float(head_dim), 1.0 if scale is None else float(scale)
