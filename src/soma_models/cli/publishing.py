"""`soma-models publish`: trained weights made ready for registration, offline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from soma_models.cli.shared import (
    add_protocol,
    add_scoring_options,
    embedding_summary,
    print_json,
    revision_line,
    revision_of,
)
from soma_models.cli_common import input_file
from soma_models.v1.inputs import parse_key_arg, read_data


def cmd_publish(args: argparse.Namespace) -> int:
    from soma_models.v1.registration import MANIFEST_NAME, publish

    revision = revision_of(args)
    data = read_data(args.data)
    manifest = publish(args.weights, data, args.output, key=parse_key_arg(args.key),
                       protocol=revision, framework=args.framework, device=args.device,
                       micro_batch_size=args.micro_batch_size,
                       progress=not args.quiet and sys.stderr.isatty(),
                       any_width=args.any_width)
    if args.json:
        print_json(manifest.to_dict())
        return 0
    output = Path(args.output)
    print(revision_line(revision))
    print(f"wrote      {output / manifest.weights_file} ({manifest.size:,} bytes, encrypted)")
    print(f"           {output / MANIFEST_NAME} (holds the decryption key: keep it secret "
          "until you reveal)")
    print(f"checksum   {manifest.checksum}")
    print(f"embedding  {embedding_summary(manifest.embedding)} on {args.data}, seed 0")
    print(f"embedding commitment  {manifest.embedding_commitment}")
    print(f"key commitment        {manifest.decryption_key_commitment}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `publish` to the `soma-models` command's subparsers."""
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
    add_scoring_options(p)
    p.add_argument("--any-width", action="store_true",
                   help="publish weights that are not the network's V1 width, for a local "
                        "test (the runtime rejects them)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_protocol(p, "to publish for (scoring settings, Base58 or hex)")
    p.set_defaults(func=cmd_publish)
