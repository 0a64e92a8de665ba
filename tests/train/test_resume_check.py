"""The resume compatibility check (`checkpoint.check_resumable`): plain dicts in, one line
out, and no framework needed (the Flax trainer shares it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from soma_models.train.checkpoint import check_resumable
from soma_models.train.config import RESUME_MAY_CHANGE, TrainConfig
from soma_models.train.errors import TrainConfigError, TrainError

FOLDER = Path("runs/a/checkpoints/step_00000004")


def saved_state(cfg: TrainConfig, **changes) -> dict:
    """A checkpoint's trainer_state.json as a run of `cfg` writes it."""
    state = {"model_config": cfg.model_config().to_dict(), "train_config": cfg.to_dict(),
             "corpus": {"fingerprint": "f00d"}, "data_position": [12], "step": 4}
    state.update(changes)
    return state


def check(state: dict, cfg: TrainConfig, fingerprint: str = "f00d", phases: int = 1) -> None:
    check_resumable(FOLDER, state, model_config=cfg.model_config().to_dict(),
                    train_config=cfg.to_dict(), fingerprint=fingerprint, phases=phases)


def test_the_same_run_may_resume_and_change_how_it_is_watched():
    cfg = TrainConfig(data=["corpus"], seq_len=64, lr=3e-3)
    check(saved_state(cfg), cfg)
    watched = TrainConfig(data=["other/path"], seq_len=64, lr=3e-3, eval_every=7,
                          checkpoint_every=1, keep_checkpoints=9, micro_batch_size=2,
                          threads=3, parallel="fsdp", out_dir="elsewhere", resume=True)
    check(saved_state(cfg), watched)


def test_settings_that_change_the_weights_are_named_with_both_values():
    cfg = TrainConfig(data=["corpus"], lr=3e-3)
    changed = TrainConfig(data=["corpus"], lr=1e-3, seed=5, split="file")
    with pytest.raises(TrainError) as exc:
        check(saved_state(cfg), changed)
    message = str(exc.value)
    assert message.startswith(f"{FOLDER}: --resume with settings that change the run: ")
    for part in ("--lr 0.001 (checkpoint: 0.003)", "--seed 5 (checkpoint: 0)",
                 "--split 'file' (checkpoint: 'bytes')"):
        assert part in message
    assert "\n" not in message


def test_another_model_another_corpus_or_other_phases_are_refused():
    cfg = TrainConfig(data=["corpus"])
    bigger = TrainConfig(data=["corpus"], embedding_dim=48)
    with pytest.raises(TrainError, match="model config does not match the checkpoint "
                                         r"\(embedding_dim: checkpoint 64 vs requested 48"):
        check(saved_state(TrainConfig(data=["corpus"], embedding_dim=64)), bigger)
    with pytest.raises(TrainError, match="the training data differs from the checkpoint's"):
        check(saved_state(cfg), cfg, fingerprint="beef")
    with pytest.raises(TrainConfigError, match="checkpoint has 1 sequence-length phase"):
        check(saved_state(cfg), cfg, phases=2)


def test_a_setting_missing_from_an_older_checkpoint_is_not_a_change():
    cfg = TrainConfig(data=["corpus"])
    state = saved_state(cfg)
    del state["train_config"]["sig_reg_positions"]
    check(state, TrainConfig(data=["corpus"], sig_reg_positions=64))


def test_which_settings_a_resume_may_change():
    # The weights depend on every other setting; these decide where and how a run is
    # watched, saved and scheduled on hardware (or are compared another way: the sizes
    # through the model config, the data through its fingerprint).
    assert RESUME_MAY_CHANGE == {
        "data", "out_dir", "resume", "overwrite", "protocol", "init_from", "config",
        "dropout", "embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim",
        "micro_batch_size", "eval_every", "eval_batch_size", "score_every", "score_seed",
        "score_seq_len", "score_batch_size", "checkpoint_every", "keep_checkpoints",
        "max_minutes", "progress", "plot", "device", "threads", "parallel",
        "activation_checkpointing", "compile", "val_max_bytes"}


NO_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    from pathlib import Path
    from soma_models.train import checkpoint, cli, config, metrics, run_folder, trainer
    from soma_models.train.errors import TrainError

    cfg = config.TrainConfig(data=["corpus"], lr=3e-3)
    state = {"model_config": cfg.model_config().to_dict(), "train_config": cfg.to_dict(),
             "corpus": {"fingerprint": "f"}, "data_position": [0]}
    other = config.TrainConfig(data=["corpus"], lr=1e-3)
    try:
        checkpoint.check_resumable(Path("ck"), state, model_config=state["model_config"],
                                   train_config=other.to_dict(), fingerprint="f", phases=1)
    except TrainError as exc:
        print(exc)
""")


def test_the_check_and_the_trainer_s_framework_free_parts_run_without_torch():
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("ck: --resume with settings that change the run: --lr 0.001 "
                                   "(checkpoint: 0.003); keep them as the checkpoint has them, "
                                   "or start a new run (another --out, or --overwrite)")
