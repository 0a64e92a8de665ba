"""train/schedule.py: the learning rate against an independent computation and optax."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from soma_models.train.schedule import learning_rate

SETTINGS = [  # (peak, warmup_steps, total_steps, min_ratio)
    (1e-3, 100, 1000, 0.1),
    (3e-4, 1, 10, 0.0),
    (2e-3, 0, 50, 0.5),
    (1e-3, 10, 10, 0.1),      # all warmup: the decay never starts inside the run
    (5e-4, 7, 8, 1.0),        # floor = peak: flat after warmup
]


def independent(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """The schedule from its definition, with a different decomposition: the cosine
    written as cos^2 of half the angle, the warmup as a fraction of the steps done."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    done = min(step - warmup, span) / span
    return peak * (min_ratio + (1.0 - min_ratio) * math.cos(math.pi * done / 2) ** 2)


@pytest.mark.parametrize("peak,warmup,total,min_ratio", SETTINGS)
def test_learning_rate_matches_an_independent_computation(peak, warmup, total, min_ratio):
    for step in range(total + 5):             # past the end it stays at the floor
        got = learning_rate(step, peak=peak, warmup_steps=warmup, total_steps=total,
                            min_ratio=min_ratio)
        assert got == pytest.approx(independent(step, peak, warmup, total, min_ratio),
                                    rel=1e-12, abs=1e-18), step


def test_landmarks():
    kw = {"peak": 1e-3, "warmup_steps": 100, "total_steps": 1000, "min_ratio": 0.1}
    assert learning_rate(0, **kw) == pytest.approx(1e-5)
    assert learning_rate(99, **kw) == pytest.approx(1e-3)       # warmup ends at the peak
    assert learning_rate(100, **kw) == pytest.approx(1e-3)      # the cosine starts there
    assert learning_rate(550, **kw) == pytest.approx(0.55e-3)   # half-way: mid value
    assert learning_rate(1000, **kw) == pytest.approx(1e-4)
    rates = [learning_rate(s, **kw) for s in range(100, 1001)]
    assert all(a >= b for a, b in itertools.pairwise(rates))    # monotone decay


@pytest.mark.parametrize("peak,warmup,total,min_ratio", SETTINGS)
def test_the_flax_trainers_optax_schedule_is_the_same(peak, warmup, total, min_ratio):
    pytest.importorskip("optax")
    from soma_models.train.flax_sharding import learning_rate_schedule

    schedule = learning_rate_schedule(peak, warmup, total, min_ratio)
    steps = np.arange(total + 5)
    got = np.array([float(schedule(int(s))) for s in steps])
    want = np.array([learning_rate(int(s), peak=peak, warmup_steps=warmup, total_steps=total,
                                   min_ratio=min_ratio) for s in steps])
    # optax works in float32; its warmup interpolates init + (peak - init) * s / (W - 1), which
    # rounds to ~1e-5 relative at the smallest rates.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
