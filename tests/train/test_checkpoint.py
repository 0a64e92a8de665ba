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
