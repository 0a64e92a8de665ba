"""Multi-process data parallelism on CPU (gloo): 2 processes under torchrun reach the same
weights as 1 process with the same global batch, for DDP and for FSDP2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from soma_models.safetensors_io import SafetensorsFile
from soma_models.train.trainer import train

from .conftest import SMALL_SIZES, small_config

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _weights(path):
    file = SafetensorsFile(path)
    return {k: np.array(file.array(k)) for k in file.tensors}


def _cli_args(cfg) -> list[str]:
    args = ["--data", *cfg.data, "--out", cfg.out_dir, "--no-progress", "--no-plot"]
    for name in ("seq_len", "batch_size", "micro_batch_size", "steps", "warmup_steps",
                 "eval_every", "checkpoint_every", "score_seq_len", "score_batch_size",
                 "sig_reg_slices", "lr", "dropout", *SMALL_SIZES):
        args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    return args


def _one_process_run(tmp_path_factory, name: str, dropout: float):
    """(config, final weights) of the runs' reference: global batch 4 as 4 accumulated
    micro-batches of 1 in one process."""
    from .conftest import write_corpus

    root = tmp_path_factory.mktemp(name)
    corpus = write_corpus(root / "corpus")
    cfg = small_config(corpus, root / "single", steps=4, micro_batch_size=1, dropout=dropout,
                       eval_every=4, checkpoint_every=4)
    return cfg, _weights(train(cfg).weights)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _one_process_run(tmp_path_factory, "dist", dropout=0.1)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(reference, parallel, tmp_path):
    cfg, single = reference
    out = tmp_path / parallel
    args = _cli_args(cfg)
    args[args.index("--out") + 1] = str(out)
    # Same global batch: 2 processes x 2 accumulated micro-batches of 1.
    command = [TORCHRUN, "--nproc_per_node", "2", "--standalone", "-m", "soma_models.train",
               *args, "--parallel", parallel]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    multi = _weights(out / "model.safetensors")
    assert multi.keys() == single.keys()
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], rtol=0, atol=1e-5, err_msg=key)
    assert (out / "checkpoints" / "latest.json").is_file()


def _interrupted_and_resumed(cfg, tmp_path, parallel: str, data=None):
    """Run 2 processes under torchrun to a checkpoint at step 2 (folder `first`), then
    resume from that checkpoint in folder `second`; returns both run folders."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first, second = tmp_path / "first", tmp_path / "second"
    for out, extra in ((first, ["--checkpoint-every", "2", "--keep-checkpoints", "3"]),
                       (second, ["--resume"])):
        if out is second:
            shutil.copytree(first / "checkpoints" / "step_00000002",
                            second / "checkpoints" / "step_00000002")
        args = _cli_args(cfg)
        args[args.index("--out") + 1] = str(out)
        if data is not None:
            args[args.index("--data") + 1] = str(data)
        command = [TORCHRUN, "--nproc_per_node", "2", "--standalone", "-m",
                   "soma_models.train", *args, *extra, "--parallel", parallel]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    return first, second


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_resumed_two_process_run_matches_one(reference, parallel, tmp_path):
    """Interrupt a 2-process run after step 2 and resume it: same weights as one process."""
    cfg, single = reference
    _, second = _interrupted_and_resumed(cfg, tmp_path, parallel)
    resumed = _weights(second / "model.safetensors")
    for key in single:
        np.testing.assert_allclose(resumed[key], single[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_on_a_prepared_corpus_resume_to_one_process_weights(reference,
                                                                           tmp_path):
    """`--data CORPUS/` (memory-mapped shards) under DDP with 2 processes, interrupted after
    step 2 and resumed: the same weights as one process on the raw files, so the two
    processes read disjoint shares that together are the one process's rows, and the
    resumed run continued from the exact data position."""
    from soma_models.corpus import prepare

    cfg, single = reference
    corpus = tmp_path / "corpus"
    prepare(cfg.data, corpus, shard_bytes=300, workers=1)  # several shards
    first, second = _interrupted_and_resumed(cfg, tmp_path, "ddp", data=corpus)
    for out in (first, second):
        weights = _weights(out / "model.safetensors")
        for key in single:
            np.testing.assert_allclose(weights[key], single[key], rtol=0, atol=1e-5,
                                       err_msg=f"{out.name}: {key}")


@pytest.fixture(scope="module")
def reference_without_dropout(tmp_path_factory):
    return _one_process_run(tmp_path_factory, "dist-eager", dropout=0.0)


@pytest.mark.slow  # each process compiles the blocks with inductor (~30 s on 2 cores)
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_compiled_processes_match_one(reference_without_dropout, parallel, tmp_path):
    """--compile under DDP and FSDP2: the same weights as the eager single process, up to
    float rounding. Without dropout: compiled blocks draw their dropout masks from the
    compiler's own generator (seeded from torch's, so still a function of the seed, but
    other masks than eager blocks draw)."""
    cfg, single = reference_without_dropout
    out = tmp_path / parallel
    args = _cli_args(cfg)
    args[args.index("--out") + 1] = str(out)
    command = [TORCHRUN, "--nproc_per_node", "2", "--standalone", "-m", "soma_models.train",
               *args, "--parallel", parallel, "--compile"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch.compile: the first step took" in done.stderr
    multi = _weights(out / "model.safetensors")
    for key in single:
        np.testing.assert_allclose(multi[key], single[key], rtol=0, atol=1e-5, err_msg=key)
