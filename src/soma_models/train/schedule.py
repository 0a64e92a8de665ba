"""What each step uses, as pure functions of the step: the learning rate (linear warmup,
then cosine decay to a floor) and the seeds of its micro-batches.

So the schedule has no state to save: resuming at step `s` gives the same rate and the
same random draws as never stopping.
"""

from __future__ import annotations

import math

import numpy as np


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.1) -> float:
    """Rate for optimizer step `step` (0-based).

    Steps `0 .. warmup-1` ramp linearly from `peak / warmup` up to `peak`; then a half
    cosine takes it from `peak` down to `min_ratio * peak` at `total_steps`, where it stays.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min_ratio * peak
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def micro_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """A 63-bit seed for (run seed, optimizer step, global micro-batch, purpose), so that
    every random draw of a step is the same however the run is split or resumed."""
    state = np.random.SeedSequence([seed, step, micro, stream]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
