"""CI runs ruff with the project's settings (pyproject.toml: pyflakes, pycodestyle errors
and the 100-character line length) over the sources, tests and benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    """The ruff next to this Python (the dev extra installs it), else the one on PATH."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    return [found]


def test_ruff_check_is_clean():
    done = subprocess.run([*_ruff(), "check", "--no-cache", "src", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_the_line_length_rule_is_on():
    """A line over 100 characters is reported (the rule is selected, not just configured)."""
    long_line = f"x = {'1 + ' * 40}1\n"
    assert len(long_line) > 101
    done = subprocess.run([*_ruff(), "check", "--no-cache", "--stdin-filename", "src/x.py",
                           "-"], input=long_line, cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1 and "E501" in done.stdout, done.stdout + done.stderr
