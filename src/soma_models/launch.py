"""Entry point of the `soma-models` command.

Checks `SOMA_MODELS_PROTOCOL` before anything imports `soma_models.v1.configs` (whose
constants follow the revision it names), so that a bad value is one line on stderr with
exit status 2 instead of an import traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def protocol_problem() -> str | None:
    """The one-line error for a bad `SOMA_MODELS_PROTOCOL`, or None when it is fine."""
    from soma_models.v1.revisions import UnknownProtocolError, default_revision

    try:
        default_revision()
    except UnknownProtocolError as exc:
        return f"soma-models: error: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """`soma-models ...`"""
    if (problem := protocol_problem()) is not None:
        print(problem, file=sys.stderr)
        return 2
    from soma_models.cli import main as run

    return run(argv)


def train_main(argv: Sequence[str] | None = None) -> int:
    """`python -m soma_models.train ...` and `torchrun ... -m soma_models.train ...`"""
    if (problem := protocol_problem()) is not None:
        print(problem, file=sys.stderr)
        return 2
    from soma_models.train.cli import main as run

    return run(argv)
