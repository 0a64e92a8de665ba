"""`soma-models prepare`: raw files, JSONL, Parquet and `datasets` folders -> a corpus that
`soma-models train --data CORPUS/` memory-maps (`soma_models.corpus`)."""

from __future__ import annotations

import argparse
import sys

from soma_models.cli.shared import print_json
from soma_models.cli_common import positive_int


def cmd_prepare(args: argparse.Namespace) -> int:
    from soma_models.corpus import prepare

    result = prepare(args.sources, args.output, text_field=args.text_field,
                     column=args.column, workers=args.workers,
                     shard_bytes=args.shard_mb << 20, overwrite=args.overwrite,
                     progress=not args.quiet and sys.stderr.isatty())
    summary = {"corpus": str(result.out), "documents": result.documents,
               "bytes": result.bytes, "shards": result.shards,
               "empty_documents_skipped": result.empty_skipped,
               "input_bytes": result.input_bytes, "seconds": round(result.seconds, 3),
               "input_mb_per_s": round(result.input_rate / 1e6, 1), "sources": result.sources}
    if args.json:
        print_json(summary)
        return 0
    print(f"prepared  {result.out}: {result.documents:,} documents, {result.bytes:,} bytes in "
          f"{result.shards} shard(s)"
          + (f" ({result.empty_skipped:,} empty documents skipped)" if result.empty_skipped
             else ""))
    print(f"read      {result.input_bytes:,} bytes of input in {result.seconds:.1f} s "
          f"({result.input_rate / 1e6:,.0f} MB/s)")
    print(f"train on  soma-models train --data {result.out} ...")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `prepare` to the `soma-models` command's subparsers."""
    p = sub.add_parser(
        "prepare", help="turn raw files, JSONL, Parquet or a datasets folder into a corpus "
                        "for train --data",
        description="Read SRC... (files and folders, mixed: raw files are one document each; "
                    "*.jsonl one per line, its --text-field; *.parquet one per row, its "
                    "--column; a Hugging Face datasets save_to_disk folder one per row, its "
                    "--column) and write the corpus folder -o: shards of document bytes, an "
                    "offset index and a manifest. The folder appears whole or not at all; "
                    "a killed run leaves nothing that looks like a corpus, and a rerun starts "
                    "over.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="files and folders to read")
    p.add_argument("-o", "--output", required=True, metavar="CORPUS",
                   help="the corpus folder to write (must not exist, or be empty, unless "
                        "--overwrite)")
    p.add_argument("--text-field", default="text", metavar="NAME",
                   help="JSONL: the field holding each document's text (default: text)")
    p.add_argument("--column", default="text", metavar="NAME",
                   help="Parquet and datasets folders: the column holding each document, "
                        "strings or bytes (default: text)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="processes writing shards in parallel (default: one per CPU core)")
    p.add_argument("--shard-mb", type=positive_int, default=256, metavar="MB",
                   help="input per shard, in MiB (default: 256)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing corpus")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
