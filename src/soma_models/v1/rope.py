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
