import json
import shutil

import numpy as np
import pytest
import torch

from soma_models.safetensors_io import SafetensorsFile
from soma_models.train.metrics import read_metrics
from soma_models.train.trainer import Trainer, train
from soma_models.v1.scoring import score
from soma_models.v1.torch.modules import Model

from .conftest import small_config


def weights(path):
    file = SafetensorsFile(path)
    return {k: np.array(file.array(k)) for k in file.tensors}


def test_smoke_run_writes_weights_metrics_checkpoints_and_learns(corpus, tmp_path):
    cfg = small_config(corpus, tmp_path / "run", steps=12, eval_every=6, plot=True)
    result = train(cfg)
    assert result.step == 12
    records = read_metrics(result.metrics)
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert [r["step"] for r in evals] == [6, 12]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in train_records)
    # An untrained byte model sits near ln(264); twelve steps already move well below it.
    assert evals[-1]["val_ce"] < np.log(264) - 0.5
    # The final weights are canonical: Model.load and score read them as they are.
    model = Model.load(result.weights)
    assert model.config.to_dict() == cfg.model_config().to_dict()
    chain = score(str(result.weights), _heldout(cfg), cfg.score_seed,
                  max_seq_len=cfg.score_seq_len, batch_size=cfg.score_batch_size)
    assert result.score == pytest.approx(float(chain.loss), rel=1e-6, abs=1e-6)
    assert result.plot is not None and result.plot.stat().st_size > 1000
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 12


