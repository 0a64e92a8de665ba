"""A run folder (`--out`): what marks it as holding a run, and the lock that makes one
run at a time its only writer.

Two runs writing one folder would interleave their metrics and checkpoints, and a run
started over an earlier one would replace that run's model and checkpoints. So the
trainer takes `RunLock` on the folder before it writes anything, and refuses a folder
that already holds a run unless it is resuming it or told to overwrite it. (Temporary
files and staging folders, and what killed writers left of them, are
`soma_models.atomic`'s business.)

The lock is an advisory `flock` on `DIR/.lock`, which holds the holder's PID. The kernel
drops it when its process dies, however it dies, so a lock never outlives its process:
a `.lock` file left by a killed run blocks nothing.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

from typing import Any, Self

from soma_models.atomic import clean_stale
from soma_models.train.checkpoint import has_checkpoint
from soma_models.train.errors import TrainError

LOCK_FILE = ".lock"
#: What a run writes into its folder; any of them present means the folder holds a run.
RUN_ENTRIES = ("run.json", "metrics.jsonl", "summary.json", "model.safetensors", "loss.png",
               "checkpoints")


class RunFolderError(TrainError):
    """The run folder cannot be used as asked; one line naming the folder."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so that cleanup (`finally`, staging removal) runs."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def existing_entries(folder: Path) -> list[str]:
    """The run files in `folder` (empty: it holds no run)."""
    return [name for name in RUN_ENTRIES if (folder / name).exists()]


def clear_run(folder: Path) -> None:
    """Remove a run's own entries from `folder` (and nothing else the user keeps there)."""
    for name in RUN_ENTRIES:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


class RunFolder:
    """The `--out` folder of one run: claimed (locked and checked) by the main process before
    anything is written, released at the end (removed if the run created it and left it
    empty). `checkpoints` is where `soma_models.train.checkpoint` keeps the run's."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock: RunLock | None = None
        self._created = False

    def claim(self, *, resume: bool, overwrite: bool) -> None:
        """Lock the folder and check that this run may write there: a folder that holds a
        run needs `resume` or `overwrite`, and `resume` needs a checkpoint."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out {out}: exists and is not a folder")
        self._created = not out.exists()
        self._lock = RunLock(out).acquire()
        try:
            present = existing_entries(out)
            if resume and not has_checkpoint(self.checkpoints):
                hint = (" (it holds an unfinished run: --overwrite starts over)" if present
                        else "")
                raise RunFolderError(f"--resume: no checkpoint to resume from in "
                                     f"{self.checkpoints}{hint}")
            if present and not resume and not overwrite:
                raise RunFolderError(
                    f"--out {out} already holds a run ({', '.join(present)}); continue it "
                    f"with --resume, replace it with --overwrite, or choose another --out")
        except BaseException:
            self.release()
            raise

    def claim_for_all(self, processes: Any, *, resume: bool, overwrite: bool) -> None:
        """`claim` on the main process of `processes` (an engine: `is_main`, `broadcast`);
        every process learns the outcome and raises if it failed."""
        failure: Exception | None = None
        if processes.is_main:
            try:
                self.claim(resume=resume, overwrite=overwrite)
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it, then raise
                failure = exc
        message = processes.broadcast(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise TrainError(message)

    def tidy(self, *, overwrite: bool) -> None:
        """Lock held: replace an old run (`overwrite`) and remove the temporaries that killed
        writers left (`atomic.staging` also does so on every write)."""
        if overwrite:
            clear_run(self.path)
        clean_stale(self.path)
        if self.checkpoints.is_dir():
            clean_stale(self.checkpoints)

    def release(self) -> None:
        """Unlock (and remove the folder if this run created it and nothing was written)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
            if self._created:
                with contextlib.suppress(OSError):
                    self.path.rmdir()  # only succeeds if nothing was written


class RunLock:
    """Exclusive lock on a run folder: `RunLock(folder).acquire()` ... `.release()`.

    `acquire` never waits: a held lock is a `RunFolderError` naming the holder's PID.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_lock(fd):
                holder = _read_pid(fd)
                os.close(fd)
                who = f"PID {holder}" if holder else "another process"
                raise RunFolderError(
                    f"{self.folder}: another run is using this folder ({who} holds "
                    f"{self.path}); wait for it to finish or choose another --out")
            # `release` unlinks the file while it holds the lock: if that happened between
            # our open and our lock, we hold a lock on a file nobody else can see. Retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __del__(self) -> None:
        # A lock whose owner was dropped without `release` (e.g. a Trainer never run):
        # let it go with the object instead of with the process.
        with contextlib.suppress(Exception):
            self.release()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES, errno.EDEADLK):
            return False
        raise
    return True


def _read_pid(fd: int) -> int | None:
    # The holder writes its PID right after locking: give it a moment if we are early.
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` in the main thread (SIGINT already raises
    KeyboardInterrupt), so that staging folders and temp files are removed on the way out.
    Outside the main thread this does nothing (Python only delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
