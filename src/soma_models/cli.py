"""The `soma-models` command: score, validate, inspect, init, encrypt, decrypt (and train).

Options and paths are checked while the command line is parsed, before any work starts:
a bad one is one line `soma-models: error: argument ...` with exit status 2. Problems met
while working (damaged weights, wrong key, empty data) print one line
`soma-models: error: ...` and exit with status 1; warnings are one line each. Set
SOMA_MODELS_DEBUG=1 to get the traceback instead. Argument types, the error handler and
the warning format are shared with `soma-models train` (`soma_models.cli_common`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import mmap
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from soma_models import __version__
from soma_models.cli_common import (
    Parser,
    UserError,
    device,
    input_file,
    micro_batch,
    output_file,
    positive_int,
    run,
    seed,
)

PROG = "soma-models"


# --------------------------------------------------------------------------- helpers

def _read_data(path: str) -> object:
    """The data file's bytes, memory-mapped (read-only) so large data is not copied."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--data {path}: no such data file")
    if file.stat().st_size == 0:
        raise UserError(f"--data {path}: data is empty: the runtime refuses it "
                        "('data loader produced no batches')")
    with open(file, "rb") as fh:
        # The map lives as long as the view (the process, for a CLI command).
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))


def _parse_target(text: str) -> np.ndarray:
    """A target embedding from a file (.npy, JSON list, or numbers separated by commas or
    whitespace) or from an inline comma-separated list."""
    path = Path(text)
    if path.is_dir():
        raise UserError(f"--target {text}: is a directory, expected a file or a list")
    if path.is_file():
        if path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            content = path.read_text().strip()
            values = _parse_numbers(content, f"--target {path}")
    else:
        if "," not in text and not _is_number(text):
            raise UserError(f"--target {text!r}: no such file, and not a comma-separated list")
        values = _parse_numbers(text, "--target")
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 1 or values.size == 0:
        raise UserError(f"--target {text}: the target embedding must be a non-empty vector, "
                        f"got shape {list(values.shape)}")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _parse_numbers(content: str, where: str) -> list[float]:
    if content.startswith("["):
        try:
            return [float(v) for v in json.loads(content)]
        except (json.JSONDecodeError, TypeError, ValueError):
            raise UserError(f"{where}: not a JSON list of numbers") from None
    parts = [p for p in content.replace(",", " ").split() if p]
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{where}: not a list of numbers") from None


def _keys_for(files: Sequence[str], keys: Sequence[str] | None) -> list[str | None]:
    """One key per file; 'none' (or '-') marks an unencrypted file among encrypted ones."""
    if not keys:
        return [None] * len(files)
    if len(keys) != len(files):
        raise UserError(f"got {len(keys)} --key for {len(files)} weights file(s): give one "
                        "per file, in order ('none' for an unencrypted file)")
    return [None if k.lower() in ("none", "-", "") else _key_arg(k, f"--key #{i + 1}")
            for i, k in enumerate(keys)]


