"""`soma-models inspect`, `init`, `encrypt` and `decrypt`: weights files themselves."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from soma_models.cli.shared import add_protocol, print_json, revision_of
from soma_models.cli_common import UserError, input_file, output_file, positive_int, seed
from soma_models.v1.inputs import parse_key_arg

# --------------------------------------------------------------------------- inspect

def _read_header(path: Path, key: bytes | None, hint: str = "") -> Any:
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from soma_models.v1.schema import (
        heads_from_metadata,
        infer_config,
        parameter_count,
        recorded_protocol,
    )
    from soma_models.v1.transit import file_commitment

    revision = revision_of(args)
    path = Path(args.weights)
    key = parse_key_arg(args.key)
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
        print_json(info)
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


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a weights file's config, size and commitment")
    p.add_argument("weights", type=input_file)
    p.add_argument("--key", metavar="KEY", help="decryption key (Base58 or 64 hex) if the file "
                                                "is encrypted (the commitment is of the file "
                                                "as stored)")
    p.add_argument("--json", action="store_true")
    add_protocol(p, "to report for (it sets the commitment's encoding)")
    p.set_defaults(func=cmd_inspect)


# --------------------------------------------------------------------------- init

def cmd_init(args: argparse.Namespace) -> int:
    from soma_models.v1.configs import preset
    from soma_models.v1.initialization import write_initial_weights
    from soma_models.v1.schema import parameter_count

    revision = revision_of(args)
    base = preset(args.config, revision)
    sizes = {name: getattr(args, name) for name in
             ("embedding_dim", "num_layers", "num_heads", "pwff_hidden_dim", "vocab_size")
             if getattr(args, name) is not None}
    config = type(base)(**{**base.to_dict(), **sizes})
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UserError(f"{output}: already exists (use --force to overwrite)")
    write_initial_weights(output, config, seed=args.seed, protocol=revision)
    print(f"wrote {output} ({output.stat().st_size:,} bytes, "
          f"{parameter_count(config):,} parameters, {config.num_layers} layers, seed "
          f"{args.seed}, protocol {revision.name})")
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    from soma_models.v1.configs import PRESETS

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
    add_protocol(p, "whose V1 to write (the file records it)")
    p.set_defaults(func=cmd_init)


# --------------------------------------------------------------------------- encrypt / decrypt

def _transform_file(args: argparse.Namespace, key: bytes) -> None:
    """AES-256-CTR of --input into --output (the same operation both ways), atomically."""
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

    revision = revision_of(args)
    key = parse_key_arg(args.key) or new_key()
    _transform_file(args, key)
    print(f"protocol    {revision.name} (keys and hashes in "
          f"{'Base58' if revision.text_encoding == 'base58' else 'hex'})")
    print(f"key         {encode_text(key, revision)}")
    print(f"commitment  {file_commitment(args.output, protocol=revision)} "
          "(of the encrypted file)")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    key = parse_key_arg(args.key)
    assert key is not None  # --key is required
    if not args.raw:
        # Only the header is decrypted to check the key before writing anything.
        _read_header(Path(args.input), key,
                     hint="wrong key? use --raw to decrypt arbitrary bytes")
    _transform_file(args, key)
    print(f"wrote {args.output}")
    return 0


def _add_encrypt_decrypt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encrypt", help="encrypt a file with AES-256-CTR for publication")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="KEY", help="key, Base58 or 64 hex (default: a random one, "
                                                "printed)")
    add_protocol(p, "whose text encoding (Base58 or hex) the key and commitment are printed in")
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("decrypt", help="decrypt an AES-256-CTR encrypted file")
    p.add_argument("input", type=input_file)
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--key", metavar="KEY", required=True, help="key, Base58 or 64 hex")
    p.add_argument("--raw", action="store_true",
                   help="do not check that the result is a safetensors file")
    p.set_defaults(func=cmd_decrypt)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `inspect`, `init`, `encrypt` and `decrypt` to the `soma-models` subparsers."""
    _add_inspect(sub)
    _add_init(sub)
    _add_encrypt_decrypt(sub)
