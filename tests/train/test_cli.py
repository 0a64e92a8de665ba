"""`soma-models train` on bad input: exactly one clear stderr line, exit status 2 for a bad
option (before any work starts) and 1 for a problem found while working."""

from __future__ import annotations

import json

import pytest
import torch

from soma_models.cli import main

SMALL = ["--config", "tiny", "--embedding-dim", "32", "--num-layers", "1", "--num-heads", "2",
         "--pwff-hidden-dim", "64", "--seq-len", "32", "--batch-size", "4", "--steps", "2",
         "--sig-reg-slices", "16", "--score-seq-len", "64", "--eval-every", "2",
         "--checkpoint-every", "2", "--no-progress", "--no-plot"]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main(["train", *map(str, args)])
    except SystemExit as exc:  # argparse: a usage error
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(("soma-models: error: ", "soma-models train: error: ")), lines[0]
    return lines[0]


def test_cli_trains_and_reports_where_things_are(capsys, corpus, tmp_path):
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "run", *SMALL)
    assert code == 0, err
    assert "held-out cross-entropy" in out and "exact on-chain score" in out
    assert str(tmp_path / "run" / "model.safetensors") in out


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--data", tmp_path / "nope", "--out", tmp_path / "r", *SMALL)
    assert code == 2
    assert f"{tmp_path / 'nope'}: no such file or folder" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "empty.txt").write_bytes(b"")
    code, _, err = run_cli(capsys, "--data", tmp_path / "c", "--out", tmp_path / "r", *SMALL)
    assert code == 1
    assert "no data (found 1 file(s), all empty)" in one_error_line(err)


