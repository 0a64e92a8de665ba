"""`soma-models train`: the trainer's command line (also `python -m soma_models.train`).

    soma-models train --data corpus/ --config small --seq-len 512 --steps 2000 --out runs/a
    soma-models train --out runs/a --data corpus/ --config small ... --resume
    torchrun --nproc_per_node 2 -m soma_models.train --data corpus/ --parallel ddp ...
    soma-models train --demo        # the first-run demo on the project's own text

Every option is checked before any work starts: a bad value is one line on stderr and exit
status 2. An --out folder that already holds a run is refused unless --resume (continue it,
with the same settings) or --overwrite (replace it) is given; a folder another run is
using is refused, naming that run's PID.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from soma_models.cli_common import Parser, device, input_file, positive_int, seed
from soma_models.cli_common import protocol as _protocol
from soma_models.cli_common import run as run_command
from soma_models.train import config
from soma_models.train.errors import TrainConfigError
from soma_models.v1.configs import PRESETS
from soma_models.v1.revisions import known_names, resolve

PROG = "soma-models"

#: The first-run demo: a few minutes on 2 CPU cores (see scripts/demo.sh).
DEMO = {
    "config": "tiny",
    "seq_len": 256,
    "batch_size": 16,
    "steps": 620,
    # Last steps on long sequences, capped at what the revision's chain scores (1024 under
    # "0.1.7"; the product page's 8192 would be too slow for a demo, so 2048 there).
    "final_seq_len": 2048,
    "final_steps": 60,
    "lr": 3e-3,
    "warmup_steps": 40,
    "split": "file",
    "val_fraction": 0.1,
    "sig_reg_positions": 512,
    "eval_every": 100,
    "score_every": 200,
    "checkpoint_every": 100,
    "max_minutes": 7.0,
    "threads": 1,
}
DEMO_OUT = Path("runs") / "demo"


def demo_corpus() -> list[str]:
    """Text we wrote and may redistribute: this package's own sources, plus the repo's
    docs and README when running from a checkout. Nothing is downloaded."""
    import soma_models

    package = Path(soma_models.__file__).resolve().parent
    paths = [package]
    repo = package.parent.parent
    for extra in ("docs", "README.md"):
        if (repo / extra).exists() and (repo / "pyproject.toml").exists():
            paths.append(repo / extra)
    return [str(p) for p in paths]


# ------------------------------------------------------------------ argument types

def _setting(name: str) -> Callable[[str], object]:
    """Argument type for TrainConfig field `name`, checked by its rule (`config.setting`)."""
    def parse(text: str) -> object:
        try:
            return config.parse(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def _out_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder")
    return text


#: `Setting.parser` names: the types every command shares (`soma_models.cli_common`) and the
#: trainer's own paths. A setting without one is parsed by its rule.
PARSERS: dict[str, Callable[[str], object]] = {
    "positive_int": positive_int, "seed": seed, "device": device, "input_file": input_file,
    "protocol": _protocol, "existing_path": _existing_path, "out_folder": _out_folder}


# ------------------------------------------------------------------ options

def _help_values() -> dict[str, str]:
    """What help texts name besides their default (`config.Setting.help`)."""
    return {"presets": ", ".join(PRESETS), "revisions": ", ".join(known_names()),
            "default_revision": resolve().name, "demo_out": str(DEMO_OUT)}


def _add_setting(group, field: dataclasses.Field, values: dict[str, str]) -> None:
    meta = config.setting_of(field)
    flag = meta.flag or config.option_name(field.name)
    kwargs: dict[str, object] = {}
    if flag != config.option_name(field.name):
        kwargs["dest"] = field.name
    if meta.const is not None:
        kwargs.update(action="store_const", const=meta.const)
    else:
        parse = PARSERS[meta.parser] if meta.parser else (
            _setting(field.name) if meta.rule else None)
        for key, value in (("nargs", meta.nargs), ("metavar", meta.metavar),
                           ("type", parse), ("choices", meta.choices)):
            if value is not None:
                kwargs[key] = value
    if meta.help is not None:
        kwargs["help"] = meta.help.format(default=config.default_of(field), **values)
    group.add_argument(flag, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options, generated from the settings (`soma_models.train.config`): one argument
    group per setting group, in field order. Every option defaults to None so that `--demo`
    and TrainConfig fill the gaps."""
    values = _help_values()
    for group in config.GROUPS:
        arguments = p.add_argument_group(group.TITLE)
        for field in dataclasses.fields(group):
            if config.setting_of(field).cli:
                _add_setting(arguments, field, values)
    p.add_argument("--demo", action="store_true",
                   help="the first-run demo: small model, the project's own text, ~5 min on CPU")


