"""The run folder's lock and occupancy rules, across real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from soma_models.train.run_folder import (
    LOCK_FILE,
    RUN_ENTRIES,
    RunFolderError,
    RunLock,
    Terminated,
    clear_run,
    existing_entries,
    terminate_raises,
)

HOLDER = textwrap.dedent("""
    import sys, time
    from soma_models.train.run_folder import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that takes the lock on `folder` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_and_told_the_holders_pid(tmp_path):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(RunFolderError) as exc:
            RunLock(tmp_path / "run").acquire()
        message = str(exc.value)
        assert f"PID {holder.pid}" in message and "\n" not in message
        assert str(tmp_path / "run") in message
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: the kernel dropped its lock, its file blocks nothing.
    assert (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock(tmp_path / "run") as lock:
        assert lock.held
        assert (tmp_path / "run" / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released: no litter


def test_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    (tmp_path / LOCK_FILE).write_text("999999999\n")  # a PID that cannot exist
    lock = RunLock(tmp_path).acquire()
    lock.release()


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunFolderError, match=f"PID {os.getpid()}"):
        RunLock(tmp_path).acquire()


def test_what_marks_a_run_and_clear_run_keeps_everything_else(tmp_path):
    assert existing_entries(tmp_path) == []
    (tmp_path / "notes.txt").write_text("mine")
    assert existing_entries(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    assert existing_entries(tmp_path) == ["metrics.jsonl", "checkpoints"]
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert set(RUN_ENTRIES) >= {"model.safetensors", "checkpoints", "metrics.jsonl"}


def test_sigterm_raises_inside_terminate_raises_and_not_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), terminate_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted by the handler's exception
    assert signal.getsignal(signal.SIGTERM) == before
