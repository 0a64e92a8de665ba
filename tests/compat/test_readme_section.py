"""The README's "Coming from soma-models 0.1.x" example runs as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

from tests.test_readme import python_block


def test_coming_from_0_1_x_example_runs(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", python_block("Coming from soma-models 0.1.x")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    tensors = load_file(tmp_path / "weights.safetensors")
    assert tensors["embedding.weight"].shape == (264, 64)