def revision_of(argv: Sequence[str]) -> str:
    """The revision `soma-models train ARGV` scores against, named for people (the demo
    script's banner): `--protocol` if given, else SOMA_MODELS_PROTOCOL, else the default."""
    parser = Parser(prog=f"{PROG} train", add_help=False)
    parser.add_argument("--protocol", type=_protocol)
    known, _ = parser.parse_known_args(argv)
    revision = resolve(known.protocol)
    return f"{revision.name}, {revision.summary}"


def _free_demo_folder() -> str:
    """runs/demo, or runs/demo-2, -3, ... when earlier demos are there (never replaced)."""
    from soma_models.train.run_folder import existing_entries

    candidate, n = DEMO_OUT, 1
    while candidate.exists() and (not candidate.is_dir() or existing_entries(candidate)
                                  or (candidate / ".lock").exists()):
        n += 1
        candidate = DEMO_OUT.with_name(f"{DEMO_OUT.name}-{n}")
    return str(candidate)


def config_from_args(args: argparse.Namespace) -> config.TrainConfig:
    values = dict(DEMO) if args.demo else {}
    if args.demo:
        revision = resolve(getattr(args, "protocol", None))
        values["final_seq_len"] = min(DEMO["final_seq_len"], revision.max_seq_len)
        if not args.data:
            values["data"] = demo_corpus()
        if args.out_dir is None:
            values["out_dir"] = str(DEMO_OUT) if args.resume else _free_demo_folder()
    for name in config.FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if not values.get("data"):
        raise TrainConfigError("no training data: pass --data PATH [PATH ...] (or --demo)")
    return config.TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from soma_models.train.run_folder import Terminated
    from soma_models.train.trainer import train

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 reports
    try:
        cfg = config_from_args(args).resolved()
        revision = cfg.revision()
        if main_rank:
            print(f"protocol revision {revision.name}, {revision.summary}: the exact score "
                  f"uses max_seq_len {cfg.score_seq_len}, batch {cfg.score_batch_size}, "
                  f"{revision.sig_reg_slices} SIGReg slices", flush=True)
        result = train(cfg)
    except TrainConfigError as exc:  # a usage error found once options meet: as argparse's
        print(f"{PROG} train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"{PROG}: stopped by SIGTERM; the last complete checkpoint is kept (continue "
              f"with --resume)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the last complete checkpoint is kept (continue with "
              f"--resume)", file=sys.stderr)
        return 130
    if not main_rank:
        return 0
    print(f"trained {result.step} steps in {result.seconds:.0f} s "
          f"({result.tokens_per_second:,.0f} tokens/s)")
    if result.val_ce is not None:
        length = cfg.final_seq_len if cfg.final_seq_len and cfg.final_steps else cfg.seq_len
        print(f"held-out cross-entropy: {result.val_ce:.4f} nats/token on {length}-byte "
              f"sequences (untrained: about 5.6)")
    if result.score is not None:
        print(f"exact on-chain score under protocol revision {result.protocol} (seed "
              f"{cfg.score_seed}, max_seq_len {result.score_seq_len}, batch "
              f"{cfg.score_batch_size}, {revision.sig_reg_slices} SIGReg slices): "
              f"{result.score:.4f} (cross-entropy over every position, PAD included, + "
              f"{revision.sig_reg_coefficient} SIGReg; lower wins)")
    print(f"weights: {result.weights}")
    print(f"metrics: {result.metrics}")
    if result.plot is not None:
        print(f"loss plot: {result.plot}")
    print(f"checkpoints: {result.out_dir / 'checkpoints'} (continue with --resume)")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `train` to the `soma-models` command's subparsers."""
    p = subparsers.add_parser("train", help="train a V1-architecture model on raw bytes",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (`python -m soma_models.train`, torchrun -m): same options."""
    parser = Parser(prog="soma-models train", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(run, args, f"{PROG} train",
                       interrupted="interrupted (resume with --resume)")
