"""What a `weights` argument may be, checked in one place.

`score`, `compete` and screening (through `scoring.load_backend`), `validate` and
`publish` take weights in some of these forms: a path, bytes-like data (the file's
bytes), a mapping of canonical arrays, a loaded torch or Flax model. Anything else is
refused here, before any work, in one line naming `weights` and what was given, instead
of failing later somewhere deep with a message that names neither.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

Kind = Literal["path", "bytes", "arrays", "model"]

_DESCRIBED = {"path": "a path", "bytes": "bytes-like data",
              "arrays": "a dict of canonical arrays", "model": "a loaded torch or Flax Model"}


def _is_instance_of(obj: object, module: str, attr_path: str) -> bool:
    """isinstance check against a class of an *already imported* framework (a model of a
    framework that was never imported cannot exist, and importing one takes seconds)."""
    if module not in sys.modules:
        return False
    cls: Any = sys.modules[module]
    for part in attr_path.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            return False
    return isinstance(obj, cls)


def model_framework(weights: object) -> str | None:
    """'torch' or 'flax' when `weights` is a loaded model, else None."""
    if _is_instance_of(weights, "torch", "nn.Module"):
        return "torch"
    if _is_instance_of(weights, "flax.nnx", "Module"):
        return "flax"
    return None


def kind_of(weights: object) -> Kind | None:
    """Which accepted form `weights` has, or None."""
    if isinstance(weights, (str, os.PathLike)):
        return "path"
    if isinstance(weights, Mapping):
        return "arrays"
    if model_framework(weights) is not None:
        return "model"
    try:
        memoryview(weights)  # type: ignore[arg-type]
    except TypeError:
        return None
    return "bytes"


def check_weights(weights: object, kinds: tuple[Kind, ...] = ("path", "bytes", "arrays", "model"),
                  ) -> Kind:
    """The form of `weights`; a TypeError (one line) when it is not one of `kinds`."""
    kind = kind_of(weights)
    if kind in kinds:
        return kind  # type: ignore[return-value]
    wanted = [_DESCRIBED[k] for k in kinds]
    listed = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} or {wanted[-1]}"
    shown = " ".join(repr(weights).split())
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    given = "None" if weights is None else f"{type(weights).__name__} {shown}"
    raise TypeError(f"weights must be {listed}, got {given}")
