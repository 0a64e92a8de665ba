"""`soma-models train` on bad input: exit status 1 and exactly one clear stderr line."""

from __future__ import annotations

import json

import pytest

from soma_models.cli import main

SMALL = ["--config", "tiny", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "2",
         "--pwff-hidden-dim", "64", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
         "--sig-reg-slices", "16", "--score-seq-len", "64", "--eval-every", "2",
         "--checkpoint-every", "2", "--no-progress", "--no-plot"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["train", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("soma-models: error: "), lines[0]
    return lines[0]


def test_cli_trains_and_reports_where_things_are(capsys, corpus, tmp_path):
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "run", *SMALL)
    assert code == 0, err
    assert "held-out cross-entropy" in out and "exact on-chain score" in out
    assert str(tmp_path / "run" / "model.safetensors") in out


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--data", tmp_path / "nope", "--out", tmp_path / "r", *SMALL)
    assert code == 1
    assert f"{tmp_path / 'nope'}: no such file or folder" in one_error_line(err)


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_bytes(b"")
    code, _, err = run_cli(capsys, "--data", tmp_path / "c", "--out", tmp_path / "r", *SMALL)
    assert code == 1
    assert "no data (found 1 file(s), all empty)" in one_error_line(err)


def test_no_data_argument(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--out", tmp_path / "r", *SMALL)
    assert code == 1
    assert "no training data" in one_error_line(err)


@pytest.fixture
def trained(capsys, corpus, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL)
    assert code == 0, err
    return corpus, out, out / "checkpoints" / "step_00000002"


def test_unreadable_checkpoint_state(capsys, trained):
    corpus, out, folder = trained
    (folder / "trainer_state.json").write_text("{not json")
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--steps", 4,
                           "--resume")
    assert code == 1
    line = one_error_line(err)
    assert "trainer_state.json: unreadable" in line


def test_truncated_checkpoint_tensors(capsys, trained):
    corpus, out, folder = trained
    data = (folder / "state.safetensors").read_bytes()
    (folder / "state.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--steps", 4,
                           "--resume")
    assert code == 1
    assert "state.safetensors" in one_error_line(err)


def test_config_mismatch_on_resume(capsys, trained):
    corpus, out, _ = trained
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--steps", 4,
                           "--embedding-dim", 48, "--resume")
    assert code == 1
    line = one_error_line(err)
    assert "model config does not match the checkpoint" in line
    assert "embedding_dim: checkpoint 32 vs requested 48" in line


def test_latest_pointer_to_missing_checkpoint(capsys, trained):
    corpus, out, _ = trained
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"checkpoint": "step_9"}))
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--resume")
    assert code == 1
    assert "which is not a checkpoint" in one_error_line(err)
