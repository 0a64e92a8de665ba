"""`soma-models train --framework flax`: the Flax engine through the trainer's components."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from soma_models.safetensors_io import SafetensorsFile  # noqa: E402
from soma_models.train.errors import TrainConfigError  # noqa: E402
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
