"""PyTorch implementation of V1.

The names of the published soma-models' quickstart are importable from here:
`from soma_models.v1.torch import Model, ModelConfig, SIGReg, SIGRegConfig, compute_loss`.
"""

from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.torch.loss import compute_loss
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.sig_reg import SIGReg

__all__ = ["Model", "ModelConfig", "SIGReg", "SIGRegConfig", "compute_loss"]