def _finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN: a NaN or infinite value is written as null."""
    return None if x is None or not math.isfinite(x) else x


def _embedding_summary(embedding: np.ndarray) -> str:
    head = " ".join(f"{v:.6g}" for v in embedding[:4])
    more = " ..." if embedding.size > 4 else ""
    return f"[{head}{more}] ({embedding.size} values, norm {np.linalg.norm(embedding):.6g})"


def _score_json(path: str, score: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"weights": path, "loss": _finite_or_none(score.loss),
                           "embedding": [_finite_or_none(float(v)) for v in score.embedding]}
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


def _print_json(doc: object) -> None:
    print(json.dumps(doc, allow_nan=False))


# --------------------------------------------------------------------------- score

def cmd_score(args: argparse.Namespace) -> int:
    from soma_models.v1.configs import SIGRegConfig
    from soma_models.v1.scoring import compete

    keys = _keys_for(args.weights, args.key)
    target = _parse_target(args.target) if args.target is not None else None
    data = _read_data(args.data)
    show_progress = not args.quiet and sys.stderr.isatty()
    many = len(args.weights) > 1

    def report(i: int, score: Any) -> None:
        if many and not args.json:
            print(f"loss {score.loss:.9g}  {args.weights[i]}", flush=True)
        if math.isnan(score.loss):
            warnings.warn(_nan_loss_note(args.weights[i], i), stacklevel=1)

    result = compete(args.weights, data, args.seed, target=target, keys=keys,
                     framework=args.framework, device=args.device,
                     sig_reg_config=SIGRegConfig(), max_seq_len=args.max_seq_len,
                     batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                     progress=show_progress, batch_order_range=args.range, on_score=report)
    if args.json:
        scores = [_score_json(p, s) for p, s in zip(args.weights, result.scores)]
        if not many and target is None:
            _print_json(scores[0])
            return 0
        _print_json({"scores": scores, "competition": {
            "winner": result.winner, "winner_weights": args.weights[result.winner],
            "loss": _finite_or_none(result.loss),
            "distance": _finite_or_none(result.distance),
            "losses": [_finite_or_none(x) for x in result.losses]}})
        return 0
    if not many:
        s = result.scores[0]
        print(f"loss       {s.loss:.9g}")
        print(f"embedding  {_embedding_summary(s.embedding)}")
    else:
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


# --------------------------------------------------------------------------- validate

def cmd_validate(args: argparse.Namespace) -> int:
    from soma_models.v1.validation import validate

    keys = _keys_for(args.weights, args.key)
    protocol = getattr(args, "protocol", None)
    reports = [validate(path, key=key, protocol=protocol) for path, key in zip(args.weights, keys)]
    if args.json:
        _print_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            print(r)
    # Refused files, and accepted ones whose loss would be NaN, fail the check.
    return 0 if all(r.ok and not r.non_finite for r in reports) else 1


# --------------------------------------------------------------------------- inspect

def _read_header(path: Path, key: str | None, hint: str = "") -> Any:
    """The header of `path` (decrypted with `key` when given; only the header is read).
    A file that does not decrypt to safetensors gets a wrong-key hint."""
    from soma_models.errors import WeightsFormatError
    from soma_models.safetensors_io import read_header
    from soma_models.v1.transit import apply_ctr

    hint = hint or ("wrong key?" if key is not None else "")
    decode = None if key is None else (lambda data: apply_ctr(data, key))
    try:
        header, problems = read_header(path, decode=decode)
    except WeightsFormatError as exc:
        problems = exc.problems
    if problems:
        suffix = f" ({hint})" if hint else ""
        raise WeightsFormatError(str(path), [p + suffix for p in problems])
    return header


def _key_arg(text: str | None, option: str = "--key") -> str | None:
    """A key given on the command line, as hex; errors name the option (never the key)."""
    from soma_models.v1.transit import parse_key

    if text is None:
        return None
    try:
        return parse_key(text).hex()
    except ValueError as exc:
        raise UserError(f"{option}: {exc}") from None


def cmd_inspect(args: argparse.Namespace) -> int:
    from soma_models.v1.schema import heads_from_metadata, infer_config, parameter_count
    from soma_models.v1.transit import file_commitment

    path = Path(args.weights)
    key = _key_arg(args.key)
    size = path.stat().st_size
    weights = _read_header(path, key, hint="" if key else "encrypted? pass its --key")
    digest = file_commitment(path)
    shapes = {k: i.shape for k, i in weights.tensors.items()}
    config = infer_config(shapes, source=str(path),
                          num_heads=heads_from_metadata(weights.metadata))
    stored = sum(math.prod(i.shape) for i in weights.tensors.values())
    info = {"weights": str(path), "file_bytes": size, "commitment": digest,
            "tensors": len(weights.tensors), "stored_values": stored,
            "parameters": parameter_count(config), "config": config.to_dict(),
            "metadata": weights.metadata,
            "dtypes": sorted({i.dtype for i in weights.tensors.values()})}
    if args.json:
        _print_json(info)
        return 0
    print(f"file        {path} ({size:,} bytes)")
    print(f"commitment  {digest} (blake2b-256 of the file's bytes)")
    print(f"tensors     {len(weights.tensors)} ({', '.join(info['dtypes'])}), "
          f"{stored:,} stored values")
    print(f"parameters  {parameter_count(config):,} (V1 layout)")
    print(f"config      embedding_dim {config.embedding_dim}, num_layers {config.num_layers}, "
          f"num_heads {config.num_heads}, pwff_hidden_dim {config.pwff_hidden_dim}, "
          f"vocab_size {config.vocab_size}")
    if "soma_models.num_heads" not in weights.metadata:
        print("            (num_heads is not in the file's metadata: V1's 8 assumed)")
    return 0


# --------------------------------------------------------------------------- init

def cmd_init(args: argparse.Namespace) -> int:
    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights

    base = preset(args.config)
    sizes = {name: getattr(args, name) for name in
             ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim", "vocab_size")
             if getattr(args, name) is not None}
    config = type(base)(**{**base.to_dict(), **sizes})
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UserError(f"{output}: already exists (use --force to overwrite)")
    write_initial_weights(output, config, seed=args.seed)
    from soma_models.v1.schema import parameter_count

    print(f"wrote {output} ({output.stat().st_size:,} bytes, "
          f"{parameter_count(config):,} parameters, seed {args.seed})")
    return 0


# --------------------------------------------------------------------------- encrypt / decrypt

def _transform_file(args: argparse.Namespace, key: str) -> None:
    from soma_models.atomic import atomic_write
    from soma_models.v1.transit import iter_ctr_file

    source, output = Path(args.input), Path(args.output)
    if output.exists():
        if output.resolve() == source.resolve():
            raise UserError(f"-o {output}: output would overwrite the input {source}")
        if not args.force:
            raise UserError(f"-o {output}: already exists (use --force to overwrite)")
    atomic_write(output, iter_ctr_file(source, key))


def cmd_encrypt(args: argparse.Namespace) -> int:
    import secrets

    from soma_models.v1.transit import KEY_BYTES, file_commitment

    key = _key_arg(args.key) or secrets.token_bytes(KEY_BYTES).hex()
    _transform_file(args, key)
    print(f"key         {key}")
    print(f"commitment  {file_commitment(args.output)} (of the encrypted file)")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    key = _key_arg(args.key)
    assert key is not None  # --key is required
    if not args.raw:
        # Only the header is decrypted to check the key before writing anything.
        _read_header(Path(args.input), key,
                     hint="wrong key? use --raw to decrypt arbitrary bytes")
    _transform_file(args, key)
    print(f"wrote {args.output}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; `command` (the chosen subcommand, if known) decides whether the
    trainer's own arguments are loaded."""
    from soma_models.v1.configs import PRESETS, V1_BATCH_SIZE, V1_MAX_SEQ_LEN

    parser = Parser(
        prog=PROG, description="Score, check and prepare Soma V1 model weights exactly as the "
                               "chain does.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("score", help="score weights on data as the chain does (loss, embedding)",
                       description="Score one or more weights files on the same data and seed. "
                                   "With several files (or a --target) the competition result "
                                   "is printed too: lowest loss wins.")
    p.add_argument("weights", nargs="+", type=input_file, help="safetensors weights file(s)")
    p.add_argument("--data", required=True, type=input_file, help="data file (raw bytes)")
    p.add_argument("--seed", required=True, type=seed, help="u64 scoring seed")
    p.add_argument("--target", help="target embedding: a file (.npy, JSON list, or numbers) "
                                    "or an inline comma-separated list")
    p.add_argument("--key", action="append", metavar="HEX",
                   help="AES-256-CTR key (64 hex) of an encrypted file; repeat once per file, "
                        "in order ('none' for an unencrypted one)")
    p.add_argument("--framework", choices=("torch", "flax"), default="torch")
    p.add_argument("--device", default=None, type=device,
                   help="torch device, e.g. cuda (default: cpu)")
    p.add_argument("--micro-batch-size", type=micro_batch, default="auto", metavar="N|auto",
                   help="rows per forward pass; bounds memory, not the result (default auto)")
    p.add_argument("--range", action="store_true",
                   help="also report the loss range over the chain loader's batch orders")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-seq-len", type=positive_int, default=V1_MAX_SEQ_LEN,
                   help=f"experiments only; the chain uses {V1_MAX_SEQ_LEN}")
    p.add_argument("--batch-size", type=positive_int, default=V1_BATCH_SIZE,
                   help=f"experiments only; the chain uses {V1_BATCH_SIZE}")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("validate", help="check weights files as the chain will load them",
                       description="Report every problem of each file, separating what makes "
                                   "the runtime refuse it (format, header, keys, shapes, "
                                   "unmapped dtypes, too few layers) from what it accepts but "
                                   "scores other than the file suggests (NaN/Inf values, extra "
                                   "layers, converted dtypes). Exit status 1 if a file is "
                                   "refused or holds NaN/Inf values.")
    p.add_argument("weights", nargs="+", type=input_file)
    p.add_argument("--key", action="append", metavar="HEX",
                   help="decryption key, once per file ('none' for an unencrypted one)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("inspect", help="show a weights file's config, size and commitment")
    p.add_argument("weights", type=input_file)
    p.add_argument("--key", metavar="HEX", help="decryption key if the file is encrypted "
                                                "(the commitment is of the file as stored)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("init", help="write freshly initialised weights",
                       description="Write fresh weights of a preset, optionally with custom "
                                   "sizes, tensor by tensor (the full V1 needs no more memory "
                                   "than its largest tensor).")
    p.add_argument("output", type=output_file)
    p.add_argument("--config", choices=sorted(PRESETS), default="v1",
                   help="size preset (default v1, the on-chain architecture: 6.4 GB)")
    for name in ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim", "vocab_size"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=positive_int,
                       help="override the preset's value")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("encrypt", help="encrypt a file with AES-256-CTR for publication")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="HEX", help="64-hex key (default: a random one, printed)")
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("decrypt", help="decrypt an AES-256-CTR encrypted file")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="HEX", required=True)
    p.add_argument("--raw", action="store_true",
                   help="do not check that the result is a safetensors file")
    p.set_defaults(func=cmd_decrypt)

    _add_train(sub, command)
    return parser


def _add_train(sub: argparse._SubParsersAction, command: str | None) -> None:
    """`soma-models train`, from `soma_models.train` when it is installed.

    The trainer imports its framework when imported, so it is only loaded when `train` is
    the command; otherwise a light entry keeps it listed in `--help`.
    """
    if command == "train":
        try:
            from soma_models.train.cli import register
        except ImportError:
            return
        register(sub)
    elif importlib.util.find_spec("soma_models.train") is not None:
        sub.add_parser("train", help="train a model (see: soma-models train --help)",
                       add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    return run(args.func, args, PROG)


if __name__ == "__main__":
    sys.exit(main())
