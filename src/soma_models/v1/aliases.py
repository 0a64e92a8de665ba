"""Argument names shared with the published soma-models 0.1.x (framework-free).

Our modules call positions `pos_ids` and the model's input `token_ids`; the published
package calls them `positions` and `input` (`inputs`, `context`, `embeddings` for the
blocks). Both spellings are accepted; `pick` resolves one argument given under either.
"""

from __future__ import annotations

from typing import Any


def pick(where: str, ours_name: str, ours: Any, theirs_name: str, theirs: Any) -> Any:
    """The value passed as `ours_name` or as `theirs_name` (None when neither was).

    Raises TypeError when both were given, naming the call (`where`) and both spellings.
    """
    if theirs is None:
        return ours
    if ours is not None:
        raise TypeError(f"{where}: got both {ours_name}= and {theirs_name}= (the same "
                        f"argument under two names); pass one")
    return theirs
