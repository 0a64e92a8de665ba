"""Modules import downward: each framework's serde sits below its model (no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "soma_models"


def _runtime_imports(path: Path) -> set[str]:
    """Modules imported by `path` outside `if TYPE_CHECKING:` blocks, functions included."""
    tree = ast.parse(path.read_text())
    guards = [node for node in ast.walk(tree)
              if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    skipped = {id(inner) for guard in guards for inner in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_serde_does_not_import_the_model(framework: str) -> None:
    serde = _runtime_imports(SRC / "v1" / framework / "serde.py")
    model = f"soma_models.v1.{framework}.modules.model"
    assert not {name for name in serde if name.startswith(model)}, serde
    assert f"soma_models.v1.{framework}.serde" in _runtime_imports(
        SRC / "v1" / framework / "modules" / "model.py")
