"""soma_models.atomic: atomic writes that leave no temporary behind, even when killed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from soma_models import atomic
from soma_models.atomic import atomic_write, clean_stale, is_temporary, staging, temporary_path


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def litter(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temporary(p))


def test_atomic_write_writes_bytes_and_arrays(tmp_path):
    dest = tmp_path / "out.bin"
    atomic_write(dest, [b"ab", np.arange(3, dtype="<u2"), memoryview(b"z")])
    assert dest.read_bytes() == b"ab" + np.arange(3, dtype="<u2").tobytes() + b"z"
    assert litter(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_leaves_nothing(tmp_path):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")

    def pieces():
        yield b"partial"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(dest, pieces())
    assert dest.read_bytes() == b"old"
    assert litter(tmp_path) == []


def test_temporary_names_follow_the_pattern(tmp_path):
    tmp = temporary_path(tmp_path / "model.safetensors")
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.")
    assert str(os.getpid()) in tmp.name and is_temporary(tmp)
    assert not is_temporary(tmp_path / "model.safetensors")
    assert not is_temporary(tmp_path / ".model.safetensors.tmp")


def test_clean_stale_removes_only_dead_writers_entries(tmp_path):
    dead = dead_pid()
    stale_file = tmp_path / f".w.safetensors.{dead}-ab12{atomic.SUFFIX}"
    stale_dir = tmp_path / f".step_00000100.{dead}-cd34{atomic.SUFFIX}"
    live = tmp_path / f".w.safetensors.{os.getpid()}-ef56{atomic.SUFFIX}"
    unrelated = tmp_path / ".w.safetensors.1234.tmp"
    stale_file.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"y")
    live.write_bytes(b"z")
    unrelated.write_bytes(b"u")
    removed = clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale_file.name, stale_dir.name])
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and unrelated.exists()


def test_a_folder_moved_aside_by_a_dead_writer_is_put_back_not_removed(tmp_path):
    # A writer killed between "move the old folder aside" and "move the new one in" leaves
    # the old content only under the aside name: the next writer restores it.
    dead = dead_pid()
    aside = tmp_path / f".step_1.{dead}-ab12{atomic.ASIDE_SUFFIX}"
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"old")
    assert is_temporary(aside)
    assert clean_stale(tmp_path) == [aside]
    assert (tmp_path / "step_1" / "model.safetensors").read_bytes() == b"old"
    # Once the destination exists again (the swap had completed), an aside is just litter.
    aside.mkdir()
    assert clean_stale(tmp_path) == [aside]
    assert not aside.exists() and (tmp_path / "step_1" / "model.safetensors").exists()


def test_writer_cleans_stale_litter_of_its_folder(tmp_path):
    stale = tmp_path / f".other.bin.{dead_pid()}-0000{atomic.SUFFIX}"
    stale.write_bytes(b"x" * 100)
    atomic_write(tmp_path / "out.bin", [b"new"])
    assert not stale.exists()


def test_staging_directory_replaces_existing_folder(tmp_path):
    dest = tmp_path / "step_1"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with staging(dest, directory=True) as folder:
        assert folder.is_dir() and is_temporary(folder)
        (folder / "new.txt").write_text("new")
    assert sorted(os.listdir(dest)) == ["new.txt"]
    assert litter(tmp_path) == []


def test_staging_directory_removed_on_error(tmp_path):
    dest = tmp_path / "step_1"
    with pytest.raises(KeyError), staging(dest, directory=True) as folder:
        (folder / "half.bin").write_bytes(b"x")
        raise KeyError("x")
    assert not dest.exists() and litter(tmp_path) == []


def test_errors_name_the_destination_not_the_temporary(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as exc:
        atomic_write(tmp_path / "missing" / "out.bin", [b"x"])
    assert str(tmp_path / "missing" / "out.bin") in str(exc.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError) as exc:
        atomic_write(tmp_path / "folder", [b"x"])
    assert str(exc.value).startswith(str(tmp_path / "folder")) and "soma-tmp" not in str(exc.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="permissions are not enforced for root")
def test_read_only_destination_names_the_destination(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError) as exc:
            atomic_write(folder / "out.bin", [b"x"])
    finally:
        folder.chmod(0o755)
    assert str(folder / "out.bin") in str(exc.value) and "soma-tmp" not in str(exc.value)


def test_read_only_file_is_not_replaced(tmp_path, monkeypatch):
    # Checked through os.access so that it also holds when the tests run as root.
    dest = tmp_path / "ro.bin"
    dest.write_bytes(b"old")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == dest
                        else real_access(p, mode))
    with pytest.raises(PermissionError, match="read-only") as exc:
        atomic_write(dest, [b"new"])
    assert str(dest) in str(exc.value)
    assert dest.read_bytes() == b"old" and litter(tmp_path) == []


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_names_the_destination():
    # /proc exists (and passes the writable check as root) but takes no new file.
    with pytest.raises(OSError) as exc:
        atomic_write("/proc/w.safetensors", [b"x"])
    assert str(exc.value) == ("/proc/w.safetensors: cannot write: folder /proc does not "
                              "take new files")


@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system"),
                                   FileNotFoundError(errno.ENOENT, "No such file or directory")])
def test_creating_the_temporary_fails_naming_the_destination(tmp_path, monkeypatch, error):
    dest = tmp_path / "out.bin"

    def refuse(path, *args, **kwargs):
        error.filename = str(path)
        raise error

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(type(error)) as exc:
        atomic_write(dest, [b"x"])
    message = str(exc.value)
    assert message.startswith(f"{dest}: cannot write: ") and "soma-tmp" not in message
    assert "\n" not in message and exc.value.errno == error.errno


def test_a_failed_write_names_the_destination_and_leaves_nothing(tmp_path, monkeypatch):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as exc:
        atomic_write(dest, [b"new"])
    assert str(exc.value) == f"{dest}: cannot write: no space left on device"
    assert exc.value.errno == errno.ENOSPC
    assert dest.read_bytes() == b"old" and litter(tmp_path) == []


def test_an_error_making_a_piece_is_not_reworded(tmp_path):
    def pieces():
        yield b"x"
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "source.bin")

    with pytest.raises(FileNotFoundError, match="source.bin"):
        atomic_write(tmp_path / "out.bin", pieces())
    assert litter(tmp_path) == []


# --------------------------------------------------------------------------- kills

# The writer child starts from a known SIGINT disposition, whatever this test process
# inherited: a suite started from a background job (`./scripts/test.sh &`, nohup, some CI
# runners) has SIGINT ignored, and an ignored disposition survives exec. argv[2] is
# "default" (what an interactive Python gets: KeyboardInterrupt) or "ignored".
WRITER = r"""
import signal, sys, time
if sys.argv[2] == "default":
    signal.signal(signal.SIGINT, signal.default_int_handler)
else:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
from soma_models.atomic import atomic_write
def pieces():
    yield b"x" * 1000
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    print("writing, SIGINT ignored" if ignored else "writing", flush=True)
    time.sleep(60)
    yield b"y"
atomic_write(sys.argv[1], pieces())
"""


def start_writer(dest: Path, sigint: str = "default", expect: str = "writing"
                 ) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), sigint],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == expect
    assert len(litter(dest.parent)) == 1  # the temporary exists while writing
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_the_temporary_in_flight(tmp_path, signum):
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    proc = start_writer(dest)
    proc.send_signal(signum)
    code = proc.wait(timeout=30)
    assert code != 0
    if signum == signal.SIGTERM:
        assert code == -signal.SIGTERM  # still dies of the signal
    assert litter(tmp_path) == [] and dest.read_bytes() == b"old"


def test_an_inherited_ignored_sigint_stays_ignored_and_sigterm_still_cleans(tmp_path):
    # The launcher asked for immunity to Ctrl-C (a background job): the writer keeps it,
    # so its SIGINT does nothing; SIGTERM still removes the temporary.
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    proc = start_writer(dest, "ignored", expect="writing, SIGINT ignored")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == -signal.SIGTERM
    assert litter(tmp_path) == [] and dest.read_bytes() == b"old"


def test_install_keeps_an_ignored_sigint_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        atomic.install_signal_cleanup()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigkill_litter_is_removed_by_the_next_writer(tmp_path):
    dest = tmp_path / "out.bin"
    proc = start_writer(dest)
    proc.kill()
    proc.wait(timeout=30)
    assert len(litter(tmp_path)) == 1 and not dest.exists()
    atomic_write(dest, [b"done"])
    assert litter(tmp_path) == [] and dest.read_bytes() == b"done"


def init_command(dest: Path) -> list[str]:
    # ~100 MB of float32: long enough to be killed mid-write.
    return [sys.executable, "-m", "soma_models", "init", str(dest), "--config", "tiny",
            "--embedding-dim", "512", "--num-heads", "8", "--num-layers", "8",
            "--pwff-hidden-dim", "2048"]


def kill_init_mid_write(dest: Path, signum: int) -> int:
    proc = subprocess.Popen(init_command(dest), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not litter(dest.parent):
        assert proc.poll() is None, "init finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signum)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_init_leaves_no_litter_after_the_next_writer(tmp_path, signum):
    dest = tmp_path / "w.safetensors"
    code = kill_init_mid_write(dest, signum)
    assert code == -signum and not dest.exists()
    if signum == signal.SIGTERM:
        assert litter(tmp_path) == []  # removed by the handler itself
    else:
        assert len(litter(tmp_path)) == 1  # SIGKILL cannot be caught...
    small = subprocess.run([sys.executable, "-m", "soma_models", "init", str(dest), "--config",
                            "tiny"], capture_output=True, text=True, timeout=300, check=False)
    assert small.returncode == 0, small.stderr
    assert litter(tmp_path) == []  # ...the next writer cleans it up


CHAINED = r"""
import signal, sys, time
from soma_models.atomic import atomic_write
class Stop(Exception):
    pass
def stop(signum, frame):
    raise Stop()
signal.signal(signal.SIGTERM, stop)  # the application's own handler, installed first
def pieces():
    yield b"x"
    print("writing", flush=True)
    time.sleep(60)
    yield b"y"
try:
    atomic_write(sys.argv[1], pieces())
except Stop:
    print("stopped", flush=True)
"""


def test_an_application_handler_still_runs_and_the_temporary_goes(tmp_path):
    dest = tmp_path / "out.bin"
    proc = subprocess.Popen([sys.executable, "-c", CHAINED, str(dest)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "stopped"
    assert proc.wait(timeout=30) == 0
    assert litter(tmp_path) == [] and not dest.exists()
