"""Atomic writes without litter: the package's one owner of temporary files and folders.

Everything this package writes (weights, encrypted files, checkpoints, manifests) is first
written under a temporary name in the destination's folder, then renamed onto the
destination, so a reader sees the old content or the new, never a partial one. This
module owns those temporary names and makes sure they do not outlive their writer:

* a normal error (any exception, Ctrl-C included) removes the temporary;
* SIGTERM and SIGINT remove the temporaries in flight before the process goes (handlers
  are installed on first use, from the main thread, and chain to any Python handler that
  was already there, whose exception then unwinds the writer);
* a signal the process inherited as ignored stays ignored. A shell starts a background
  job (`cmd &`, nohup, some CI runners) with SIGINT ignored so that a Ctrl-C meant for the
  foreground does not kill it; installing a handler would undo that choice. Such a
  writer is not stopped by SIGINT, so it leaves nothing behind on SIGINT either; SIGTERM
  (and the fallbacks below) still apply;
* SIGKILL cannot be caught: the next writer into the same folder removes what a dead
  process left (`clean_stale`, called by `staging` itself).

Temporary names are ``.{destination name}.{pid}-{token}.soma-tmp``: hidden, next to the
destination (so the rename stays on one file system), and carrying the writer's PID, so
that only entries whose writer is gone are ever treated as stale. A folder being replaced
is first moved aside as ``.{destination name}.{pid}-{token}.soma-old``; it holds the only
copy of the old content until the new folder is in place, so it is never removed by a
signal, and a stale one is put back when its destination is missing (a writer killed
between the two renames) and removed otherwise.

API:
    staging(dest, directory=False)  context manager: yields the temporary path, renames it
                                    onto `dest` on success, removes it otherwise
    atomic_write(path, pieces)      write bytes / arrays to `path` through `staging`
    clean_stale(folder)             remove temporaries of dead writers in `folder`
    is_temporary(path)              whether a name follows our temporary pattern
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

PathLike = str | os.PathLike

SUFFIX = ".soma-tmp"
ASIDE_SUFFIX = ".soma-old"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]+(?P<suffix>"
                        + re.escape(SUFFIX) + "|" + re.escape(ASIDE_SUFFIX) + ")$")

# Temporaries now being written, by this process (any thread).
_in_flight: set[Path] = set()
_lock = threading.Lock()
_handled: dict[int, Any] = {}  # signal number -> the handler ours replaced


def is_temporary(path: PathLike) -> bool:
    """Whether `path`'s name follows this module's temporary naming pattern."""
    return _TEMP_NAME.match(Path(path).name) is not None


def temporary_path(dest: PathLike, suffix: str = SUFFIX) -> Path:
    """A fresh temporary name next to `dest` (not created)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return True  # cannot tell: keep the entry
    return True


