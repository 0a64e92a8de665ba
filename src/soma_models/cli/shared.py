"""What several `soma-models` commands share: the revision option and line, the scoring
options, JSON and embedding output. (What `soma-models train` shares with them too, the
argument types and the error handler, is `soma_models.cli_common`; what users hand in,
`soma_models.v1.inputs`.)"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from soma_models.cli_common import device, micro_batch, protocol

PROG = "soma-models"


def revision_of(args: argparse.Namespace) -> Any:
    """The revision this command uses: --protocol, else SOMA_MODELS_PROTOCOL, else 0.1.7."""
    from soma_models.v1.revisions import resolve

    return resolve(getattr(args, "protocol", None))


def revision_line(revision: Any) -> str:
    return f"protocol   {revision.name}: {revision.summary}"


def add_protocol(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--protocol", type=protocol, default=None, metavar="REVISION",
                   help=f"revision of V1 {what}: 0.1.7 (alias latest; the network since "
                        "2026-02-23) or 0.1.1 (the product page). Default: "
                        "$SOMA_MODELS_PROTOCOL, else 0.1.7")


def add_scoring_options(p: argparse.ArgumentParser, pass_rows: str = "rows per forward pass"
                        ) -> None:
    """--framework, --device and --micro-batch-size: how a scoring run computes."""
    p.add_argument("--framework", choices=("torch", "flax"), default="torch")
    p.add_argument("--device", default=None, type=device,
                   help="torch device, e.g. cuda (default: cpu); scoring runs in float32 "
                        "with TF32 off")
    p.add_argument("--micro-batch-size", type=micro_batch, default="auto", metavar="N|auto",
                   help=f"{pass_rows}; bounds memory, not the result (default auto: about "
                        "2 GiB of activations on an accelerator, 2-4 rows on a CPU)")


def print_json(doc: object) -> None:
    print(json.dumps(doc, allow_nan=False))


def embedding_summary(embedding: np.ndarray) -> str:
    head = " ".join(f"{v:.6g}" for v in embedding[:4])
    more = " ..." if embedding.size > 4 else ""
    return f"[{head}{more}] ({embedding.size} values, norm {np.linalg.norm(embedding):.6g})"
