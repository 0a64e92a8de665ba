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

The temporary folder is `soma_models.atomic`'s (`.step_N.PID-TOKEN.soma-tmp`): removed on
any exception, SIGINT or SIGTERM, and, when a killed writer left one, by the next writer
into `checkpoints/`.

Before anything is written the run checks a checkpoint against itself
(`check_resumable`, plain dict comparison) and its weights for NaN/Inf (`refuse_non_finite`).

The RNG states a run depends on (torch CPU and CUDA, NumPy's global generator, Python's
`random`) are captured and restored here too: `capture_rng` / `restore_rng`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from soma_models.atomic import atomic_write, staging
from soma_models.errors import WeightsError
from soma_models.safetensors_io import SafetensorsFile, save_file
from soma_models.train.config import RESUME_MAY_CHANGE, option_name
from soma_models.train.errors import NonFiniteError, TrainConfigError, TrainError

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
    # Same step written again (e.g. after a resume): `staging` replaces the old folder.
    with staging(final, directory=True) as folder:
        model_writer(folder / MODEL_FILE)
        save_file(folder / STATE_FILE, dict(tensors), {"format_version": str(FORMAT_VERSION)})
        write_json(folder / JSON_FILE, {"format_version": FORMAT_VERSION, **state})
    write_json(root / LATEST_FILE, {"checkpoint": final.name, "step": step})
    _prune(root, keep=max(1, keep_last), current=final.name)
    return final


OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."


def save_run(root: str | os.PathLike, step: int, *, model_writer,
             optimizer: Mapping[str, np.ndarray], run_state: Mapping[str, Any],
             record: Mapping[str, Any], keep_last: int) -> Path:
    """A trainer's checkpoint: `optimizer` (`{f"{param}.{key}": array}`) and the RNG byte
    states (`run_state["rng_tensors"]`) to `state.safetensors`, the rest of `run_state`
    (`Trainer.state_dict()`) and `record` (configs, corpus) to `trainer_state.json`."""
    tensors = {OPTIMIZER_PREFIX + name: value for name, value in optimizer.items()}
    tensors.update(run_state["rng_tensors"])
    state = {**{k: v for k, v in run_state.items() if k != "rng_tensors"}, **record}
    return save_checkpoint(root, step, model_writer=model_writer, tensors=tensors, state=state,
                           keep_last=keep_last)


def load_run(root: str | os.PathLike) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """The newest checkpoint under `root` as `(folder, state, optimizer)`: `state` is what
    `save_run` got as `run_state` and `record` (so `Trainer.load_state_dict` takes it),
    `optimizer` as it was given. CheckpointError (one line) if missing or damaged."""
    folder = find_checkpoint(root)
    state, tensors = read_checkpoint(folder)
    state["rng_tensors"] = {k: v for k, v in tensors.items() if k.startswith(RNG_PREFIX)}
    optimizer = {k[len(OPTIMIZER_PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(OPTIMIZER_PREFIX)}
    return folder, state, optimizer


def capture_rng() -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The process's RNG states: `(tensors, json_state)` for `save_checkpoint`'s
    `tensors` (byte states) and `state["rng"]` (NumPy's and Python's, JSON-able)."""
    import torch

    tensors = {"rng.torch": torch.get_rng_state().numpy()}
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = cuda_state.numpy()
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {"python": [py_version, list(py_internal), py_gauss],
             "numpy": [np_state[0], np_state[1].tolist(),
                       *(v.item() if hasattr(v, "item") else v for v in np_state[2:])]}
    return tensors, state


def restore_rng(tensors: Mapping[str, np.ndarray], state: Mapping[str, Any]) -> None:
    """Put back the states `capture_rng` returned (CUDA ones for the devices present)."""
    import torch

    torch.set_rng_state(torch.from_numpy(np.asarray(tensors["rng.torch"])))
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"rng.cuda.{i}" in tensors:
            torch.cuda.set_rng_state(torch.from_numpy(np.asarray(tensors[f"rng.cuda.{i}"])), i)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), *npy[2:]))


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


def has_checkpoint(root: str | os.PathLike) -> bool:
    """Whether `root` has anything to resume from (`latest.json` or a complete step_*/)."""
    root = Path(root)
    return (root / LATEST_FILE).is_file() or bool(_complete_checkpoints(root))


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


# ------------------------------------------------------------------ the gates

def last_good(root: str | os.PathLike) -> str:
    """Where a run stands on disk, for an error message: its newest checkpoint, if any."""
    try:
        folder = find_checkpoint(root)
    except CheckpointError:
        return ("No checkpoint was written before this step; lower --lr (or check the "
                "data) and start again with --overwrite")
    return (f"The last good checkpoint, {folder}, is unchanged; lower --lr and start a "
            f"new run, e.g. with --init-from {folder / MODEL_FILE}")


def refuse_non_finite(bad: list[str], step: int, root: str | os.PathLike) -> None:
    """The finiteness gate before weights are saved: `bad` names the parameters holding
    NaN or Inf (empty: nothing to refuse); NonFiniteError naming a few of them otherwise."""
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(
            f"step {step}: the weights hold NaN or Inf ({shown}); training stopped "
            f"without saving them. {last_good(root)}")


def check_resumable(folder: Path, state: Mapping[str, Any], *, model_config: Mapping[str, Any],
                    train_config: Mapping[str, Any], fingerprint: str, phases: int) -> None:
    """Refuse (TrainError, one line) to resume from a checkpoint whose `trainer_state.json`
    (`state`) was written by a run that differs from this one: another model config, any
    setting `--resume` may not change (`config.RESUME_MAY_CHANGE`), other training data
    (`fingerprint`) or another number of sequence-length phases. Pure dict comparison."""
    saved = state.get("model_config", {})
    if saved != model_config:
        diff = sorted(k for k in set(saved) | set(model_config)
                      if saved.get(k) != model_config.get(k))
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs requested "
                            f"{model_config.get(k)!r}" for k in diff)
        raise TrainError(f"{folder}: model config does not match the checkpoint ({details})")
    saved_cfg = state.get("train_config", {})
    changed = [f"{option_name(name)} {value!r} (checkpoint: {saved_cfg[name]!r})"
               for name, value in train_config.items()
               if name not in RESUME_MAY_CHANGE and name in saved_cfg
               and saved_cfg[name] != value]
    if changed:
        raise TrainError(f"{folder}: --resume with settings that change the run: "
                         f"{', '.join(changed)}; keep them as the checkpoint has them, or "
                         f"start a new run (another --out, or --overwrite)")
    if state.get("corpus", {}).get("fingerprint") != fingerprint:
        raise TrainError(f"{folder}: the training data differs from the checkpoint's "
                         f"(files or sizes changed); resume with the same data, or start "
                         f"a new run (another --out, or --overwrite)")
    positions = state.get("data_position", [])
    if len(positions) != phases:
        raise TrainConfigError(
            f"{folder}: checkpoint has {len(positions)} sequence-length phase(s), this run "
            f"{phases}; keep --final-seq-len/--final-steps as they were")
