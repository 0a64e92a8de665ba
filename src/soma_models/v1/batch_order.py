"""How the runtime's 4-worker data loader can order batches, and the loss range that follows.

The runtime's loader splits the `n` batches into 4 contiguous runs of whole batches (the
first `n % 4` runs one batch longer). Each worker delivers its run in order, but the
workers' deliveries interleave arbitrarily, and the evaluation's batch counter `k` counts
arrivals: batch `b` meets the noise of slot `k`, not of `b` (SPEC §6 "Batch order").

The model's forward pass does not depend on the order, so the cross-entropy part of the
score is fixed; only the pairing of batches with SIGReg noise slots changes. Batch `b`,
the `i`-th of its run `r`, can arrive at any slot `i + j` where `j` is the number of other
runs' batches already delivered, so `0 <= j <= n - len(r)`.

Given `cost[b, k]` (the SIGReg term of batch `b` under the noise of slot `k`), the lowest
and highest total over all interleavings is a shortest/longest path over the workers'
progress: a state is how many batches each run has delivered `(p_0, p_1, p_2, p_3)`, its
slot is `p_0 + p_1 + p_2 + p_3`, and a step advances one run. There are
`prod(len(r) + 1)`, about `(n/4 + 1)^4`, states; we sweep them level by level (one level per
slot) with NumPy. Past `MAX_EXACT_STATES` states we fall back to a looser bound that
drops the "each slot holds one batch" constraint: every batch independently takes its
cheapest (dearest) feasible slot. That bound always contains the exact range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LOADER_WORKERS = 4
# ~4.2M states: the sweep holds a few int32/float64 arrays of this length (~100 MB).
MAX_EXACT_STATES = 1 << 22


@dataclass(frozen=True)
class BatchOrderRange:
    """Lowest and highest score the chain can report for the possible batch orders.

    `exact` is False when the range is the looser per-batch bound (too many orders to
    sweep exactly); `orders` is how many distinct arrival orders the loader can produce.
    """

    low: float
    high: float
    exact: bool
    orders: int
    n_batches: int


def worker_runs(n_batches: int, workers: int = LOADER_WORKERS) -> list[range]:
    """The contiguous runs of batch indices the loader's workers deliver."""
    base, extra = divmod(n_batches, workers)
    runs, start = [], 0
    for r in range(workers):
        length = base + (1 if r < extra else 0)
        runs.append(range(start, start + length))
        start += length
    return runs


def feasible_slots(n_batches: int, workers: int = LOADER_WORKERS) -> list[range]:
    """For each batch, the arrival slots `k` it can occupy (always includes its own index)."""
    slots: list[range] = [range(0)] * n_batches
    for run in worker_runs(n_batches, workers):
        for i, b in enumerate(run):
            slots[b] = range(i, i + n_batches - len(run) + 1)
    return slots


def order_count(n_batches: int, workers: int = LOADER_WORKERS) -> int:
    """Number of distinct arrival orders: the multinomial n! / prod(len(r)!)."""
    count = math.factorial(n_batches)
    for run in worker_runs(n_batches, workers):
        count //= math.factorial(len(run))
    return count


def _exact_extremes(cost: np.ndarray, runs: list[range]) -> tuple[float, float]:
    """Min and max over interleavings of sum_k cost[batch at slot k, k] (level sweep)."""
    n = cost.shape[0]
    shape = tuple(len(r) + 1 for r in runs)
    progress = np.indices(shape, dtype=np.int32).reshape(len(runs), -1)   # [runs, states]
    strides = np.array([int(np.prod(shape[r + 1:])) for r in range(len(runs))], dtype=np.int64)
    level = progress.sum(axis=0)
    by_level = np.argsort(level, kind="stable")
    bounds = np.searchsorted(level[by_level], np.arange(n + 2))
    low = np.full(progress.shape[1], np.inf)
    high = np.full(progress.shape[1], -np.inf)
    low[0] = high[0] = 0.0
    for slot in range(n):
        states = by_level[bounds[slot + 1]:bounds[slot + 2]]               # level slot + 1
        best_low = np.full(states.shape, np.inf)
        best_high = np.full(states.shape, -np.inf)
        for r, run in enumerate(runs):
            done = progress[r, states]
            moved = done > 0              # the state was reached by run r delivering a batch
            prev = states[moved] - strides[r]
            batch = run.start + done[moved] - 1
            step = cost[batch, slot]
            best_low[moved] = np.minimum(best_low[moved], low[prev] + step)
            best_high[moved] = np.maximum(best_high[moved], high[prev] + step)
        low[states], high[states] = best_low, best_high
    return float(low[-1]), float(high[-1])


def extreme_sums(cost: np.ndarray, workers: int = LOADER_WORKERS) -> tuple[float, float, bool]:
    """Min and max of `sum_k cost[b(k), k]` over the loader's orders; `exact` flag.

    cost: `[n, n]`; only feasible `(batch, slot)` pairs are read (others may be NaN).
    """
    n = cost.shape[0]
    runs = worker_runs(n, workers)
    if math.prod(len(r) + 1 for r in runs) <= MAX_EXACT_STATES:
        low, high = _exact_extremes(cost, runs)
        return low, high, True
    low = high = 0.0
    for b, slots in enumerate(feasible_slots(n, workers)):
        row = cost[b, slots.start:slots.stop]
        low += float(row.min())
        high += float(row.max())
    return low, high, False