def _remove(path: Path) -> None:
    """Remove a temporary file or folder; a missing one is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: never mask the error that got us here


def clean_stale(folder: PathLike) -> list[Path]:
    """Remove the temporaries in `folder` whose writer process no longer exists.

    A folder a dead writer had moved aside is put back where its destination is missing
    (the writer died between the two renames) instead of being removed. Returns what was
    removed or put back. Entries of live processes (this one included) are kept.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or _pid_alive(int(match.group("pid"))):
            continue
        path = Path(entry.path)
        original = folder / match.group("name")
        if match.group("suffix") == ASIDE_SUFFIX and not original.exists():
            with contextlib.suppress(OSError):
                os.replace(path, original)
        else:
            _remove(path)
        removed.append(path)
    return removed


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _handled.get(signum)
    if callable(previous):
        # A Python handler (e.g. SIGINT's KeyboardInterrupt, or an application's own) runs
        # as before; the exception it raises unwinds `staging`, which removes its temporary.
        previous(signum, frame)
        return
    # The default action kills the process without unwinding anything: remove every
    # temporary in flight (all threads), then die of the same signal, so that the exit
    # status still says what happened.
    with _lock:
        pending = list(_in_flight)
        _in_flight.clear()
    for path in pending:
        _remove(path)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install_signal_cleanup() -> None:
    """Make SIGTERM and SIGINT remove the temporaries in flight. Idempotent.

    A signal whose current handler is a Python function keeps it (we call it first; the
    exception it raises unwinds `staging`); one that kills by default removes every
    temporary in flight, then kills; an ignored signal stays ignored. Only the main thread
    may install signal handlers; from any other thread this does nothing (the next
    writer's `clean_stale` is the fallback).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is _on_signal or current in (signal.SIG_IGN, None):
            continue
        try:
            signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # e.g. embedded interpreters
            continue
        _handled[signum] = current


def _destination_problem(dest: Path, directory: bool) -> OSError | None:
    folder = dest.parent
    if not folder.is_dir():
        return FileNotFoundError(f"{dest}: folder {folder} does not exist")
    if dest.is_dir() and not directory:
        return IsADirectoryError(f"{dest}: is a directory, expected a file name")
    if dest.exists() and directory and not dest.is_dir():
        return NotADirectoryError(f"{dest}: exists and is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        return PermissionError(f"{dest}: cannot write: folder {folder} is not writable")
    if dest.exists() and not dest.is_dir() and not os.access(dest, os.W_OK):
        # Renaming over a read-only file would succeed; refuse as `open(dest, "w")` would.
        return PermissionError(f"{dest}: cannot write: the file is read-only")
    return None


def _about_dest(exc: OSError, dest: Path) -> OSError:
    """`exc` (same type, same errno) reworded as one line naming `dest`, never our hidden
    temporary: the user asked to write `dest` and has never heard of the temporary."""
    if isinstance(exc, FileNotFoundError) and dest.parent.is_dir():
        # The folder exists but no file can be created in it (e.g. /proc).
        reason = f"folder {dest.parent} does not take new files"
    elif exc.strerror:
        reason = exc.strerror[:1].lower() + exc.strerror[1:]
    else:
        reason = str(exc).replace(str(exc.filename), str(dest)) if exc.filename else str(exc)
    reworded = type(exc)(f"{dest}: cannot write: {reason}")
    reworded.errno = exc.errno
    return reworded


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging(dest: PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it replaces `dest` atomically.

    directory=False: the caller creates the file at the yielded path (and should fsync
        it; `atomic_write` does). It is renamed over `dest`.
    directory=True: the yielded folder already exists; the caller fills it. It then
        replaces `dest` (an existing `dest` folder is moved aside first and removed after).
    On any exception, SIGTERM or SIGINT the temporary is removed and `dest` is untouched.
    Stale temporaries of dead writers in the same folder are removed first.
    Errors name `dest`, never the temporary.
    """
    dest = Path(dest)
    if not str(dest.parent):
        dest = Path(".") / dest
    problem = _destination_problem(dest, directory)
    if problem is not None:
        raise problem
    clean_stale(dest.parent)
    install_signal_cleanup()
    tmp = temporary_path(dest)
    with _lock:
        _in_flight.add(tmp)
    try:
        if directory:
            try:
                tmp.mkdir()
            except OSError as exc:
                raise _about_dest(exc, dest) from exc
        yield tmp
        if directory:
            _fsync_folder(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"{dest}: nothing was written")
        try:
            if directory and dest.exists():
                # The old folder is the only copy until the new one is in place: it is not
                # "in flight" (a signal must not delete it), and a failed swap puts it back.
                aside = temporary_path(dest, ASIDE_SUFFIX)
                os.replace(dest, aside)
                try:
                    os.replace(tmp, dest)
                except BaseException:
                    os.replace(aside, dest)
                    raise
                _remove(aside)
            else:
                os.replace(tmp, dest)
        except IsADirectoryError:
            raise IsADirectoryError(f"{dest}: is a directory, expected a file name") from None
        except OSError as exc:
            raise _about_dest(exc, dest) from exc
        _fsync_folder(dest.parent)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        with _lock:
            _in_flight.discard(tmp)


def atomic_write(path: PathLike, pieces: Iterable[Any]) -> None:
    """Write `pieces` (bytes-like objects or C-contiguous NumPy arrays) to `path` atomically.

    The data is flushed and fsynced before the rename; the file gets the permissions a
    plain `open(path, "w")` would give it (the umask applies).
    """
    path = Path(path)
    with staging(path) as tmp:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:  # e.g. a folder that takes no new files (/proc), read-only
            raise _about_dest(exc, path) from exc
        with os.fdopen(fd, "wb") as fh:
            for piece in pieces:  # an error making a piece (reading a source) is its own
                # Arrays expose their buffer (`.data`); bytes-likes are written as they are.
                _write(fh, piece.data if hasattr(piece, "__array_interface__") else piece, path)
            _write(fh, None, path)


def _write(fh: Any, data: Any, path: Path) -> None:
    """Write `data` to `fh` (None: flush and fsync); an OSError (e.g. a full disk) names
    `path`, not the temporary `fh` is."""
    try:
        if data is None:
            fh.flush()
            os.fsync(fh.fileno())
        else:
            fh.write(data)
    except OSError as exc:
        raise _about_dest(exc, path) from exc
