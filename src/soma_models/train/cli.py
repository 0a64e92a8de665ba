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
from soma_models.train import options
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
    """Argument type for TrainConfig field `name`, checked by `options.RULES`."""
    def parse(text: str) -> object:
        try:
            return options.parse(name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name  # argparse names the type in some messages
    return parse


def _default(name: str) -> object:
    """TrainConfig's default for `name` (help texts quote it instead of repeating it)."""
    from soma_models.train.trainer import TrainConfig

    field = TrainConfig.__dataclass_fields__[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def _existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file or folder")
    return text


def _out_folder(text: str) -> str:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: exists and is not a folder")
    return text


# ------------------------------------------------------------------ options

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None so that `--demo` and TrainConfig fill the gaps.

    Shared types (`soma_models.cli_common`) for what every command has (seeds, positive
    integers, devices, files); `options.RULES` for the trainer's own ranges."""
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="PATH", type=_existing_path,
                   help="files or folders of raw bytes (folders are read recursively)")
    d.add_argument("--seq-len", type=_setting("seq_len"),
                   help=f"training sequence length (default {_default('seq_len')})")
    d.add_argument("--final-seq-len", type=_setting("final_seq_len"),
                   help="curriculum: train the last --final-steps steps on sequences this long "
                        "(same tokens per step), e.g. the revision's max_seq_len (1024 under "
                        "0.1.7, 8192 under 0.1.1)")
    d.add_argument("--final-steps", type=_setting("final_steps"),
                   help=f"steps at --final-seq-len (default {_default('final_steps')})")
    d.add_argument("--val-fraction", type=_setting("val_fraction"),
                   help=f"held-out share (default {_default('val_fraction')})")
    d.add_argument("--split", choices=("file", "bytes"),
                   help=f"hold out whole files or each file's tail (default {_default('split')})")
    d.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False)

    m = p.add_argument_group("model")
    m.add_argument("--config", help=f"size preset: {', '.join(PRESETS)} (default "
                                    f"{_default('config')}; v1 has the revision's layers)")
    for name in ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim"):
        m.add_argument(options.option_name(name), type=positive_int,
                       help="override the preset's value")
    m.add_argument("--dropout", type=_setting("dropout"),
                   help=f"dropout rate while training (default {_default('dropout')})")
    m.add_argument("--init-from", metavar="WEIGHTS", type=input_file,
                   help="start from these canonical weights instead of from scratch")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=positive_int,
                   help=f"optimizer steps (default {_default('steps')})")
    o.add_argument("--batch-size", type=positive_int,
                   help=f"global batch in sequences (default {_default('batch_size')})")
    o.add_argument("--micro-batch-size", type=positive_int,
                   help="sequences per forward pass per process (default: batch / processes); "
                        "gradients accumulate over the rest")
    o.add_argument("--lr", type=_setting("lr"),
                   help=f"peak learning rate (default {_default('lr')})")
    o.add_argument("--min-lr-ratio", type=_setting("min_lr_ratio"),
                   help=f"final lr / peak (default {_default('min_lr_ratio')})")
    o.add_argument("--warmup-steps", type=_setting("warmup_steps"),
                   help=f"linear warmup steps (default {_default('warmup_steps')})")
    o.add_argument("--weight-decay", type=_setting("weight_decay"),
                   help=f"AdamW decay on matrices (default {_default('weight_decay')})")
    o.add_argument("--grad-clip", type=_setting("grad_clip"),
                   help=f"global grad-norm clip, 0 = off (default {_default('grad_clip')})")
    o.add_argument("--sig-reg-coefficient", type=_setting("sig_reg_coefficient"),
                   help="SIGReg weight in the training loss (default: the chain's "
                        f"{_default('sig_reg_coefficient')})")
    o.add_argument("--sig-reg-slices", type=positive_int,
                   help="SIGReg directions per micro-batch (default: the revision's, 256 under "
                        "0.1.7, 1024 under 0.1.1)")
    o.add_argument("--sig-reg-positions", type=positive_int,
                   help="compute SIGReg on this many random positions per micro-batch "
                        "(an unbiased estimate; default: all)")
    o.add_argument("--bf16", action="store_const", const=True,
                   help="bfloat16 autocast (CUDA; on CPU it runs but is usually slower)")
    o.add_argument("--seed", type=seed,
                   help=f"seed for init, data order, dropout (default {_default('seed')})")

    w = p.add_argument_group("watching and saving")
    w.add_argument("--out", dest="out_dir", metavar="DIR", type=_out_folder,
                   help=f"run folder (default {_default('out_dir')}; --demo: {DEMO_OUT})")
    w.add_argument("--protocol", type=_protocol, metavar="REVISION",
                   help=f"V1 revision the exact score and the SIGReg default follow: "
                        f"{', '.join(known_names())} (default: $SOMA_MODELS_PROTOCOL, else "
                        f"{resolve().name})")
    w.add_argument("--eval-every", type=_setting("eval_every"),
                   help=f"held-out CE every N steps (default {_default('eval_every')})")
    w.add_argument("--score-every", type=_setting("score_every"),
                   help="exact on-chain score every N steps (default: at the end only)")
    w.add_argument("--score-seed", type=seed,
                   help=f"scoring seed (default {_default('score_seed')})")
    w.add_argument("--score-seq-len", type=_setting("score_seq_len"),
                   help="max_seq_len used for the exact score (default: the revision's)")
    w.add_argument("--score-batch-size", type=positive_int,
                   help="scoring batch size (default: the revision's)")
    w.add_argument("--checkpoint-every", type=_setting("checkpoint_every"),
                   help=f"checkpoint every N steps (default {_default('checkpoint_every')})")
    w.add_argument("--keep-checkpoints", type=positive_int,
                   help=f"checkpoints kept (default {_default('keep_checkpoints')})")
    w.add_argument("--resume", action="store_const", const=True,
                   help="continue the run in --out from its newest checkpoint (the settings "
                        "that decide the weights must be the checkpoint's)")
    w.add_argument("--overwrite", action="store_const", const=True,
                   help="replace the run already in --out (its model, metrics, checkpoints)")
    w.add_argument("--max-minutes", type=_setting("max_minutes"),
                   help="stop (and save) after this long")
    w.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    w.add_argument("--no-plot", dest="plot", action="store_const", const=False)

    h = p.add_argument_group("hardware")
    h.add_argument("--device", type=device,
                   help="cpu, cuda, cuda:N, mps (default: cuda if available)")
    h.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice; 1 is often best for "
                        "small models on a busy machine)")
    h.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default) or fsdp (FSDP2 sharding)")
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


def config_from_args(args: argparse.Namespace):
    from soma_models.train.trainer import TrainConfig

    values = dict(DEMO) if args.demo else {}
    if args.demo:
        revision = resolve(getattr(args, "protocol", None))
        values["final_seq_len"] = min(DEMO["final_seq_len"], revision.max_seq_len)
        if not args.data:
            values["data"] = demo_corpus()
        if args.out_dir is None:
            values["out_dir"] = str(DEMO_OUT) if args.resume else _free_demo_folder()
    fields = TrainConfig.__dataclass_fields__
    for name in fields:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if not values.get("data"):
        raise TrainConfigError("no training data: pass --data PATH [PATH ...] (or --demo)")
    return TrainConfig(**values)


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
