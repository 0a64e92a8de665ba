"""`soma-models train`, from `soma_models.train` (its options live in
`soma_models.train.cli`).

The trainer imports its framework when imported, so its options are only loaded when
`train` is the command; otherwise a light entry keeps it listed in `--help`.
"""

from __future__ import annotations

import argparse
import importlib.util


def register(sub: argparse._SubParsersAction, command: str | None = None) -> None:
    """Add `train`: the trainer's parser when `command` is "train", else a light entry
    (nothing when `soma_models.train` is not installed)."""
    if command == "train":
        try:
            from soma_models.train.cli import register as register_train
        except ImportError:
            return
        register_train(sub)
    elif importlib.util.find_spec("soma_models.train") is not None:
        sub.add_parser("train", help="train a model (see: soma-models train --help)",
                       add_help=False)