def test_no_data_argument(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--out", tmp_path / "r", *SMALL)
    assert code == 2
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


NO_CUDA = "this torch build has no CUDA" if torch.version.cuda is None else \
    "no CUDA device is visible"


@pytest.mark.parametrize("args, expected", [
    (["--device", "bogus"], "argument --device: unknown device 'bogus'; use cpu, cuda"),
    pytest.param(["--device", "cuda"], f"argument --device: 'cuda': {NO_CUDA}",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    (["--threads=-1"], "argument --threads: expected a positive integer, got '-1'"),
    (["--threads", "two"], "argument --threads: expected a positive integer, got 'two'"),
    (["--seq-len", "1"], "argument --seq-len: must be an integer >= 2, got 1"),
    (["--final-seq-len", "0"], "argument --final-seq-len: must be an integer >= 2, got 0"),
    (["--micro-batch-size", "0"], "argument --micro-batch-size: expected a positive integer"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0.0"),
    (["--weight-decay=-inf"], "argument --weight-decay: must be a finite number >= 0"),
    (["--min-lr-ratio", "1.5"], "argument --min-lr-ratio: must be a finite number >= 0 and"),
    (["--grad-clip", "nan"], "argument --grad-clip: must be a finite number >= 0, got nan"),
    (["--dropout", "1"], "argument --dropout: must be a finite number >= 0 and < 1"),
    (["--val-fraction", "0"], "argument --val-fraction: must be a finite number > 0 and < 1"),
    (["--sig-reg-coefficient", "inf"], "argument --sig-reg-coefficient: must be a finite"),
    (["--max-minutes=-1"], "argument --max-minutes: must be a finite number > 0"),
    (["--seed=-1"], "argument --seed: seed must be in [0, 2**64 - 1] (a u64), got -1"),
    (["--score-seed", str(2**64)], "argument --score-seed: seed must be in [0, 2**64 - 1]"),
    (["--protocol", "0.2"],
     "argument --protocol: unknown protocol revision '0.2'; known: 0.1.1, 0.1.7, latest"),
    (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
    (["--micro-batch-size", "3"], "batch size 4 is not a multiple of micro-batch size 3"),
])
def test_bad_options_are_one_line_and_exit_2_before_any_work(capsys, corpus, tmp_path, args,
                                                            expected):
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "r", *SMALL, *args)
    assert code == 2, err
    assert expected in one_error_line(err)
    assert "Traceback" not in err and "usage:" not in err + out
    assert not (tmp_path / "r").exists()


def test_paths_that_are_folders_or_missing(capsys, corpus, tmp_path):
    (tmp_path / "a-file").write_text("x")
    cases = [(["--init-from", tmp_path], f"{tmp_path}: is a directory, expected a file"),
             (["--init-from", tmp_path / "none.safetensors"], "none.safetensors: no such file"),
             (["--out", tmp_path / "a-file"], f"{tmp_path / 'a-file'}: exists and is not a folder")]
    for args, expected in cases:
        code, _, err = run_cli(capsys, "--data", corpus, *SMALL, *args)
        assert code == 2 and expected in one_error_line(err), err


def test_an_occupied_out_is_one_line_and_names_the_way_out(capsys, trained):
    corpus, out, _ = trained
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL)
    assert code == 1
    line = one_error_line(err)
    assert f"--out {out} already holds a run" in line
    assert "--resume" in line and "--overwrite" in line
    assert (out / "model.safetensors").read_bytes() == before
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--overwrite")
    assert code == 0, err


def test_resume_with_another_seed_is_one_line(capsys, trained):
    corpus, out, _ = trained
    code, _, err = run_cli(capsys, "--data", corpus, "--out", out, *SMALL, "--resume",
                           "--seed", 5)
    assert code == 1
    assert "--seed 5 (checkpoint: 0)" in one_error_line(err)


def test_summary_names_the_protocol_revision(capsys, corpus, tmp_path):
    args = [a for a in SMALL]
    at = args.index("--score-seq-len")
    del args[at:at + 2]  # the revision's max_seq_len
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "run", *args,
                             "--protocol", "0.1.7")
    assert code == 0, err
    first, *_ = out.splitlines()
    assert first.startswith("protocol revision 0.1.7, the network since 2026-02-23")
    assert "max_seq_len 1024, batch 16, 256 SIGReg slices" in first
    assert "exact on-chain score under protocol revision 0.1.7 (seed 0, max_seq_len 1024, " \
           "batch 16, 256 SIGReg slices)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["protocol"] == "0.1.7"


@pytest.mark.parametrize("protocol, final_seq_len", [("0.1.7", 1024), ("0.1.1", 2048)])
def test_demo_follows_the_revision_and_never_replaces_an_earlier_demo(tmp_path, monkeypatch,
                                                                      protocol, final_seq_len):
    import argparse

    from soma_models.train.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_args(parser.parse_args(["--demo", "--protocol", protocol]))
    assert cfg.final_seq_len == final_seq_len and cfg.out_dir == "runs/demo"
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "run.json").write_text("{}")
    cfg = config_from_args(parser.parse_args(["--demo", "--protocol", protocol]))
    assert cfg.out_dir == "runs/demo-2"
    cfg = config_from_args(parser.parse_args(["--demo", "--resume"]))
    assert cfg.out_dir == "runs/demo"


def test_the_demo_banner_names_the_revision(monkeypatch):
    from soma_models.train.cli import revision_of

    assert revision_of(["--steps", "3", "--protocol", "0.1.1"]).startswith("0.1.1, the product")
    assert revision_of(["--protocol=latest"]).startswith("0.1.7, the network")
    with pytest.raises(SystemExit) as exc:
        revision_of(["--protocol", "x"])
    assert exc.value.code == 2


def test_compile_is_refused_in_one_line_where_it_cannot_work(capsys, corpus, tmp_path,
                                                             monkeypatch):
    from soma_models.v1.torch import train_step as step_lib

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(step_lib.shutil, "which", lambda name: None)   # no C++ compiler
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "r", *SMALL,
                             "--device", "cpu", "--compile")
    assert code == 2, err
    assert ("--compile: torch.compile on the CPU needs a C++ compiler ($CXX, g++ or clang++)"
            in one_error_line(err))


def test_speed_options_are_train_options(capsys, corpus, tmp_path):
    code, out, err = run_cli(capsys, "--data", corpus, "--out", tmp_path / "r", *SMALL,
                             "--activation-checkpointing")
    assert code == 0, err
    config = json.loads((tmp_path / "r" / "run.json").read_text())["train_config"]
    assert config["activation_checkpointing"] is True and config["compile"] is False
