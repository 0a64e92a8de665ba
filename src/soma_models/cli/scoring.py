"""`soma-models score`, `screen` and `validate`: weights as the chain scores and loads them."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from typing import Any

import numpy as np

from soma_models.cli.shared import (
    add_protocol,
    add_scoring_options,
    embedding_summary,
    print_json,
    revision_line,
    revision_of,
)
from soma_models.cli_common import input_file, output_file, positive_float, positive_int, seed
from soma_models.v1.inputs import finite_or_none, keys_for, parse_target, read_data

# --------------------------------------------------------------------------- score

def _score_json(path: str, score: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"weights": path, "protocol": score.protocol,
                           "loss": finite_or_none(score.loss),
                           "embedding": [finite_or_none(float(v)) for v in score.embedding]}
    if score.range is not None:
        r = score.range
        out["range"] = {"low": r.low, "high": r.high, "exact": r.exact, "orders": r.orders}
    return out


def _nan_loss_note(path: str, index: int) -> str:
    """What a NaN loss means on chain (SPEC §7)."""
    rule = ("at index 0 it wins any competition: the runtime's argmin finds nothing below it"
            if index == 0 else "in a competition the runtime's argmin passes over it (only a "
            "NaN at index 0 wins, as nothing compares below it)")
    return (f"{path}: loss is NaN: the runtime accepts this file but its loss is NaN too "
            f"('soma-models validate' lists NaN/Inf weights); {rule}")


def _nan_distance_reason(embedding: np.ndarray, target: Any) -> str:
    """Why a cosine distance is NaN (SPEC §7: the runtime computes NaN too)."""
    rule = "1 - (a/|a|).(b/|b|) divides by both norms, so the runtime's distance is NaN too"
    if not np.all(np.isfinite(embedding)):
        return f"distance is NaN: the embedding holds NaN/Inf values ({rule})"
    if not np.any(target):
        return f"distance is NaN: the target embedding is all zeros, its norm is 0 ({rule})"
    if not np.any(embedding):
        return f"distance is NaN: the embedding is all zeros, its norm is 0 ({rule})"
    return f"distance is NaN: the target holds NaN/Inf values ({rule})"


def cmd_score(args: argparse.Namespace) -> int:
    from soma_models.v1.contract import ScoringContract
    from soma_models.v1.scoring import NaNLossWarning, compete

    contract = ScoringContract.of(args.protocol, max_seq_len=args.max_seq_len,
                                  batch_size=args.batch_size)
    revision = contract.revision
    keys = keys_for(args.weights, args.key)
    target = parse_target(args.target) if args.target is not None else None
    data = read_data(args.data)
    show_progress = not args.quiet and sys.stderr.isatty()
    many = len(args.weights) > 1

    def report(i: int, score: Any) -> None:
        if many and not args.json:
            print(f"loss {score.loss:.9g}  {args.weights[i]}", flush=True)
        if math.isnan(score.loss):
            warnings.warn(_nan_loss_note(args.weights[i], i), stacklevel=1)

    # compete() warns about NaN losses too; here each file gets its own line (report above).
    warnings.filterwarnings("ignore", category=NaNLossWarning)
    result = compete(args.weights, data, args.seed, target=target, keys=keys,
                     framework=args.framework, device=args.device, contract=contract,
                     micro_batch_size=args.micro_batch_size, progress=show_progress,
                     batch_order_range=args.range, on_score=report)
    if args.json:
        scores = [_score_json(p, s) for p, s in zip(args.weights, result.scores)]
        if not many and target is None:
            print_json(scores[0])
            return 0
        print_json({"protocol": revision.name, "scores": scores, "competition": {
            "winner": result.winner, "winner_weights": args.weights[result.winner],
            "loss": finite_or_none(result.loss),
            "distance": finite_or_none(result.distance),
            "losses": [finite_or_none(x) for x in result.losses]}})
        return 0
    if not many:
        s = result.scores[0]
        print(revision_line(revision))
        print(f"loss       {s.loss:.9g}")
        print(f"embedding  {embedding_summary(s.embedding)}")
    else:
        print(revision_line(revision))
        print(f"winner     {args.weights[result.winner]} (#{result.winner + 1}), "
              f"loss {result.loss:.9g}")
    if result.distance is not None:
        print(f"distance   {result.distance:.9g} (cosine distance of the "
              f"{'winner' if many else 'model'}'s embedding to the target)")
        if math.isnan(result.distance):
            warnings.warn(_nan_distance_reason(result.embedding, target), stacklevel=1)
    if args.range:
        for path, s in zip(args.weights, result.scores):
            r = s.range
            kind = "exact" if r.exact else "outer bound"
            label = f"  {path}" if many else ""
            print(f"range      [{r.low:.9g}, {r.high:.9g}] over {r.orders} batch orders "
                  f"({kind}){label}")
    return 0


def _add_score(sub: argparse._SubParsersAction) -> None:
    from soma_models.v1.revisions import REVISIONS

    p = sub.add_parser("score", help="score weights on data as the chain does (loss, embedding)",
                       description="Score one or more weights files on the same data and seed. "
                                   "With several files (or a --target) the competition result "
                                   "is printed too: lowest loss wins.")
    p.add_argument("weights", nargs="+", type=input_file, help="safetensors weights file(s)")
    p.add_argument("--data", required=True, type=input_file, help="data file (raw bytes)")
    p.add_argument("--seed", required=True, type=seed, help="u64 scoring seed")
    p.add_argument("--target", help="target embedding: a file (.npy, JSON list, or numbers) "
                                    "or an inline comma-separated list")
    p.add_argument("--key", action="append", metavar="KEY",
                   help="AES-256-CTR key (Base58, or 64 hex) of an encrypted file; repeat once "
                        "per file, in order ('none' for an unencrypted one)")
    add_scoring_options(p)
    p.add_argument("--range", action="store_true",
                   help="also report the loss range over the chain loader's batch orders")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_protocol(p, "to score as")
    seq_lens = ", ".join(f"{r.max_seq_len} under {n}" for n, r in REVISIONS.items())
    batches = ", ".join(f"{r.batch_size} under {n}" for n, r in REVISIONS.items())
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help=f"experiments only; default the revision's ({seq_lens})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"experiments only; default the revision's ({batches})")
    p.set_defaults(func=cmd_score)


# --------------------------------------------------------------------------- screen

def cmd_screen(args: argparse.Namespace) -> int:
    from soma_models.v1.contract import ScoringContract
    from soma_models.v1.screen_output import Share, join_ranks, screen_to_jsonl
    from soma_models.v1.screening import Screener, check_prescreen, find_samples, load_targets

    # Before any file is read or model loaded: a prescreen that cannot run is one line.
    check_prescreen(args.prescreen, args.threshold, args.framework)
    share = Share.from_env()
    if share.world_size > 1 and args.out is None:
        raise ValueError(f"screening on {share.world_size} ranks (WORLD_SIZE) needs --out: "
                         "each rank writes its part beside it")
    keys = keys_for(args.models, args.key)
    samples = find_samples(args.data, exclude=[args.out] if args.out else [])
    coordinator = join_ranks(share)
    try:
        screener = Screener(
            args.models, load_targets(args.targets), args.seed, keys=keys,
            contract=ScoringContract.of(args.protocol), framework=args.framework,
            device=share.device(args.device), micro_batch_size=args.micro_batch_size,
            threshold=args.threshold, prescreen=args.prescreen,
            calibration_samples=args.calibration_samples, margin_loss=args.margin_loss,
            margin_distance=args.margin_distance)
        summary = screen_to_jsonl(screener, samples, args.out, embeddings=args.embeddings,
                                  progress=not args.quiet and sys.stderr.isatty(),
                                  share=share, coordinator=coordinator)
    finally:
        close = getattr(coordinator, "close", None)
        if close is not None:
            close()
    if share.rank == 0:
        print(summary, file=sys.stderr)
    return 0


def _add_screen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("screen", help="screen many data samples against a target's models",
                       description="For every sample (each file is one sample), run the "
                                   "chain's competition among the models (each scored on the "
                                   "sample alone, lowest loss wins) and write one JSON line "
                                   "with the losses, the winner and its cosine distance to "
                                   "every target. Rerunning with the same --out skips the "
                                   "samples it already holds; an --out written by another "
                                   "screening (other models, targets, seed or revision) is "
                                   "refused. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK) "
                                   "every rank screens its share on its own device (--device "
                                   "cuda: cuda:LOCAL_RANK) into OUT.rankR, and rank 0 merges "
                                   "them into --out in input order.")
    p.add_argument("--models", nargs="+", required=True, metavar="WEIGHTS", type=input_file,
                   help="the target's safetensors weights files")
    p.add_argument("--key", action="append", metavar="KEY",
                   help="decryption key of an encrypted model; repeat once per model, in "
                        "order ('none' for an unencrypted one)")
    p.add_argument("--targets", required=True, type=input_file,
                   help="target embeddings: .npy [n, D] or a JSON list of lists")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="sample files and folders (folders are walked recursively); each "
                        "sample is 1 byte to 1 MiB, the network's limit on submitted data")
    p.add_argument("--seed", type=seed, default=0, help="u64 scoring seed (the chain uses 0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="a sample is a hit when its nearest target distance is below this")
    p.add_argument("--prescreen", choices=("bf16",), default=None,
                   help="first score every sample in bf16 autocast and re-score exactly "
                        "(float32) only those it cannot prove misses; proven misses get a "
                        "line with \"exact\": false. Needs --threshold and --framework "
                        "torch. The margins are measured on the first samples, not proven "
                        "(see the README)")
    p.add_argument("--calibration-samples", type=positive_int, default=32, metavar="N",
                   help="with --prescreen: the first N samples are scored both ways to set "
                        "the margins (4x the largest deviation seen; default 32)")
    p.add_argument("--margin-loss", type=positive_float, default=None, metavar="DL",
                   help="with --prescreen: the loss margin instead of the calibrated one")
    p.add_argument("--margin-distance", type=positive_float, default=None, metavar="DD",
                   help="with --prescreen: the distance margin instead of the calibrated one")
    p.add_argument("--out", default=None, type=output_file,
                   help="JSONL output file (default stdout); an existing one is resumed")
    add_protocol(p, "to screen under (contract, SIGReg slices, key format)")
    p.add_argument("--embeddings", action="store_true",
                   help="also write the winner's embedding")
    add_scoring_options(p, "rows per forward pass, across samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_screen)


# --------------------------------------------------------------------------- validate

def cmd_validate(args: argparse.Namespace) -> int:
    from soma_models.v1.validation import validate

    revision = revision_of(args)
    keys = keys_for(args.weights, args.key)
    reports = [validate(path, key=key, protocol=revision)
               for path, key in zip(args.weights, keys)]
    if args.json:
        print_json([r.to_dict() for r in reports])
    else:
        print(revision_line(revision))
        for r in reports:
            print(r)
    # Refused files, and accepted ones whose loss would be NaN, fail the check.
    return 0 if all(r.ok and not r.non_finite for r in reports) else 1


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check weights files as the chain will load them",
                       description="Report every problem of each file, separating what makes "
                                   "the runtime refuse it (format, header, keys, shapes, "
                                   "unmapped dtypes, too few layers) from what it accepts but "
                                   "scores other than the file suggests (NaN/Inf values, extra "
                                   "layers, converted dtypes). Exit status 1 if a file is "
                                   "refused or holds NaN/Inf values.")
    p.add_argument("weights", nargs="+", type=input_file)
    p.add_argument("--key", action="append", metavar="KEY",
                   help="decryption key (Base58 or 64 hex), once per file ('none' for an "
                        "unencrypted one)")
    p.add_argument("--json", action="store_true")
    add_protocol(p, "to check against")
    p.set_defaults(func=cmd_validate)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `score`, `screen` and `validate` to the `soma-models` command's subparsers."""
    _add_score(sub)
    _add_screen(sub)
    _add_validate(sub)
