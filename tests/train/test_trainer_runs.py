"""Runs are never lost or mixed: the run folder's rules, --resume's checks, kills during a
checkpoint, and stopping on a non-finite loss (the trainer's run management)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from soma_models.atomic import is_temporary
from soma_models.safetensors_io import SafetensorsFile
from soma_models.train import checkpoint as ckpt
from soma_models.train.errors import NonFiniteError, TrainConfigError, TrainError
from soma_models.train.metrics import read_metrics
from soma_models.train.trainer import Trainer, train

from .conftest import small_config

RUN = {"steps": 6, "checkpoint_every": 2, "eval_every": 6, "keep_checkpoints": 5}


def weights(path):
    file = SafetensorsFile(path)
    return {k: np.array(file.array(k)) for k in file.tensors}


def digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def litter(out: Path) -> list[str]:
    """Staging folders and temporary files anywhere in a run folder."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if is_temporary(p))


# ------------------------------------------------------------------ the run folder

def test_a_folder_holding_a_run_is_refused_and_overwrite_replaces_it(corpus, tmp_path):
    out = tmp_path / "run"
    train(small_config(corpus, out, steps=4, checkpoint_every=2, eval_every=4))
    before = digest(out)
    with pytest.raises(TrainError, match="already holds a run") as exc:
        Trainer(small_config(corpus, out, steps=2, seed=1))
    assert "--resume" in str(exc.value) and "--overwrite" in str(exc.value)
    assert "\n" not in str(exc.value)
    assert digest(out) == before  # nothing touched
    (out / "notes.txt").write_text("the user's own file")
    result = train(small_config(corpus, out, steps=2, checkpoint_every=2, eval_every=2,
                                seed=1, overwrite=True))
    assert result.step == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json",
                                                                      "step_00000002"]
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2]  # no records of the replaced run
    assert json.loads((out / "run.json").read_text())["train_config"]["seed"] == 1
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert not (out / ".lock").exists()


def test_resume_needs_a_checkpoint(corpus, tmp_path):
    with pytest.raises(TrainError, match="--resume: no checkpoint to resume from"):
        Trainer(small_config(corpus, tmp_path / "new", resume=True))
    assert not (tmp_path / "new").exists()  # refused before anything was written
    # A run that stopped before its first checkpoint: still nothing to resume from.
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "metrics.jsonl").write_text("")
    with pytest.raises(TrainError, match="unfinished run: --overwrite starts over"):
        Trainer(small_config(corpus, tmp_path / "early", resume=True))


def test_resume_refuses_settings_that_change_the_run(corpus, tmp_path):
    out = tmp_path / "run"
    train(small_config(corpus, out, steps=2, checkpoint_every=2, eval_every=2))
    trainer = Trainer(small_config(corpus, out, steps=2, resume=True, seed=3, lr=1e-3,
                                   eval_every=1, checkpoint_every=1))
    with pytest.raises(TrainError) as exc:
        trainer.run()
    message = str(exc.value)
    assert "\n" not in message and "--resume with settings that change the run" in message
    assert "--seed 3 (checkpoint: 0)" in message and "--lr 0.001 (checkpoint: 0.003)" in message
    assert "eval" not in message and "checkpoint-every" not in message  # those may change
    assert not (out / ".lock").exists()
    with pytest.raises(TrainConfigError, match="exclude each other"):
        Trainer(small_config(corpus, out, resume=True, overwrite=True))


@pytest.mark.parametrize("field, value, expected", [
    ("lr", float("inf"), "--lr must be a finite number > 0, got inf"),
    ("lr", float("nan"), "--lr must be a finite number > 0, got nan"),
    ("weight_decay", -0.1, "--weight-decay must be a finite number >= 0"),
    ("grad_clip", float("inf"), "--grad-clip must be a finite number >= 0"),
    ("min_lr_ratio", 1.5, "--min-lr-ratio must be a finite number >= 0 and <= 1"),
    ("sig_reg_coefficient", float("nan"), "--sig-reg-coefficient must be a finite number"),
    ("dropout", 1.0, "--dropout must be a finite number >= 0 and < 1"),
    ("beta2", 1.0, "--beta2 must be a finite number >= 0 and < 1"),
    ("max_minutes", 0.0, "--max-minutes must be a finite number > 0"),
    ("seq_len", 1, "--seq-len must be an integer >= 2, got 1"),
    ("seed", -1, "--seed must be a u64"),
])
def test_settings_are_checked_before_anything_happens(corpus, tmp_path, field, value, expected):
    with pytest.raises(TrainConfigError, match="^" + expected.replace("(", r"\(")
                       .replace(")", r"\)").replace("+", r"\+")):
        Trainer(small_config(corpus, tmp_path / "run", **{field: value}))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ non-finite values

