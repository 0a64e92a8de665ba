"""Nested dicts <-> flat dicts with joined keys (the published soma-models' helpers)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten_dict(nested_dict: Mapping[str, Any], parent_key: str = "",
                 sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; keys are joined with `sep` under `parent_key`.

    Only non-empty mappings are descended into: an empty dict, a list or an array is a
    value and is kept as it is.
    """
    flat: dict[str, Any] = {}
    for key, value in nested_dict.items():
        joined = f"{parent_key}{sep}{key}" if parent_key else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_dict(value, joined, sep))
        else:
            flat[joined] = value
    return flat


def unflatten_dict(flat_dict: Mapping[str, Any], sep: str = ".") -> dict[str, Any]:
    """`{"a.b": 1}` -> `{"a": {"b": 1}}`, the inverse of `flatten_dict`.

    Raises ValueError when one key is both a value and a prefix of another key
    (`{"a": 1, "a.b": 2}`), naming both. The message starts with "Unflattening conflict",
    as the published package's does (code written against it matches on those words).
    """
    nested: dict[str, Any] = {}
    for key, value in flat_dict.items():
        *parents, leaf = key.split(sep)
        node = nested
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # ValueError, as the published package raises
                prefix = sep.join(parents[: depth + 1])
                raise ValueError(f"Unflattening conflict: key {prefix!r} holds a value, so "
                                 f"{key!r} cannot nest under it")
            node = child
        if isinstance(node.get(leaf), dict) and node[leaf]:
            raise ValueError(f"Unflattening conflict: key {key!r} holds a value and is also "
                             f"the prefix of other keys")
        node[leaf] = value
    return nested