def _heldout(cfg):
    from soma_models.train.data import join_documents, read_documents, split_documents

    return join_documents(split_documents(read_documents(cfg.data), cfg.val_fraction,
                                          cfg.split)[1])


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(corpus, tmp_path):
    # Dropout on, so that the RNG handling is exercised; accumulation 2, shuffling on.
    # The last 3 steps use 64-byte sequences (curriculum), so the resumed part crosses
    # the switch.
    common = dict(steps=8, checkpoint_every=4, keep_checkpoints=3, dropout=0.1,
                  micro_batch_size=2, eval_every=4, final_seq_len=64, final_steps=3)
    full = train(small_config(corpus, tmp_path / "full", **common))
    # "Interrupted" run: a fresh out dir holding only the step-4 checkpoint.
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000004",
                    tmp_path / "resumed" / "checkpoints" / "step_00000004")
    torch.manual_seed(12345)  # whatever the process RNG was doing must not matter
    resumed = train(small_config(corpus, tmp_path / "resumed", resume=True, **common))
    assert resumed.step == 8
    a, b = weights(full.weights), weights(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    records = [r for r in read_metrics(resumed.metrics) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    assert [r["seq_len"] for r in records] == [32, 64, 64, 64]
    assert records[-1]["tokens"] == 8 * 4 * 32  # the curriculum keeps tokens per step

    # A checkpoint written before streams had a state recorded each phase's position
    # alone (an integer): it resumes to the same weights.
    old = tmp_path / "old_format" / "checkpoints" / "step_00000004"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_00000004", old)
    state = json.loads((old / "trainer_state.json").read_text())
    state["data_position"] = [phase["position"] for phase in state["data_position"]]
    (old / "trainer_state.json").write_text(json.dumps(state))
    from_old = train(small_config(corpus, tmp_path / "old_format", resume=True, **common))
    c = weights(from_old.weights)
    for key in a:
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)


def test_gradient_accumulation_matches_one_large_batch(corpus, tmp_path):
    """Four accumulated micro-batches of one sequence equal one batch of four: each
    micro-batch's loss has the same denominator, so the mean of their gradients is the
    big batch's gradient, up to float summation order (what multi-process training
    relies on). SIGReg off: its noise is drawn per micro-batch by design."""
    kwargs = dict(sig_reg_coefficient=0.0, steps=3)
    one = Trainer(small_config(corpus, tmp_path / "a", micro_batch_size=4, **kwargs))
    four = Trainer(small_config(corpus, tmp_path / "b", micro_batch_size=1, **kwargs))
    assert (one.accumulation, four.accumulation) == (1, 4)
    for _ in range(3):
        a, b = one.train_step(), four.train_step()
        assert a["train_ce"] == pytest.approx(b["train_ce"], rel=1e-5)
    for (name, p), q in zip(one.module.model.named_parameters(),
                            four.module.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5, msg=name)


def test_the_trainers_step_is_the_librarys(corpus, tmp_path):
    # One micro-batch: the trainer's logged loss is `compute_loss` on the same rows with
    # the same SIGReg noise, and its update is `train_step`'s with the same optimizer.
    from soma_models.train.schedule import micro_seed as _micro_seed
    from soma_models.v1.configs import SIGRegConfig
    from soma_models.v1.torch.loss import compute_loss
    from soma_models.v1.torch.modules import SIGReg
    from soma_models.v1.torch.train_step import make_optimizer, train_step

    cfg = small_config(corpus, tmp_path / "run", batch_size=2, micro_batch_size=2,
                       warmup_steps=0, grad_clip=1.0, shuffle=False)
    trainer = Trainer(cfg)
    model = trainer.module.model
    reference = Model(model.config)
    reference.load_state_dict(model.state_dict())
    batch = trainer.train_table.rows(np.arange(2))
    noise = torch.randn(cfg.embedding_dim, cfg.sig_reg_slices,
                        generator=torch.Generator().manual_seed(_micro_seed(cfg.seed, 0, 0, 1)))
    sig_reg = SIGReg(SIGRegConfig(slices=cfg.sig_reg_slices))
    expected_loss, _ = compute_loss(reference, sig_reg, batch.token_ids, batch.targets,
                                    batch.pos_ids, noise)
    optimizer = make_optimizer(reference, lr=trainer.optimizer.param_groups[0]["lr"],
                               weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    record = trainer.train_step()
    assert record["loss"] == pytest.approx(float(expected_loss.detach()), rel=1e-6)
    for group in optimizer.param_groups:
        group["lr"] = record["lr"]
    result = train_step(reference, sig_reg, optimizer, batch, noise=noise, max_grad_norm=1.0)
    assert result.loss == pytest.approx(record["loss"], rel=1e-6)
    assert result.grad_norm == pytest.approx(record["grad_norm"], rel=1e-5)
    for (name, got), want in zip(model.state_dict().items(),
                                 reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_speed_options_come_from_prepare_model_and_keep_the_step(corpus, tmp_path):
    plain = Trainer(small_config(corpus, tmp_path / "a"))
    checkpointed = Trainer(small_config(corpus, tmp_path / "b", activation_checkpointing=True))
    assert checkpointed.module.model.encoder.activation_checkpointing
    a, b = plain.train_step(), checkpointed.train_step()
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_init_from_starts_from_those_weights(corpus, tmp_path):
    source = Model(small_config(corpus, tmp_path / "x").model_config())
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(0.5).add_(0.25)  # not what a from-scratch init would give
    source.save(tmp_path / "start.safetensors")
    trainer = Trainer(small_config(corpus, tmp_path / "run",
                                   init_from=str(tmp_path / "start.safetensors")))
    for (name, got), want in zip(trainer.module.model.state_dict().items(),
                                 source.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    trainer.close()


@pytest.mark.parametrize("checkpoint_every, gathers, checks", [(3, 2, 2), (4, 3, 2)])
def test_one_gather_per_evaluation_or_save_point(corpus, tmp_path, checkpoint_every, gathers,
                                                 checks):
    # Under FSDP a gather is a collective copy of the whole model: the final step's
    # evaluation, checkpoint and weights file share one, and the weights pass the
    # finiteness gate once per point that saves them.
    from soma_models.train.torch_engine import TorchEngine

    calls = {"gather": 0, "non_finite": 0}

    class Counting(TorchEngine):
        def gather(self):
            calls["gather"] += 1
            return super().gather()

        def non_finite(self, plain):
            calls["non_finite"] += 1
            return super().non_finite(plain)

    cfg = small_config(corpus, tmp_path / "run", steps=6, eval_every=3,
                       checkpoint_every=checkpoint_every)
    result = Trainer(cfg, engine=Counting()).run()
    assert result.step == 6 and result.score is not None
    assert calls == {"gather": gathers, "non_finite": checks}
