import json

import numpy as np
import pytest

from soma_models.train import checkpoint as ckpt


def writer(path):
    path.write_bytes(b"weights")


def save(root, step, keep=2, model_writer=writer):
    return ckpt.save_checkpoint(root, step, model_writer=model_writer,
                                tensors={"optimizer.w.exp_avg": np.arange(3, dtype=np.float32)},
                                state={"step": step}, keep_last=keep)


def test_save_read_and_prune(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000002",
                                                         "step_00000003"]
    folder = ckpt.find_checkpoint(tmp_path)
    assert folder.name == "step_00000003"
    state, tensors = ckpt.read_checkpoint(folder)
    assert state["step"] == 3
    np.testing.assert_array_equal(tensors["optimizer.w.exp_avg"], np.arange(3))


def test_a_failed_save_keeps_the_last_good_checkpoint(tmp_path):
    save(tmp_path, 1)

    def crash(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 2, model_writer=crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000001"]
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 1


def test_without_latest_the_newest_complete_checkpoint_is_used(tmp_path):
    save(tmp_path, 1, keep=5)
    save(tmp_path, 2, keep=5)
    (tmp_path / "latest.json").unlink()
    (tmp_path / "step_00000002" / ckpt.STATE_FILE).unlink()   # incomplete
    assert ckpt.find_checkpoint(tmp_path).name == "step_00000001"


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no such checkpoint"):
        ckpt.find_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
        ckpt.find_checkpoint(tmp_path / "empty")


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_dead_writers_is_removed_and_live_ones_kept(tmp_path):
    import os

    save(tmp_path, 1)
    dead, live = _dead_pid(), os.getppid()  # our parent is alive and is not us
    (tmp_path / f".step_00000002.{dead}-ab12.soma-tmp").mkdir()
    (tmp_path / f".step_00000002.{dead}-ab12.soma-tmp" / ckpt.MODEL_FILE).write_bytes(b"half")
    (tmp_path / f".latest.json.{dead}-cd34.soma-tmp").write_bytes(b"{")
    (tmp_path / f".step_00000003.{live}-ef56.soma-tmp").mkdir()
    (tmp_path / ".unrelated.tmp-1").mkdir()             # not the temporaries' pattern
    save(tmp_path, 4)                                    # a writer cleans as it goes
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f".step_00000003.{live}-ef56.soma-tmp", ".unrelated.tmp-1",
                     "latest.json", "step_00000001", "step_00000004"]
    assert ckpt.find_checkpoint(tmp_path).name == "step_00000004"


def test_an_interrupted_save_leaves_no_litter_and_the_last_checkpoint(tmp_path):
    save(tmp_path, 1)

    def interrupted(path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model_writer=interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 1, model_writer=interrupted)  # a rewrite of the same step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000001"]
    assert (tmp_path / "step_00000001" / ckpt.MODEL_FILE).read_bytes() == b"weights"


def test_rng_capture_and_restore_round_trip(tmp_path):
    import random

    import torch

    torch.manual_seed(7)
    np.random.seed(8)
    random.seed(9)
    tensors, state = ckpt.capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    # Through a real checkpoint: tensors to safetensors, state to JSON.
    ckpt.save_checkpoint(tmp_path, 1, model_writer=writer, tensors=tensors,
                         state={"rng": state})
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    saved_state, saved_tensors = ckpt.read_checkpoint(ckpt.find_checkpoint(tmp_path))
    ckpt.restore_rng(saved_tensors, saved_state["rng"])
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]
