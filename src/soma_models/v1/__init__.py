"""V1: the pre-norm byte-level transformer the Soma network scores.

Framework-free pieces live here (revisions, configs, tokenizer, schema, noise, scoring);
`soma_models.v1.torch` and `soma_models.v1.flax` hold the two model implementations.

The names below load on first use, so that importing a submodule such as
`soma_models.v1.revisions` does not build the configs (which need the revision chosen by
`SOMA_MODELS_PROTOCOL` to be valid).
"""

from __future__ import annotations

import importlib
from typing import Any

from soma_models.v1.revisions import ARCHITECTURE_VERSION

_LAZY = {
    "ModelConfig": "soma_models.v1.configs",
    "SIGRegConfig": "soma_models.v1.configs",
    "tokenize": "soma_models.v1.tokenizer",
    "publish": "soma_models.v1.registration",
}

__all__ = ["ARCHITECTURE_VERSION", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soma_models.v1' has no attribute {name!r}")
