"""Screening's prescreen: a cheap approximate pass that proves clear misses (framework-free).

A submitter screens many samples and submits the few hits, so nearly every sample is a
clear miss. The approximate pass (every model under bf16 autocast, the same rows, noise
and terms) gives per sample an approximate loss `L~[m]` and embedding per model. If those
are within margins of the exact float32 values,

    |L~[m] - L[m]| <= dL        and        |d~[m, t] - d[m, t]| <= dd    (every m, target t)

then the exact winner w (lowest exact loss) has L~[w] <= L[w] + dL <= L[m~] + dL <=
L~[m~] + 2 dL, where m~ is the approximate lowest: w is among the models whose approximate
loss is within 2 dL of the lowest. When every such model's approximate distance to every
target exceeds `threshold + dd`, the exact winner's distance exceeds `threshold`: the
sample is certainly a miss, and is dropped (`can_drop`). Every other sample is re-scored
exactly.

What is certified and what is not: the margins are measured, not proven. `calibrate`
scores the first samples both ways and sets each margin to k times the largest deviation
seen (with a floor). A later sample whose bf16 error exceeds that margin could be dropped
although it is a hit. Nothing wrong is ever reported as a hit: every kept line is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PRESCREENS = ("bf16",)
CALIBRATION_SAMPLES = 32
MARGIN_FACTOR = 4.0
# bf16 keeps 8 significant bits (relative resolution 2^-8 ~ 4e-3); a calibration that sees
# no deviation at all (a handful of short samples) must still not trust bf16 beyond this.
MARGIN_FLOOR = 1e-3


@dataclass(frozen=True)
class Approximate:
    """One sample's approximate pass: `losses [models]`, `distances [models, targets]`
    (the cosine distance of every model's approximate embedding to every target)."""

    losses: np.ndarray
    distances: np.ndarray

    def nearest(self) -> tuple[int | None, float | None]:
        """(target index, distance) nearest to the approximate winner's embedding (the
        lowest approximate loss); (None, None) when nothing is finite."""
        losses = np.where(np.isnan(self.losses), np.inf, self.losses)
        row = self.distances[int(np.argmin(losses))]
        finite = np.flatnonzero(np.isfinite(row))
        if finite.size == 0:
            return None, None
        best = int(finite[np.argmin(row[finite])])
        return best, float(row[best])


@dataclass(frozen=True)
class Margins:
    """The loss and distance margins (dL, dd) and how they were set.

    loss_deviation, distance_deviation: the calibration's largest |approximate - exact|
    (None for a margin given by hand, or with no calibration sample); samples: how many
    samples calibrated them.
    """

    loss: float
    distance: float
    loss_deviation: float | None = None
    distance_deviation: float | None = None
    samples: int = 0

    def __str__(self) -> str:
        def part(name: str, margin: float, deviation: float | None) -> str:
            seen = "" if deviation is None else f" (largest deviation {deviation:.3g})"
            return f"{name} {margin:.3g}{seen}"

        return (f"margins {part('loss', self.loss, self.loss_deviation)}, "
                f"{part('distance', self.distance, self.distance_deviation)}"
                f"{f' over {self.samples} calibration samples' if self.samples else ''}")


def check_margin(name: str, value: float | None) -> float | None:
    """A margin given by hand: None, or a positive finite number (ValueError otherwise)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return value


def largest_deviations(approximate: Sequence[Approximate],
                       exact: Sequence[Approximate]) -> tuple[float, float]:
    """The largest |approximate - exact| loss and distance over the samples, models and
    targets where both are finite (a non-finite approximate value is never dropped on,
    see `can_drop`, so it does not need a margin)."""
    loss_dev = distance_dev = 0.0
    for approx, ex in zip(approximate, exact, strict=True):
        for a, e, current in ((approx.losses, ex.losses, "loss"),
                              (approx.distances, ex.distances, "distance")):
            a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
            both = np.isfinite(a) & np.isfinite(e)
            dev = float(np.max(np.abs(a[both] - e[both]))) if both.any() else 0.0
            if current == "loss":
                loss_dev = max(loss_dev, dev)
            else:
                distance_dev = max(distance_dev, dev)
    return loss_dev, distance_dev


def calibrate(approximate: Sequence[Approximate], exact: Sequence[Approximate], *,
              factor: float = MARGIN_FACTOR, floor: float = MARGIN_FLOOR,
              margin_loss: float | None = None,
              margin_distance: float | None = None) -> Margins:
    """Margins from samples scored both ways: `factor` x the largest deviation, at least
    `floor`; `margin_loss` / `margin_distance` (when given) are taken as they are."""
    loss_dev, distance_dev = largest_deviations(approximate, exact)
    n = len(exact)
    return Margins(
        check_margin("margin_loss", margin_loss) or max(factor * loss_dev, floor),
        check_margin("margin_distance", margin_distance) or max(factor * distance_dev, floor),
        None if margin_loss is not None or not n else loss_dev,
        None if margin_distance is not None or not n else distance_dev, n)


def can_drop(approx: Approximate, threshold: float, margins: Margins) -> bool:
    """Whether the sample is a certain miss (module docstring): for every model whose
    approximate loss is within 2 dL of the lowest, every approximate distance exceeds
    `threshold + dd`. Any non-finite approximate loss or distance keeps the sample (the
    runtime's NaN rules are for the exact pass to apply)."""
    losses = np.asarray(approx.losses, np.float64)
    if not np.all(np.isfinite(losses)):
        return False
    contenders = losses <= losses.min() + 2 * margins.loss
    distances = np.asarray(approx.distances, np.float64)[contenders]
    return bool(np.all(np.isfinite(distances))
                and np.all(distances > threshold + margins.distance))


__all__ = ["CALIBRATION_SAMPLES", "MARGIN_FACTOR", "MARGIN_FLOOR", "PRESCREENS", "Approximate",
           "Margins", "calibrate", "can_drop", "check_margin", "largest_deviations"]
