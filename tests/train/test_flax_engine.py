"""`soma-models train --framework flax`: the Flax engine through the trainer's components."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from soma_models.safetensors_io import SafetensorsFile  # noqa: E402
from soma_models.train.errors import TrainConfigError, TrainError  # noqa: E402
from soma_models.train.metrics import read_metrics  # noqa: E402
from soma_models.train.trainer import Trainer, train  # noqa: E402
from soma_models.v1.scoring import score  # noqa: E402

from .conftest import small_config  # noqa: E402


def flax_config(corpus, out, **overrides):
    return small_config(corpus, out, framework="flax", **overrides)


def load_file(path):
    file = SafetensorsFile(path)
    return {k: np.array(file.array(k)) for k in file.tensors}


def _heldout(cfg):
    from soma_models.train.data import join_documents, read_documents, split_documents

    return join_documents(split_documents(read_documents(cfg.data), cfg.val_fraction,
                                          cfg.split)[1])


def test_a_flax_run_trains_and_its_weights_score_the_same_under_torch(corpus, tmp_path):
    cfg = flax_config(corpus, tmp_path / "run", steps=6, eval_every=3, checkpoint_every=3)
    result = train(cfg)
    records = read_metrics(result.metrics)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert (tmp_path / "run" / "checkpoints" / "step_00000006" / "model.safetensors").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # The run's exact score (Flax backend) is what torch scores the saved weights at.
    data = _heldout(cfg)
    under_torch = score(result.weights, data, cfg.score_seed, framework="torch",
                        max_seq_len=64, batch_size=4).loss
    under_flax = score(result.weights, data, cfg.score_seed, framework="flax",
                       max_seq_len=64, batch_size=4).loss
    assert summary["score"] == pytest.approx(under_flax, rel=1e-6)
    assert under_torch == pytest.approx(under_flax, rel=1e-5)


def test_flax_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(corpus,
                                                                                tmp_path):
    # Dropout on (its streams are checkpointed), accumulation 2, and a curriculum whose
    # switch lies in the resumed part.
    common = dict(steps=6, checkpoint_every=3, keep_checkpoints=3, dropout=0.1,
                  micro_batch_size=2, eval_every=0, final_seq_len=64, final_steps=2)
    full = train(flax_config(corpus, tmp_path / "full", **common))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000003",
                    tmp_path / "resumed" / "checkpoints" / "step_00000003")
    resumed = train(flax_config(corpus, tmp_path / "resumed", resume=True, **common))
    assert resumed.step == 6

    def train_losses(path):
        return {r["step"]: r["loss"] for r in read_metrics(path) if r["kind"] == "train"}

    full_losses, resumed_losses = train_losses(full.metrics), train_losses(resumed.metrics)
    assert sorted(resumed_losses) == [4, 5, 6]
    assert [resumed_losses[s] for s in (4, 5, 6)] == [full_losses[s] for s in (4, 5, 6)]
    a, b = load_file(full.weights), load_file(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_flax_bf16_steps_follow_the_float32_steps(corpus, tmp_path):
    kwargs = dict(steps=2, eval_every=0, checkpoint_every=0)
    f32 = Trainer(flax_config(corpus, tmp_path / "f32", **kwargs))
    b16 = Trainer(flax_config(corpus, tmp_path / "b16", bf16=True, **kwargs))
    for _ in range(2):
        a, b = f32.train_step(), b16.train_step()
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)   # bf16 rounding, not more
    f32.close()
    b16.close()


def test_a_torch_checkpoint_is_not_resumed_by_flax(corpus, tmp_path):
    train(small_config(corpus, tmp_path / "run", steps=2, checkpoint_every=2, eval_every=2))
    trainer = Trainer(flax_config(corpus, tmp_path / "run", steps=2, resume=True))
    with pytest.raises(Exception, match="--framework 'flax' \\(checkpoint: 'torch'\\)"):
        trainer.run()


@pytest.mark.parametrize("field, value", [
    ("sig_reg_positions", 8), ("parallel", "ddp"), ("threads", 1),
    ("compile", True),
])
def test_torch_only_options_are_refused_in_one_line(corpus, tmp_path, field, value):
    option = "--" + field.replace("_", "-")
    with pytest.raises(TrainConfigError, match=f"^{option} is torch-only; --framework flax "
                                               "cannot honour it") as caught:
        Trainer(flax_config(corpus, tmp_path / "run", **{field: value}))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


# --- several devices and several JAX processes --------------------------------------

RUN = textwrap.dedent("""
    import json, sys
    import jax
    from soma_models.train.trainer import TrainConfig, train

    result = train(TrainConfig(**json.loads(sys.argv[1])))
    print(json.dumps({"process": jax.process_index(), "devices": len(jax.devices()),
                      "step": result.step}))
