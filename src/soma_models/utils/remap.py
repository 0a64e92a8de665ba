"""Rename and delete keys of a dict in place (the published soma-models' helper)."""

from __future__ import annotations

from typing import Any


def remap(d: dict[str, Any], rename_map: dict[str, str], keys_to_delete: list[str]) -> None:
    """Rename `d`'s keys by `rename_map` (old -> new, applied in order), then delete
    `keys_to_delete`. Both change `d` in place; keys that are absent are skipped. A rename
    onto an existing key replaces its value; a renamed key moves to the end of `d`.
    """
    for old, new in rename_map.items():
        if old in d:
            d[new] = d.pop(old)
    for key in keys_to_delete:
        d.pop(key, None)
