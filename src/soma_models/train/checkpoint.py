"""Checkpoints: safe formats only, written atomically.

A run folder holds::

    checkpoints/
      latest.json              {"checkpoint": "step_00000200"}  (rewritten atomically)
      step_00000200/
        model.safetensors      canonical weights (Model.load / score read it directly)
        state.safetensors      optimizer moments, RNG byte states (tensors)
        trainer_state.json     step, data position, configs, scalar RNG states

Nothing is pickled and nothing is unpickled. A checkpoint folder is first written under
a temporary name, every file fsynced, then renamed into place; `latest.json` moves to
it only after that, and older checkpoints are pruned only after *that*. A crash at any
moment leaves the previous good checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soma_models.errors import WeightsError
from soma_models.safetensors_io import SafetensorsFile, atomic_write, save_file

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
JSON_FILE = "trainer_state.json"
LATEST_FILE = "latest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint cannot be written or resumed from."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows); rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, doc: Mapping[str, Any]) -> None:
    atomic_write(path, [json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")])


def save_checkpoint(root: str | os.PathLike, step: int, *, model_writer,
                    tensors: Mapping[str, np.ndarray], state: Mapping[str, Any],
                    keep_last: int = 2) -> Path:
    """Write checkpoint `step` under `root` and point `latest.json` at it.

    `model_writer(path)` writes the canonical weights file (e.g. `Model.save`).
    `tensors` go to `state.safetensors`, `state` (JSON-able) to `trainer_state.json`.
    Keeps the newest `keep_last` checkpoints (at least 1).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    staging = root / f".{final.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        model_writer(staging / MODEL_FILE)
        save_file(staging / STATE_FILE, dict(tensors), {"format_version": str(FORMAT_VERSION)})
        write_json(staging / JSON_FILE, {"format_version": FORMAT_VERSION, **state})
        _fsync_dir(staging)
        if final.exists():
            # Same step written again (e.g. after a resume): move the old one aside first.
            stale = root / f".{final.name}.old-{os.getpid()}"
            os.replace(final, stale)
            os.replace(staging, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json(root / LATEST_FILE, {"checkpoint": final.name, "step": step})
    _prune(root, keep=max(1, keep_last), current=final.name)
    return final


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    for child in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.match(child.name)
        if match and all((child / f).is_file() for f in (MODEL_FILE, STATE_FILE, JSON_FILE)):
            out.append((int(match.group(1)), child))
    return sorted(out)


def _prune(root: Path, keep: int, current: str) -> None:
    complete = _complete_checkpoints(root)
    for _, path in complete[:-keep]:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve `path` to one checkpoint folder.

    `path` may be a checkpoint folder itself, or a checkpoints root (then `latest.json`
    is followed, or, without it, the newest complete `step_*` folder is taken).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or checkpoints folder")
    if (path / JSON_FILE).exists():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        try:
            name = json.loads(latest.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{latest}: unreadable ({exc})") from None
        target = path / str(name)
        if not (target / JSON_FILE).is_file():
            raise CheckpointError(f"{latest}: points to {target}, which is not a checkpoint")
        return target
    complete = _complete_checkpoints(path)
    if not complete:
        raise CheckpointError(f"{path}: no checkpoint found (expected {LATEST_FILE} or "
                              f"step_*/ with {MODEL_FILE}, {STATE_FILE}, {JSON_FILE})")
    return complete[-1][1]


def read_checkpoint(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """`(state, tensors)` of a checkpoint folder; one-line CheckpointError if damaged."""
    json_path = folder / JSON_FILE
    try:
        state = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{json_path}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path}: not a soma-models trainer state "
                              f"(format_version {FORMAT_VERSION} expected)")
    try:
        file = SafetensorsFile(folder / STATE_FILE)
        tensors = {name: np.array(file.array(name)) for name in file.tensors}
    except (OSError, WeightsError) as exc:
        raise CheckpointError(" ".join(str(exc).split())) from None
    return state, tensors