""")


def _launch(cfg, processes=1, devices=1, port=None):
    """`train(cfg)` in fresh JAX processes (each with `devices` CPU devices); returns them."""
    from dataclasses import asdict

    base = {k: v for k, v in os.environ.items()
            if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "XLA_FLAGS")}
    base.update(JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    args = [sys.executable, "-c", RUN, json.dumps(asdict(cfg))]
    if processes == 1:
        return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=base)]
    return [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**base, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                  "JAX_NUM_PROCESSES": str(processes),
                                  "JAX_PROCESS_ID": str(rank)})
            for rank in range(processes)]


def _finish(workers):
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    return outputs


def _records(run):
    return {(r["kind"], r["step"]): r for r in read_metrics(run / "metrics.jsonl")}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_devices_and_two_processes_train_as_one_device(corpus, tmp_path):
    """The same run (dropout, accumulation, a curriculum whose one-row micro-batches
    cannot split over the mesh, evaluation, checkpoints, the exact score) on one CPU
    device, on two devices of one process, and on two JAX processes joined from the
    environment (process 0 writes): the same metrics and weights within float32 rounding.
    The two-device run resumes from the one-device run's step-3 checkpoint."""
    common = dict(steps=5, checkpoint_every=3, eval_every=3, dropout=0.1, micro_batch_size=2,
                  final_seq_len=64, final_steps=2)
    one = flax_config(corpus, tmp_path / "one", **common)
    _finish(_launch(one))
    shutil.copytree(tmp_path / "one" / "checkpoints" / "step_00000003",
                    tmp_path / "two_devices" / "checkpoints" / "step_00000003")
    workers = _launch(flax_config(corpus, tmp_path / "two_devices", resume=True, **common),
                      devices=2)
    workers += _launch(flax_config(corpus, tmp_path / "two_processes", **common),
                       processes=2, port=_free_port())
    reports = _finish(workers)
    assert [(r["process"], r["devices"], r["step"]) for r in reports] == [
        (0, 2, 5), (0, 2, 5), (1, 2, 5)]

    expected, weights = _records(tmp_path / "one"), load_file(tmp_path / "one" /
                                                               "model.safetensors")
    assert expected[("eval", 5)]["score"] > 0
    for run in ("two_devices", "two_processes"):
        records = _records(tmp_path / run)
        steps = [key for key in expected if run == "two_processes" or key[1] > 3]
        assert set(steps) <= set(records), run
        for key in steps:
            for field in ("loss", "train_ce", "grad_norm", "val_ce", "score"):
                if field in expected[key]:
                    assert records[key][field] == pytest.approx(expected[key][field],
                                                                rel=2e-6), (run, key, field)
        got = load_file(tmp_path / run / "model.safetensors")
        for key in weights:
            np.testing.assert_allclose(got[key], weights[key], rtol=0, atol=5e-6,
                                       err_msg=f"{run} {key}")
    assert sorted(p.name for p in (tmp_path / "two_processes" / "checkpoints").iterdir()
                  if p.is_dir()) == ["step_00000003", "step_00000005"]


def test_a_micro_batch_the_mesh_cannot_split_is_refused_in_one_line(corpus, tmp_path):
    from soma_models.train.flax_engine import FlaxEngine

    engine = FlaxEngine()
    engine.mesh_size = 4  # as on a mesh of four devices
    cfg = flax_config(corpus, tmp_path / "run", micro_batch_size=2)
    with pytest.raises(TrainError, match="^--micro-batch-size 2: the rows of a micro-batch "
                                         "are split over the mesh's 4 devices; give a "
                                         "multiple of 4$"):
        engine.build(cfg, cfg.model_config())