def test_a_nan_loss_stops_at_that_step_and_keeps_the_last_checkpoint(corpus, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_step

    def diverging(self):
        if self.step == 4:  # after step 4's checkpoint: the weights blow up
            with torch.no_grad():
                next(self.module.parameters()).fill_(float("nan"))
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", diverging)
    trainer = Trainer(small_config(corpus, out, **RUN))
    checkpoints = {}
    real_save = Trainer.save_checkpoint

    def remember(self):
        real_save(self)
        checkpoints[self.step] = digest(out / "checkpoints" / ckpt.step_dir_name(self.step))

    monkeypatch.setattr(Trainer, "save_checkpoint", remember)
    with pytest.raises(NonFiniteError) as exc:
        trainer.run()
    message = str(exc.value)
    assert message.startswith("step 5: non-finite loss nan")
    assert "step_00000004" in message and "\n" not in message
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert digest(out / "checkpoints" / "step_00000004") == checkpoints[4]
    assert all(np.isfinite(w).all()
               for w in weights(out / "checkpoints" / "step_00000004" / "model.safetensors")
               .values())
    assert not (out / "model.safetensors").exists()
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert (last["kind"], last["step"], last["loss"]) == ("stopped", 5, "nan")
    assert not (out / ".lock").exists() and litter(out) == []


def test_nan_weights_are_never_saved(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = Trainer.train_step

    def poisoned_last_step(self):
        metrics = original(self)
        if self.step == 6:  # the optimizer step itself produced NaN weights
            with torch.no_grad():
                next(self.module.parameters())[0, 0] = float("inf")
        return metrics

    monkeypatch.setattr(Trainer, "train_step", poisoned_last_step)
    with pytest.raises(NonFiniteError, match="step 6: the weights hold NaN or Inf"):
        train(small_config(corpus, out, **RUN))
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (out / "model.safetensors").exists()
    assert not (out / "checkpoints" / "step_00000006").exists() and litter(out) == []


# ------------------------------------------------------------------ other processes

HANG_IN_CHECKPOINT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from soma_models.train import checkpoint
    from soma_models.cli import main

    marker, hang_step, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    real_save_file = checkpoint.save_file

    def save_file_then_hang(path, *args, **kwargs):
        real_save_file(path, *args, **kwargs)
        if Path(path).parent.name.startswith(f".step_{hang_step:08d}.{os.getpid()}-"):
            marker.write_text(str(os.getpid()))
            time.sleep(300)  # mid-checkpoint, staging folder half written

    checkpoint.save_file = save_file_then_hang
    sys.exit(main(["train", *argv]))
""")


def cli_args(corpus: Path, out: Path, **overrides) -> list[str]:
    cfg = small_config(corpus, out, **{**RUN, **overrides})
    args = ["--data", str(corpus), "--out", str(out), "--threads", "1",
            "--no-progress", "--no-plot"]
    for name in ("config", "embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim",
                 "seq_len", "batch_size", "steps", "warmup_steps", "eval_every",
                 "checkpoint_every", "keep_checkpoints", "score_seq_len", "score_batch_size",
                 "sig_reg_slices", "lr", "seed"):
        args += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    return args


def start_hanging_run(corpus: Path, out: Path, marker: Path, hang_step: int):
    proc = subprocess.Popen(
        [sys.executable, "-c", HANG_IN_CHECKPOINT, str(marker), str(hang_step),
         *cli_args(corpus, out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the run never reached its checkpoint: {proc.communicate()}")
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killed_during_a_checkpoint(corpus, tmp_path, how):
    out = tmp_path / "run"
    proc = start_hanging_run(corpus, out, tmp_path / "marker", hang_step=4)
    try:
        # While it runs, the folder is its own: a second run is refused, naming its PID.
        with pytest.raises(TrainError) as exc:
            Trainer(small_config(corpus, out, resume=True, **RUN))
        assert f"PID {proc.pid}" in str(exc.value)
        staging = [p for p in (out / "checkpoints").iterdir()
                   if p.name.startswith(f".step_00000004.{proc.pid}-")]
        assert len(staging) == 1 and staging[0].is_dir() and is_temporary(staging[0])
        good = digest(out / "checkpoints" / "step_00000002")
        proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "SIGTERM":
        assert proc.returncode == 143, err
        assert "stopped by SIGTERM" in err and "Traceback" not in err
        assert litter(out) == [] and not (out / ".lock").exists()
    else:
        assert proc.returncode == -signal.SIGKILL
        assert staging[0].is_dir()  # nothing could clean up: the next run does
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert digest(out / "checkpoints" / "step_00000002") == good
    assert not (out / "model.safetensors").exists()

    resumed = train(small_config(corpus, out, resume=True, **RUN))
    assert resumed.step == 6 and litter(out) == []
    full = train(small_config(corpus, tmp_path / "full", **RUN))
    a, b = weights(full.weights), weights(resumed.weights)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ------------------------------------------------------------------ protocol revisions

@pytest.mark.parametrize("protocol, max_seq_len, batch_size, slices", [
    ("0.1.1", 8192, 32, 1024), ("0.1.7", 1024, 16, 256)])
def test_protocol_sets_the_score_and_the_sig_reg_default(corpus, tmp_path, protocol,
                                                         max_seq_len, batch_size, slices):
    from soma_models.v1.configs import SIGRegConfig
    from soma_models.v1.scoring import score

    from .test_trainer import _heldout

    cfg = small_config(corpus, tmp_path / "run", steps=2, eval_every=2, checkpoint_every=2,
                       protocol=protocol, sig_reg_slices=None, score_seq_len=None,
                       score_batch_size=None)
    result = train(cfg)
    assert (result.protocol, result.score_seq_len) == (protocol, max_seq_len)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["protocol"], summary["score_seq_len"], summary["score_batch_size"],
            summary["score_sig_reg_slices"]) == (protocol, max_seq_len, batch_size, slices)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["protocol"] == protocol and run["train_config"]["sig_reg_slices"] == slices
    scored = [r for r in read_metrics(result.metrics) if "score" in r]
    assert scored and all(r["protocol"] == protocol for r in scored)
    # The reported score is the revision's, computed independently by `score`.
    expected = score(str(result.weights), _heldout(cfg), cfg.score_seed,
                     sig_reg_config=SIGRegConfig(slices=slices), max_seq_len=max_seq_len,
                     batch_size=batch_size)
    assert result.score == pytest.approx(float(expected.loss), rel=1e-6, abs=1e-6)


def test_an_unknown_protocol_is_a_settings_error(corpus, tmp_path):
    with pytest.raises(TrainConfigError, match=r"^--protocol: unknown protocol revision '9'"):
        Trainer(small_config(corpus, tmp_path / "run", protocol="9"))
    assert not (tmp_path / "run").exists()


def test_compile_keeps_the_losses_and_logs_its_time(corpus, tmp_path, monkeypatch):
    # --compile: each block torch.compile'd (here with aot_eager, which captures the same
    # graphs without generating code, so the test stays fast; the inductor backend is
    # tested in tests/v1/torch/test_train_step.py). Same losses as eager within float32
    # rounding, and the log says what compiling cost.
    import functools

    from soma_models.v1.torch import train_step as step_lib

    monkeypatch.setattr(step_lib, "prepare_model",
                        functools.partial(step_lib.prepare_model, compile_backend="aot_eager"))
    runs = {}
    for compiled in (False, True):
        cfg = small_config(corpus, tmp_path / str(compiled), steps=3, eval_every=0,
                           checkpoint_every=0, compile=compiled)
        result = train(cfg)
        runs[compiled] = read_metrics(result.metrics)
    losses = {c: [r["loss"] for r in records if r["kind"] == "train"]
              for c, records in runs.items()}
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    (record,) = [r for r in runs[True] if r["kind"] == "compile"]
    assert record["step"] == 2 and record["first_step_s"] > 0
    assert record["compile_s"] == pytest.approx(record["first_step_s"] - record["second_step_s"],
                                                abs=2e-3)
    assert not [r for r in runs[False] if r["kind"] == "compile"]
