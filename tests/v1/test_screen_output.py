"""Screening's output file in shares: the launcher's environment, part files, the merge,
and `torchrun --nproc-per-node 2 -m soma_models screen` (gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.v1.test_scoring import data_of, random_weights

from soma_models.cli import main
from soma_models.safetensors_io import save_file
from soma_models.v1.configs import ModelConfig
from soma_models.v1.schema import file_metadata
from soma_models.v1.screen_output import Share, existing_parts, merge_parts, part_path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)


def test_share_from_the_launchers_environment():
    assert Share.from_env({}) == Share(0, 1, 0)
    share = Share.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert share == Share(3, 4, 1)
    assert share.device("cuda") == "cuda:1" and share.device("cpu") == "cpu"
    assert Share().device("cuda") == "cuda"
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE='two' is not an "
                                         "integer"):
        Share.from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE"):
        Share.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    todo = [f"s{i}" for i in range(7)]
    shares = [Share(r, 3).take(todo) for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(todo) and shares[1] == ["s1", "s4"]


def line(sample: str, run: str = "r") -> str:
    return json.dumps({"sample": sample, "run": run}) + "\n"


def test_merge_orders_deduplicates_and_removes_the_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(line("b") + line("x"))
    part_path(out, 0).write_text(line("c") + line("b"))
    part_path(out, 11).write_text(line("a") + '{"sample": "d", "ru')   # interrupted write
    (tmp_path / "out.jsonl.rankings").write_text("not a part")
    assert [p.name for p in existing_parts(out)] == ["out.jsonl.rank0", "out.jsonl.rank11"]
    assert merge_parts(out, ["a", "b", "c", "d"], run="r") == 4
    # Input order, then what is not in it (x); d was never whole; b once, out's line first.
    assert out.read_text() == line("a") + line("b") + line("c") + line("x")
    assert existing_parts(out) == [] and (tmp_path / "out.jsonl.rankings").exists()
    part_path(out, 1).write_text(line("e", run="other"))
    with pytest.raises(ValueError, match=r"out.jsonl.rank1:1: written by another screening"):
        merge_parts(out, ["e"], run="r")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shares")
    for i, seed in enumerate((21, 22)):
        save_file(folder / f"m{i}.safetensors", random_weights(CONFIG, seed),
                  file_metadata(CONFIG))
    (folder / "samples").mkdir()
    for i in range(9):
        (folder / "samples" / f"s{i}.bin").write_bytes(data_of(1 + 37 * i, seed=i))
    np.save(folder / "targets.npy",
            np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32))
    return folder


def screen_args(folder, out):
    return ["screen", "--models", str(folder / "m0.safetensors"), str(folder / "m1.safetensors"),
            "--targets", str(folder / "targets.npy"), "--data", str(folder / "samples"),
            "--threshold", "0.5", "--micro-batch-size", "1", "--quiet", "--out", str(out)]


def test_torchrun_two_ranks_resume_after_three_equals_one_process(files, tmp_path, capsys):
    single = tmp_path / "single.jsonl"
    assert main(screen_args(files, single)) == 0
    capsys.readouterr()
    lines = single.read_text().splitlines(keepends=True)
    assert len(lines) == 9
    # An earlier run on 3 ranks, interrupted: some lines in --out, some in parts (one of
    # them cut mid-line), in no particular order.
    out = tmp_path / "sharded.jsonl"
    out.write_text(lines[4])
    part_path(out, 0).write_text(lines[6] + lines[0])
    part_path(out, 2).write_text(lines[8] + lines[2][:20])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "soma_models", *screen_args(files, out)],
        capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == "".join(lines)
    assert existing_parts(out) == []
    summaries = [s for s in result.stderr.splitlines() if s.startswith("screened ")]
    hits = sum(json.loads(x)["hit"] for i, x in enumerate(lines) if i in (1, 2, 3, 5, 7))
    assert summaries == [summaries[0]] and summaries[0].startswith(
        f"screened 5 samples (4 already done) on 2 ranks, {hits} hits, ")
