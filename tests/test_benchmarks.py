"""`benchmarks/bench.py --quick` runs to the end and prints its four sections.

A smoke test only: no timing is asserted (CI machines vary); the script itself refuses
to report when the fast and straightforward paths disagree on the loss.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_quick_benchmark_prints_every_section() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("== eval:", "== eval-0.1.7:", "== scaling:", "== train:"):
        assert heading in out, out
    assert "plain float32 matmul" in out
    assert "ours / straightforward: wall" in out
    assert "trainer / nanoGPT tokens/s" in out
    # The scaling table has one row per quick sequence length.
    rows = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert {"256", "512"} <= set(rows), out


def test_profile_step_counts_kernels_per_block() -> None:
    script = BENCH.parent / "profile_step.py"
    done = subprocess.run([sys.executable, str(script), "--dim", "32", "--seq", "16"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("== ours, float32", "== nanoGPT, float32", "== ours, bf16 autocast",
                    "== nanoGPT, bf16 autocast"):
        assert heading in out, out
    blocks = [int(line.rsplit(":", 1)[1]) for line in out.splitlines()
              if line.startswith("leaf operators")]
    assert len(blocks) == 4 and all(n > 0 for n in blocks), out


def test_bench_rope_checks_and_times_both_rotations() -> None:
    script = BENCH.parent / "bench_rope.py"
    done = subprocess.run([sys.executable, str(script), "--batch", "1", "--seq", "16",
                           "--heads", "2", "--head-dim", "8", "--repeats", "2"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if "rotate / half-split" in line]
    assert [row.split()[0] for row in rows] == ["torch.float32", "torch.bfloat16"], done.stdout


def test_bench_flax_checks_and_times_both_frameworks() -> None:
    """bench_flax --quick --sections step: the Flax and torch steps agree on the first loss
    (the script stops otherwise) and both get a speed and a ratio."""
    script = BENCH.parent / "bench_flax.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--sections", "step"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "flax / torch tokens/s:" in done.stdout, done.stdout
    assert [line.split()[0] for line in done.stdout.splitlines()
            if "s/step" in line and "tokens/s" in line] == ["torch", "flax"], done.stdout


def test_profile_flax_step_splits_both_steps() -> None:
    """profile_flax_step --quick: both steps run and are profiled, and the table names
    Flax's kernels (forward, backward and update each get time: the dumped HLO named
    them) beside torch's."""
    script = BENCH.parent / "profile_flax_step.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--one-thread"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "flax / torch tokens/s:" in out, out
    totals = {line.split(",")[0]: [float(x) for x in line.split()[2:6:2]]
              for line in out.splitlines() if line.startswith(("forward,", "backward,",
                                                                "update,"))}
    assert set(totals) == {"forward", "backward", "update"}, out
    assert all(flax > 0 and torch > 0 for flax, torch in totals.values()), out


def test_memory_estimate_checkpointing_holds_less() -> None:
    """memory_estimate --quick: both rows positive, and checkpointing holds fewer bytes
    per block and in total than the plain forward (the two are measured, not set)."""
    script = BENCH.parent / "memory_estimate.py"
    done = subprocess.run([sys.executable, str(script), "--quick"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line[:24].strip(): [float(x) for x in line[24:].split()[:7]]
            for line in done.stdout.splitlines()
            if line.startswith(("without checkpointing", "with checkpointing"))}
    without, with_ = rows["without checkpointing"], rows["with checkpointing"]
    per_block, total = 0, 5
    assert 0 < with_[per_block] < without[per_block], done.stdout
    assert 0 < with_[total] < without[total], done.stdout
    # The optimizer state (column 4) is the same model's either way.
    assert with_[4] == without[4] > 0, done.stdout
