"""Each setting written once: `config.TrainConfig`'s fields carry their help, rule and
resume rule, and `soma-models train`'s options are generated from them."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from soma_models.train import config
from soma_models.train.cli import add_arguments
from soma_models.train.config import TrainConfig
from soma_models.train.errors import TrainConfigError

#: `soma-models train --help`'s groups and options, as they were written by hand.
HELP_GROUPS = {
    "data": ["--data", "--seq-len", "--final-seq-len", "--final-steps", "--val-fraction",
             "--split", "--val-max-bytes", "--no-shuffle"],
    "model": ["--config", "--embedding-dim", "--num-layers", "--num-heads",
              "--pwff-hidden-dim", "--dropout", "--init-from"],
    "optimisation": ["--steps", "--batch-size", "--micro-batch-size", "--lr", "--min-lr-ratio",
                     "--warmup-steps", "--weight-decay", "--grad-clip", "--sig-reg-coefficient",
                     "--sig-reg-slices", "--sig-reg-positions", "--bf16", "--seed"],
    "watching and saving": ["--out", "--protocol", "--eval-every", "--score-every",
                            "--score-seed", "--score-seq-len", "--score-batch-size",
                            "--checkpoint-every", "--keep-checkpoints", "--resume",
                            "--overwrite", "--max-minutes", "--no-progress", "--no-plot"],
    "hardware": ["--framework", "--device", "--threads", "--parallel",
                 "--activation-checkpointing", "--compile"],
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_the_options_come_grouped_as_before():
    groups = {g.title: [a.option_strings[0] for a in g._group_actions]
              for g in parser()._action_groups if g.title in HELP_GROUPS}
    assert groups == HELP_GROUPS


def test_every_setting_is_in_one_group_and_the_config_stays_flat():
    names = [f.name for group in config.GROUPS for f in dataclasses.fields(group)]
    assert sorted(names) == sorted(config.FIELDS) and len(set(names)) == len(names)
    cfg = TrainConfig(data=["corpus"], seq_len=64, lr=3e-3, threads=2)
    assert (cfg.seq_len, cfg.lr, cfg.threads, cfg.steps) == (64, 3e-3, 2, 1000)
    assert isinstance(cfg, config.OptimiserSettings)  # a group's consumers take the config
    assert sorted(cfg.to_dict()) == sorted(config.FIELDS)  # what run.json records


def test_help_quotes_each_default_from_the_field():
    texts = {a.dest: a.help for a in parser()._actions}
    assert texts["seq_len"] == "training sequence length (default 512)"
    assert texts["lr"] == "peak learning rate (default 0.001)"
    assert texts["out_dir"] == "run folder (default runs/soma; --demo: runs/demo)"
    assert "default tiny" in texts["config"]


def test_options_parse_to_the_settings():
    args = parser().parse_args(["--data", ".", "--seq-len", "64", "--no-shuffle", "--bf16",
                                "--out", "x", "--parallel", "fsdp", "--seed", "0x10"])
    assert (args.data, args.seq_len, args.shuffle, args.bf16, args.out_dir, args.parallel,
            args.seed) == (["."], 64, False, True, "x", "fsdp", 16)
    assert args.lr is None and args.progress is None  # unset: TrainConfig's default


@pytest.mark.parametrize("name, value, expected", [
    ("steps", 0, "--steps must be an integer >= 1, got 0"),
    ("eval_batch_size", 0, "--eval-batch-size must be an integer >= 1, got 0"),
    ("split", "lines", "unknown split 'lines'; choose one of ('file', 'bytes')"),
    ("parallel", "tp", "unknown --parallel 'tp'; choose ddp or fsdp"),
])
def test_check_settings_names_the_option(name, value, expected):
    with pytest.raises(TrainConfigError) as exc:
        config.check_settings(TrainConfig(data=["."], **{name: value}))
    assert str(exc.value) == expected


def test_batch_layout():
    layout = config.batch_layout(TrainConfig(batch_size=16, micro_batch_size=2), 4)
    assert (layout.micro_batch_size, layout.accumulation) == (2, 2)
    assert config.batch_layout(TrainConfig(batch_size=16), 4).accumulation == 1
    with pytest.raises(TrainConfigError, match="leaves 2 sequence"):
        config.batch_layout(TrainConfig(batch_size=4, seq_len=64, final_seq_len=128,
                                        final_steps=1), 4)
