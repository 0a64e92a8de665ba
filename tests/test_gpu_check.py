"""benchmarks/gpu_check.py --quick: every section runs and reports (CI has no GPU, so the
script compares the CPU with itself; the full run is for a CUDA machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_runs_every_section():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick"],
                            capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "== (a) cpu vs cpu scoring deviation" in out
    deviation_rows = [line for line in out.splitlines() if line.startswith(("small", "one layer"))]
    assert len(deviation_rows) == 2 and all(line.endswith("yes") for line in deviation_rows), out
    assert "== (b) screening throughput" in out and "samples/s" in out
    assert "== (c) bf16 autocast training step" in out
    assert "V1 (ours)" in out and "nanoGPT-style" in out and "tokens/s:" in out
