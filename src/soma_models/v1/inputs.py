"""What a user hands in, read once for every command: data files, target embeddings,
decryption keys; and floats made safe for JSON on the way out.

`soma-models` (every command) and screening read their inputs here, so that a file means
the same thing wherever it is given. (The `--protocol` argument type, shared by
`soma-models` and `soma-models train`, sits with the other argument types in
`soma_models.cli_common`.)

Target embeddings, wherever they are taken (`score --target`, `screen --targets`,
`load_targets`), are one of:

* a `.npy` file of real numbers: `[D]` (one target) or `[n, D]`;
* any other file holding a JSON list of numbers (one target), a JSON list of lists of
  numbers (`[n, D]`, all of one length), or numbers separated by commas and/or whitespace
  (one target, however the lines are broken);
* for `score --target` only, which takes one target: an inline comma-separated list.

Errors are one line (ValueError, FileNotFoundError) naming the file or option.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from soma_models.v1.transit import parse_key

# --------------------------------------------------------------------------- data

def map_file(path: str | os.PathLike) -> memoryview:
    """A non-empty file's bytes, memory-mapped read-only, so large data is not copied (the
    map lives as long as the view). Callers refuse an empty file first, in their words:
    there is nothing to map."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ValueError(f"{os.fspath(path)}: file is empty")
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def read_data(path: str, option: str = "--data") -> memoryview:
    """The data file a command scores, memory-mapped; a missing or empty one is refused
    (the runtime scores no empty data)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{option} {path}: no such data file")
    if file.stat().st_size == 0:
        raise ValueError(f"{option} {path}: data is empty: the runtime refuses it "
                         "('data loader produced no batches')")
    return map_file(file)


# --------------------------------------------------------------------------- targets

class _NotNumbers(ValueError):
    """Text that is not one of the target formats; `json` says whether it was JSON."""

    def __init__(self, json: bool):
        super().__init__("not numbers")
        self.json = json


def _numbers_in_text(content: str) -> np.ndarray:
    """`[D]` or `[n, D]` float64 from a JSON list (of lists) or from numbers separated by
    commas and/or whitespace."""
    content = content.strip()
    if content.startswith("["):
        try:
            return np.asarray(json.loads(content), dtype=np.float64)
        except (json.JSONDecodeError, TypeError, ValueError):
            raise _NotNumbers(json=True) from None
    try:
        return np.asarray([float(p) for p in content.replace(",", " ").split()],
                          dtype=np.float64)
    except ValueError:
        raise _NotNumbers(json=False) from None


def _target_file(path: Path) -> np.ndarray:
    """The values of a targets file in any of the formats (module doc), as stored."""
    if path.suffix == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"{path}: not a numeric .npy array ({exc})") from None
        if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
                values.dtype, np.complexfloating):
            raise ValueError(f"{path}: targets must be real numbers, got dtype {values.dtype}")
        return values
    try:
        content = path.read_text()
    except UnicodeDecodeError:
        raise _NotNumbers(json=False) from None
    return _numbers_in_text(content)


def load_targets(path: str | os.PathLike) -> np.ndarray:
    """Targets `[n, D]` float32 from a file in any of the formats (module doc); a single
    vector is one target."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{os.fspath(path)}: no such targets file")
    try:
        values = _target_file(file)
    except _NotNumbers as exc:
        also = "" if exc.json else ", or numbers separated by commas or whitespace"
        raise ValueError(f"{file}: targets must be a .npy array or a JSON list of lists of "
                         f"numbers, all of the same length{also}") from None
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{file}: targets must be [n, embedding_dim] with n >= 1, got shape "
                         f"{list(values.shape)}")
    return np.asarray(values, dtype=np.float32)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_target(text: str, option: str = "--target") -> np.ndarray:
    """One target embedding `[D]` float32: a file in any of the formats (module doc, one
    row) or an inline comma-separated list."""
    path = Path(text)
    if path.is_dir():
        raise ValueError(f"{option} {text}: is a directory, expected a file or a list")
    try:
        if path.is_file():
            values = _target_file(path)
        elif "," not in text and not _is_number(text):
            raise ValueError(f"{option} {text!r}: no such file, and not a comma-separated list")
        else:
            values = _numbers_in_text(text)
    except _NotNumbers as exc:
        where = f"{option} {path}" if path.is_file() else option
        kind = "a JSON list of numbers" if exc.json else "a list of numbers"
        raise ValueError(f"{where}: not {kind}") from None
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{option} {text}: the target embedding must be a non-empty vector, "
                         f"got shape {list(values.shape)}")
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------- keys

#: What stands for "this file is not encrypted" among the keys of several files.
NO_KEY = ("none", "-", "")


def parse_key_arg(text: str | None, option: str = "--key") -> bytes | None:
    """A key given as text (Base58 or 64 hex), as its 32 bytes; errors name the option,
    never the key."""
    if text is None:
        return None
    try:
        return parse_key(text)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}") from None


def keys_for(files: Sequence[str], keys: Sequence[str] | None) -> list[bytes | None]:
    """One key (bytes) or None per file, from one `--key` per file in order; 'none' (or
    '-') marks an unencrypted file among encrypted ones. No keys: every file is plain."""
    if not keys:
        return [None] * len(files)
    if len(keys) != len(files):
        raise ValueError(f"got {len(keys)} --key for {len(files)} weights file(s): give one "
                         "per file, in order ('none' for an unencrypted file)")
    return [None if k.lower() in NO_KEY else parse_key_arg(k, f"--key #{i + 1}")
            for i, k in enumerate(keys)]


# --------------------------------------------------------------------------- JSON out

def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: a NaN or infinite value is written as null."""
    return None if x is None or not math.isfinite(x) else float(x)


__all__ = ["NO_KEY", "finite_or_none", "keys_for", "load_targets", "map_file",
           "parse_key_arg", "parse_target", "read_data"]
