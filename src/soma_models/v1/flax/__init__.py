"""Flax (NNX) implementation of V1, numerically the same as the PyTorch one (SPEC §3).

The names of the published soma-models' quickstart are importable from here:
`from soma_models.v1.flax import Model, ModelConfig, SIGReg, SIGRegConfig, compute_loss`.
"""

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax.loss import compute_loss
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.sig_reg import SIGReg

__all__ = ["Model", "ModelConfig", "SIGReg", "SIGRegConfig", "compute_loss"]
