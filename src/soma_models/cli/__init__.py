"""The `soma-models` command: score, screen, validate, inspect, init, encrypt, decrypt,
publish, prepare (and train).

`--protocol` picks the revision of V1 ("0.1.7", alias "latest": the network; "0.1.1": the
product page); without it `SOMA_MODELS_PROTOCOL`, else "0.1.7". Every output names it.

Options and paths are checked while the command line is parsed, before any work starts:
a bad one is one line `soma-models: error: argument ...` with exit status 2. Problems met
while working (damaged weights, wrong key, empty data) print one line
`soma-models: error: ...` and exit with status 1; warnings are one line each. Pass
`--debug` (or set SOMA_MODELS_DEBUG=1) to get the full traceback after that line.
Argument types, the error handler and the warning format are shared with `soma-models
train` (`soma_models.cli_common`).

The commands come in families, one module each, every handler beside its own options:
`scoring` (score, screen, validate), `files` (inspect, init, encrypt, decrypt),
`publishing` (publish), `corpus` (prepare) and `training` (train). A family is a module
with a `register(subparsers)` function; adding one is adding it to `FAMILIES`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from soma_models import __version__
from soma_models.cli import corpus, files, publishing, scoring, training
from soma_models.cli.shared import PROG
from soma_models.cli_common import DEBUG_HELP, Parser, run

#: The command families, in the order `--help` lists their commands (`train` comes last).
FAMILIES = (scoring, files, publishing, corpus)


def build_parser(command: str | None = None) -> Parser:
    """The command's parser; `command` (the chosen subcommand, if known) decides whether the
    trainer's own arguments are loaded."""
    parser = Parser(
        prog=PROG, description="Score, check and prepare Soma V1 model weights exactly as the "
                               "chain does.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family in FAMILIES:
        family.register(sub)
    training.register(sub, command)
    # `--debug` is also taken after the command (`soma-models score --debug ...`);
    # SUPPRESS keeps a subcommand from resetting the top-level flag when it is absent.
    for command_parser in sub.choices.values():
        command_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                    help=DEBUG_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    return run(args.func, args, PROG, debug=args.debug)


__all__ = ["FAMILIES", "PROG", "build_parser", "main"]
