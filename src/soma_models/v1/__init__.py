"""V1: the pre-norm byte-level transformer the Soma network scores.

Framework-free pieces live here (configs, tokenizer, schema, noise, scoring);
`soma_models.v1.torch` and `soma_models.v1.flax` hold the two model implementations.
"""

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.schema import ARCHITECTURE_VERSION
from soma_models.v1.tokenizer import tokenize

__all__ = ["ARCHITECTURE_VERSION", "ModelConfig", "SIGRegConfig", "tokenize"]
