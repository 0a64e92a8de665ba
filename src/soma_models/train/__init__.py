"""Training V1-architecture models on raw bytes, scored exactly as the chain scores them.

    from soma_models.train import TrainConfig, train
    result = train(TrainConfig(data=["corpus/"], config="small", seq_len=512, steps=2000,
                               out_dir="runs/small"))
    print(result.val_ce, result.score, result.weights)

The command line is `soma-models train` (see `soma_models.train.cli`); multi-process
runs go through torchrun (`soma_models.train.distributed`).

The names below load on first use (as in `soma_models.v1`), so that
`python -m soma_models.train` can report a bad `SOMA_MODELS_PROTOCOL` in one line before
anything builds the configs.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module("soma_models.train.trainer"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soma_models.train' has no attribute {name!r}")
