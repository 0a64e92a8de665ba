"""V1 building blocks in Flax NNX; one file per part, mirroring `soma_models.v1.torch.modules`."""

from soma_models.v1.flax.modules.attention import MultiHeadAttention, apply_rope
from soma_models.v1.flax.modules.encoder import Encoder
from soma_models.v1.flax.modules.layer import Layer
from soma_models.v1.flax.modules.model import Model
from soma_models.v1.flax.modules.pwff import PositionWiseFeedForward
from soma_models.v1.flax.modules.sig_reg import SIGReg

__all__ = ["Encoder", "Layer", "Model", "MultiHeadAttention", "PositionWiseFeedForward",
           "SIGReg", "apply_rope"]
