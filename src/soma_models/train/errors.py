"""The trainer's error types (framework-free, so the CLI can check options before torch)."""

from __future__ import annotations


class TrainError(ValueError):
    """A training run cannot start or continue; the message is one line naming the problem."""


class TrainConfigError(TrainError):
    """A setting is out of range or contradicts another (a usage error: exit status 2)."""


class NonFiniteError(TrainError):
    """The loss, a gradient or the weights became NaN or infinite; training stopped."""
