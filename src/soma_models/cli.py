"""The `soma-models` command: score, screen, validate, inspect, init, encrypt, decrypt,
publish (and train).

`--protocol` picks the revision of V1 ("0.1.7", alias "latest": the network; "0.1.1": the
product page); without it `SOMA_MODELS_PROTOCOL`, else "0.1.7". Every output names it.

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
    out: dict[str, Any] = {"weights": path, "protocol": score.protocol,
                           "loss": _finite_or_none(score.loss),
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


def _protocol(text: str) -> str:
    """A revision name or alias, checked (argparse type)."""
    from soma_models.v1.revisions import UnknownProtocolError, lookup

    try:
        return lookup(text.strip()).name
    except UnknownProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _revision(args: argparse.Namespace) -> Any:
    """The revision this command uses: --protocol, else SOMA_MODELS_PROTOCOL, else 0.1.7."""
    from soma_models.v1.revisions import resolve

    return resolve(getattr(args, "protocol", None))


def _revision_line(revision: Any) -> str:
    return f"protocol   {revision.name}: {revision.summary}"


def _add_protocol(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--protocol", type=_protocol, default=None, metavar="REVISION",
                   help=f"revision of V1 {what}: 0.1.7 (alias latest; the network since "
                        "2026-02-23) or 0.1.1 (the product page). Default: "
                        "$SOMA_MODELS_PROTOCOL, else 0.1.7")


def _add_scoring_options(p: argparse.ArgumentParser, pass_rows: str = "rows per forward pass"
                         ) -> None:
    """--framework, --device and --micro-batch-size: how a scoring run computes."""
    p.add_argument("--framework", choices=("torch", "flax"), default="torch")
    p.add_argument("--device", default=None, type=device,
                   help="torch device, e.g. cuda (default: cpu); scoring runs in float32 "
                        "with TF32 off")
    p.add_argument("--micro-batch-size", type=micro_batch, default="auto", metavar="N|auto",
                   help=f"{pass_rows}; bounds memory, not the result (default auto: about "
                        "2 GiB of activations on an accelerator, 2-4 rows on a CPU)")


# --------------------------------------------------------------------------- score

def cmd_score(args: argparse.Namespace) -> int:
    from soma_models.v1.configs import SIGRegConfig
    from soma_models.v1.scoring import NaNLossWarning, compete

    revision = _revision(args)
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

    # compete() warns about NaN losses too; here each file gets its own line (report above).
    warnings.filterwarnings("ignore", category=NaNLossWarning)
    result = compete(args.weights, data, args.seed, target=target, keys=keys,
                     framework=args.framework, device=args.device,
                     sig_reg_config=SIGRegConfig.for_protocol(revision),
                     max_seq_len=args.max_seq_len, batch_size=args.batch_size,
                     micro_batch_size=args.micro_batch_size, progress=show_progress,
                     batch_order_range=args.range, on_score=report, protocol=revision)
    if args.json:
        scores = [_score_json(p, s) for p, s in zip(args.weights, result.scores)]
        if not many and target is None:
            _print_json(scores[0])
            return 0
        _print_json({"protocol": revision.name, "scores": scores, "competition": {
            "winner": result.winner, "winner_weights": args.weights[result.winner],
            "loss": _finite_or_none(result.loss),
            "distance": _finite_or_none(result.distance),
            "losses": [_finite_or_none(x) for x in result.losses]}})
        return 0
    if not many:
        s = result.scores[0]
        print(_revision_line(revision))
        print(f"loss       {s.loss:.9g}")
        print(f"embedding  {_embedding_summary(s.embedding)}")
    else:
        print(_revision_line(revision))
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


# --------------------------------------------------------------------------- screen

def cmd_screen(args: argparse.Namespace) -> int:
    from soma_models.v1.screening import Screener, find_samples, load_targets, screen_to_jsonl

    keys = _keys_for(args.models, args.key)
    samples = find_samples(args.data, exclude=[args.out] if args.out else [])
    screener = Screener(args.models, load_targets(args.targets), args.seed, keys=keys,
                        protocol=args.protocol, framework=args.framework, device=args.device,
                        micro_batch_size=args.micro_batch_size, threshold=args.threshold)
    summary = screen_to_jsonl(screener, samples, args.out, embeddings=args.embeddings,
                              progress=not args.quiet and sys.stderr.isatty())
    print(summary, file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- validate

def cmd_validate(args: argparse.Namespace) -> int:

    from soma_models.v1.validation import validate

    revision = _revision(args)
    keys = _keys_for(args.weights, args.key)
    reports = [validate(path, key=key, protocol=revision)
               for path, key in zip(args.weights, keys)]
    if args.json:
        _print_json([r.to_dict() for r in reports])
    else:
        print(_revision_line(revision))
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
    from soma_models.v1.schema import (
        heads_from_metadata,
        infer_config,
        parameter_count,
        recorded_protocol,
    )
    from soma_models.v1.transit import file_commitment

    revision = _revision(args)
    path = Path(args.weights)
    key = _key_arg(args.key)
    size = path.stat().st_size
    weights = _read_header(path, key, hint="" if key else "encrypted? pass its --key")
    digest = file_commitment(path, protocol=revision)
    shapes = {k: i.shape for k, i in weights.tensors.items()}
    config = infer_config(shapes, source=str(path),
                          num_heads=heads_from_metadata(weights.metadata))
    stored = sum(math.prod(i.shape) for i in weights.tensors.values())
    recorded = recorded_protocol(weights.metadata)
    info = {"weights": str(path), "protocol": revision.name, "recorded_protocol": recorded,
            "file_bytes": size, "commitment": digest,
            "tensors": len(weights.tensors), "stored_values": stored,
            "parameters": parameter_count(config), "config": config.to_dict(),
            "metadata": weights.metadata,
            "dtypes": sorted({i.dtype for i in weights.tensors.values()})}
    if args.json:
        _print_json(info)
        return 0
    print(f"protocol    {revision.name}: {revision.summary}; the file records "
          f"{recorded if recorded else 'no revision'}")
    print(f"file        {path} ({size:,} bytes)")
    print(f"commitment  {digest} (blake2b-256 of the file's bytes, "
          f"{'Base58' if revision.text_encoding == 'base58' else 'hex'})")
    print(f"tensors     {len(weights.tensors)} ({', '.join(info['dtypes'])}), "
          f"{stored:,} stored values")
    print(f"parameters  {parameter_count(config):,} (V1 layout)")
    print(f"config      embedding_dim {config.embedding_dim}, num_layers {config.num_layers}, "
          f"num_heads {config.num_heads}, pwff_hidden_dim {config.pwff_hidden_dim}, "
          f"vocab_size {config.vocab_size}")
    if "soma_models.num_heads" not in weights.metadata:
        print("            (num_heads is not in the file's metadata: V1's 8 assumed)")
    if config.embedding_dim == 2048 and config.num_layers != revision.num_layers:
        print(f"            (the {revision.name} runtime uses {revision.num_layers} layers)")
    return 0


# --------------------------------------------------------------------------- init

def cmd_init(args: argparse.Namespace) -> int:
    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights

    revision = _revision(args)
    base = preset(args.config, revision)
    sizes = {name: getattr(args, name) for name in
             ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim", "vocab_size")
             if getattr(args, name) is not None}
    config = type(base)(**{**base.to_dict(), **sizes})
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UserError(f"{output}: already exists (use --force to overwrite)")
    write_initial_weights(output, config, seed=args.seed, protocol=revision)
    from soma_models.v1.schema import parameter_count

    print(f"wrote {output} ({output.stat().st_size:,} bytes, "
          f"{parameter_count(config):,} parameters, {config.num_layers} layers, seed "
          f"{args.seed}, protocol {revision.name})")
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
    from soma_models.v1.transit import encode_text, file_commitment, new_key

    revision = _revision(args)
    key = _key_arg(args.key)
    raw_key = bytes.fromhex(key) if key else new_key()
    _transform_file(args, raw_key.hex())
    print(f"protocol    {revision.name} (keys and hashes in "
          f"{'Base58' if revision.text_encoding == 'base58' else 'hex'})")
    print(f"key         {encode_text(raw_key, revision)}")
    print(f"commitment  {file_commitment(args.output, protocol=revision)} "
          "(of the encrypted file)")
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


# --------------------------------------------------------------------------- publish

def cmd_publish(args: argparse.Namespace) -> int:
    from soma_models.v1.registration import MANIFEST_NAME, publish

    revision = _revision(args)
    data = _read_data(args.data)
    manifest = publish(args.weights, data, args.output, key=_key_arg(args.key),
                       protocol=revision, framework=args.framework, device=args.device,
                       micro_batch_size=args.micro_batch_size,
                       progress=not args.quiet and sys.stderr.isatty(),
                       any_width=args.any_width)
    if args.json:
        _print_json(manifest.to_dict())
        return 0
    output = Path(args.output)
    print(_revision_line(revision))
    print(f"wrote      {output / manifest.weights_file} ({manifest.size:,} bytes, encrypted)")
    print(f"           {output / MANIFEST_NAME} (holds the decryption key: keep it secret "
          "until you reveal)")
    print(f"checksum   {manifest.checksum}")
    print(f"embedding  {_embedding_summary(manifest.embedding)} on {args.data}, seed 0")
    print(f"embedding commitment  {manifest.embedding_commitment}")
    print(f"key commitment        {manifest.decryption_key_commitment}")
    return 0


# --------------------------------------------------------------------------- parser

def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command's parser; `command` (the chosen subcommand, if known) decides whether the
    trainer's own arguments are loaded."""
    from soma_models.v1.configs import PRESETS
    from soma_models.v1.revisions import REVISIONS

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
    p.add_argument("--key", action="append", metavar="KEY",
                   help="AES-256-CTR key (Base58, or 64 hex) of an encrypted file; repeat once "
                        "per file, in order ('none' for an unencrypted one)")
    _add_scoring_options(p)
    p.add_argument("--range", action="store_true",
                   help="also report the loss range over the chain loader's batch orders")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_protocol(p, "to score as")
    seq_lens = ", ".join(f"{r.max_seq_len} under {n}" for n, r in REVISIONS.items())
    batches = ", ".join(f"{r.batch_size} under {n}" for n, r in REVISIONS.items())
    p.add_argument("--max-seq-len", type=positive_int, default=None,
                   help=f"experiments only; default the revision's ({seq_lens})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"experiments only; default the revision's ({batches})")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("screen", help="screen many data samples against a target's models",
                       description="For every sample (each file is one sample), run the "
                                   "chain's competition among the models (each scored on the "
                                   "sample alone, lowest loss wins) and write one JSON line "
                                   "with the losses, the winner and its cosine distance to "
                                   "every target. Rerunning with the same --out skips the "
                                   "samples it already holds; an --out written by another "
                                   "screening (other models, targets, seed or revision) is "
                                   "refused.")
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
    p.add_argument("--out", default=None, type=output_file,
                   help="JSONL output file (default stdout); an existing one is resumed")
    _add_protocol(p, "to screen under (contract, SIGReg slices, key format)")
    p.add_argument("--embeddings", action="store_true",
                   help="also write the winner's embedding")
    _add_scoring_options(p, "rows per forward pass, across samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_screen)

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
    _add_protocol(p, "to check against")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("inspect", help="show a weights file's config, size and commitment")
    p.add_argument("weights", type=input_file)
    p.add_argument("--key", metavar="KEY", help="decryption key (Base58 or 64 hex) if the file "
                                                "is encrypted (the commitment is of the file "
                                                "as stored)")
    p.add_argument("--json", action="store_true")
    _add_protocol(p, "to report for (it sets the commitment's encoding)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("init", help="write freshly initialised weights",
                       description="Write fresh weights of a preset, optionally with custom "
                                   "sizes, tensor by tensor (the full V1 needs no more memory "
                                   "than its largest tensor).")
    p.add_argument("output", type=output_file)
    p.add_argument("--config", choices=sorted(PRESETS), default="v1",
                   help="size preset (default v1, the on-chain architecture of the revision: "
                        "24 layers, 4.8 GB under 0.1.7; 32 layers, 6.4 GB under 0.1.1)")
    for name in ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim", "vocab_size"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=positive_int,
                       help="override the preset's value")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    _add_protocol(p, "whose V1 to write (the file records it)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("encrypt", help="encrypt a file with AES-256-CTR for publication")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="KEY", help="key, Base58 or 64 hex (default: a random one, "
                                                "printed)")
    _add_protocol(p, "whose text encoding (Base58 or hex) the key and commitment are printed in")
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("decrypt", help="decrypt an AES-256-CTR encrypted file")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="KEY", required=True, help="key, Base58 or 64 hex")
    p.add_argument("--raw", action="store_true",
                   help="do not check that the result is a safetensors file")
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser(
        "publish", help="get trained weights ready for registration (offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate WEIGHTS for the revision, encrypt them with AES-256-CTR (a "
                    "fresh random key\nunless --key is given) into DIR/, and write "
                    "DIR/manifest.json: the encrypted file's\nname, checksum and size, the "
                    "decryption key, the embedding and the embedding and key\ncommitments "
                    "-- what the network's commit_model and reveal_model take. Nothing is\n"
                    "uploaded and no chain is contacted. Keep DIR/manifest.json secret until "
                    "you reveal:\nit holds the key.\n\n"
                    "The embedding is the running-mean embedding of the weights on DATA with "
                    "seed 0,\ncomputed exactly as the chain scores. The chain assigns models "
                    "to targets by the\ndistance between their registered embedding and the "
                    "targets, so DATA should be\nrepresentative of what the model is for (a "
                    "sample of the data it was trained on and\nis good at), not a single "
                    "training micro-batch.")
    p.add_argument("weights", type=input_file, help="plain safetensors weights file")
    p.add_argument("--data", required=True, type=input_file,
                   help="data representative of what the model is for (raw bytes)")
    p.add_argument("--key", metavar="KEY", help="AES-256 key, Base58 or 64 hex (default: a "
                                                "fresh random one)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output folder; must not exist yet (or be empty)")
    _add_scoring_options(p)
    p.add_argument("--any-width", action="store_true",
                   help="publish weights that are not the network's V1 width, for a local "
                        "test (the runtime rejects them)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_protocol(p, "to publish for (scoring settings, Base58 or hex)")
    p.set_defaults(func=cmd_publish)

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
