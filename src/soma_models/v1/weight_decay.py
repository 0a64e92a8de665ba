"""Which parameters AdamW's weight decay applies to, framework-free (one rule for both).

Decay shrinks weights towards 0. That regularises the matrices (the embedding and the
linear weights: schema kinds "embedding" and "linear_weight"), but would pull biases
towards 0 and LayerNorm gains towards 0 instead of their natural 1, so vectors are left
alone. In the V1 schema the matrices are exactly the parameters with two or more axes.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_decayed(shape: Sequence[int]) -> bool:
    """True for a parameter of this shape that AdamW's weight decay should apply to."""
    return len(shape) >= 2
