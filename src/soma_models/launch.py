"""Entry point of the `soma-models` command.

Checks `SOMA_MODELS_PROTOCOL` before anything imports `soma_models.v1.configs` (whose
constants follow the revision it names), so that a bad value is one line on stderr with
exit status 2 instead of an import traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from soma_models.v1.revisions import UnknownProtocolError, default_revision

    try:
        default_revision()
    except UnknownProtocolError as exc:
        print(f"soma-models: error: {exc}", file=sys.stderr)
        return 2
    from soma_models.cli import main as run

    return run(argv)
