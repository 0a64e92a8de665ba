"""V1 building blocks in PyTorch; one file per part."""

from soma_models.v1.torch.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.torch.modules.encoder import Encoder
from soma_models.v1.torch.modules.layer import Layer
from soma_models.v1.torch.modules.model import Model
from soma_models.v1.torch.modules.pwff import PositionWiseFeedForward
from soma_models.v1.torch.modules.sig_reg import SIGReg

__all__ = ["Encoder", "Layer", "Model", "MultiHeadAttention", "PositionWiseFeedForward",
           "SIGReg", "apply_rope"]
