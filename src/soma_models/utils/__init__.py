"""Small framework-free helpers kept for code written against soma-models 0.1.x."""

from soma_models.utils.dict import flatten_dict, unflatten_dict
from soma_models.utils.remap import remap

__all__ = ["flatten_dict", "remap", "unflatten_dict"]
