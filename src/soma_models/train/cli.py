"""`soma-models train`: the trainer's command line (also `python -m soma_models.train`).

    soma-models train --data corpus/ --config small --seq-len 512 --steps 2000 --out runs/a
    soma-models train --out runs/a --data corpus/ --config small ... --resume
    torchrun --nproc_per_node 2 -m soma_models.train --data corpus/ --parallel ddp ...
    soma-models train --demo        # the first-run demo on the project's own text
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from soma_models.cli_common import Parser, positive_int, seed
from soma_models.cli_common import run as run_command
from soma_models.v1.configs import PRESETS

#: The first-run demo: a few minutes on 2 CPU cores (see scripts/demo.sh).
DEMO = {
    "config": "tiny",
    "seq_len": 256,
    "batch_size": 16,
    "steps": 620,
    "final_seq_len": 2048,   # last steps on long sequences: the chain scores 8192-byte ones
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
    "out_dir": "runs/demo",
}


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option defaults to None so that `--demo` and TrainConfig fill the gaps."""
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", metavar="PATH",
                   help="files or folders of raw bytes (folders are read recursively)")
    d.add_argument("--seq-len", type=int, help="training sequence length (default 512)")
    d.add_argument("--final-seq-len", type=int,
                   help="curriculum: train the last --final-steps steps on sequences this long "
                        "(same tokens per step), e.g. the chain's 8192")
    d.add_argument("--final-steps", type=int, help="steps at --final-seq-len (default 0)")
    d.add_argument("--val-fraction", type=float, help="held-out share (default 0.1)")
    d.add_argument("--split", choices=("file", "bytes"),
                   help="hold out whole files or each file's tail (default bytes)")
    d.add_argument("--no-shuffle", dest="shuffle", action="store_const", const=False)

    m = p.add_argument_group("model")
    m.add_argument("--config", help=f"size preset: {', '.join(PRESETS)} (default tiny)")
    for name in ("embedding-dim", "num-layers", "num-heads", "pwff-hidden-dim"):
        m.add_argument(f"--{name}", type=int, help="override the preset's value")
    m.add_argument("--dropout", type=float, help="dropout rate while training (default 0)")
    m.add_argument("--init-from", metavar="WEIGHTS",
                   help="start from these canonical weights instead of from scratch")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, help="optimizer steps (default 1000)")
    o.add_argument("--batch-size", type=int, help="global batch in sequences (default 16)")
    o.add_argument("--micro-batch-size", type=positive_int,
                   help="sequences per forward pass per process (default: batch / processes); "
                        "gradients accumulate over the rest")
    o.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    o.add_argument("--min-lr-ratio", type=float, help="final lr / peak (default 0.1)")
    o.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 100)")
    o.add_argument("--weight-decay", type=float, help="AdamW decay on matrices (default 0.1)")
    o.add_argument("--grad-clip", type=float, help="global grad-norm clip, 0 = off (default 1)")
    o.add_argument("--sig-reg-coefficient", type=float,
                   help="SIGReg weight in the training loss (default: the chain's 0.02)")
    o.add_argument("--sig-reg-slices", type=int,
                   help="SIGReg directions per micro-batch (default: the chain's 1024)")
    o.add_argument("--sig-reg-positions", type=int,
                   help="compute SIGReg on this many random positions per micro-batch "
                        "(an unbiased estimate; default: all)")
    o.add_argument("--bf16", action="store_const", const=True,
                   help="bfloat16 autocast (CUDA; on CPU it runs but is usually slower)")
    o.add_argument("--seed", type=seed, help="seed for init, data order, dropout (default 0)")

    w = p.add_argument_group("watching and saving")
    w.add_argument("--out", dest="out_dir", metavar="DIR", help="run folder (default runs/soma)")
    w.add_argument("--eval-every", type=int, help="held-out CE every N steps (default 100)")
    w.add_argument("--score-every", type=int,
                   help="exact on-chain score every N steps (default: at the end only)")
    w.add_argument("--score-seed", type=seed, help="scoring seed (default 0)")
    w.add_argument("--score-seq-len", type=int,
                   help="max_seq_len used for the exact score (default: the chain's 8192)")
    w.add_argument("--score-batch-size", type=int, help="scoring batch size (default 32)")
    w.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (default 200)")
    w.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")
    w.add_argument("--resume", action="store_const", const=True,
                   help="continue from the newest checkpoint in --out")
    w.add_argument("--max-minutes", type=float, help="stop (and save) after this long")
    w.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    w.add_argument("--no-plot", dest="plot", action="store_const", const=False)

    h = p.add_argument_group("hardware")
    h.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    h.add_argument("--threads", type=positive_int,
                   help="torch CPU threads (default: torch's choice; 1 is often best for "
                        "small models on a busy machine)")
    h.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default) or fsdp (FSDP2 sharding)")
    p.add_argument("--demo", action="store_true",
                   help="the first-run demo: small model, the project's own text, ~5 min on CPU")


def config_from_args(args: argparse.Namespace):
    from soma_models.train.trainer import TrainConfig

    values = dict(DEMO) if args.demo else {}
    if args.demo and not args.data:
        values["data"] = demo_corpus()
    fields = TrainConfig.__dataclass_fields__
    for name in fields:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if not values.get("data"):
        raise ValueError("no training data: pass --data PATH [PATH ...] (or --demo)")
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from soma_models.train.trainer import train

    cfg = config_from_args(args)
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"trained {result.step} steps in {result.seconds:.0f} s "
          f"({result.tokens_per_second:,.0f} tokens/s)")
    if result.val_ce is not None:
        length = cfg.final_seq_len if cfg.final_seq_len and cfg.final_steps else cfg.seq_len
        print(f"held-out cross-entropy: {result.val_ce:.4f} nats/token on {length}-byte "
              f"sequences (untrained: about 5.6)")
    if result.score is not None:
        print(f"exact on-chain score (seed {cfg.score_seed}, max_seq_len "
              f"{result.score_seq_len}, batch {cfg.score_batch_size}): {result.score:.4f} "
              f"(cross-entropy over every position, PAD included, + 0.02 SIGReg; lower wins)")
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
    return run_command(run, args, "soma-models train",
                       interrupted="interrupted (resume with --resume)")
