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
    # Flax rows of (a): JAX's device against JAX's CPU and against torch on the CPU.
    flax_rows = [line for line in out.splitlines() if line.startswith("flax ")
                 and line.endswith(("yes", "NO"))]
    assert len(flax_rows) == 4 and all(line.endswith("yes") for line in flax_rows), out
    assert "== (b) screening throughput" in out and "samples/s" in out
    assert "flax (cpu" in out and "flax / torch samples/s:" in out
    difference = float(out.split("largest relative loss difference flax vs torch ")[1].split()[0])
    assert difference < 1e-5, out
    assert "== (c) bf16 autocast training step" in out
    assert "V1 (ours)" in out and "nanoGPT-style" in out and "tokens/s" in out
    # Every row of (c) ran: ours eager and compiled, the anchor, the network's batch
    # eager, checkpointed and compiled (rows that fail print why instead of numbers).
    rows = [line.split() for line in out.split("== (c)")[1].splitlines()]
    names = {" ".join(r[:-7]) for r in rows if len(r) >= 8 and r[-7].isdigit()
             and (r[-2] == "n/a" or r[-2].endswith("%"))}          # the MFU column
    assert names == {"V1 (ours)", "V1 --compile", "nanoGPT-style", "V1 net batch",
                     "V1 net ckpt", "V1 net --compile", "Flax bf16", "Flax net bf16"}, out
    assert "flax / torch tokens/s (bf16, ours eager):" in out
    assert "ours / nanoGPT-style tokens/s (eager):" in out
    assert "--compile / eager tokens/s:" in out and "compile time, V1 --compile" in out
