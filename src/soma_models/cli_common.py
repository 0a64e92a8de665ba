"""What the package's command lines share: argument types, one-line errors and warnings.

Both `soma-models` (`soma_models.cli`) and `soma-models train` (`soma_models.train.cli`)
use these, so an option means the same thing, and fails the same way, everywhere:

* argument types (`seed`, `positive_int`, `micro_batch`, `device`, `input_file`,
  `output_file`, `protocol`) check a value while the command line is parsed, before any work starts;
  a bad value is one line `PROG: error: argument --x: ...` with exit status 2 (`Parser`);
* `run` calls a command and turns a user-facing exception into one line
  `PROG: error: ...` with exit status 1 (130 on Ctrl-C); `--debug` or SOMA_MODELS_DEBUG=1
  prints the full traceback after that line;
* `one_line_warnings` prints every warning as `PROG: warning: ...`, one line, without the
  Python source line that the default format adds.
"""

from __future__ import annotations

import argparse
import math
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from soma_models.errors import WeightsError

DEBUG_ENV = "SOMA_MODELS_DEBUG"


class UserError(Exception):
    """A problem with the command's input, reported as one line (exit status 1)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (no usage block), exit status 2.

    Subcommand parsers made by `add_subparsers` are of this class too.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument types

def seed(text: str) -> int:
    """A u64 seed; decimal, or 0x/0o/0b-prefixed."""
    from soma_models.v1.noise import check_seed

    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None
    try:
        return check_seed(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def micro_batch(text: str) -> int | str:
    """A positive integer, or "auto"."""
    if text == "auto":
        return text
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}") from None


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N, mps. Checked with torch when it
    is installed (importing it only when the option is given); kept as text otherwise."""
    try:
        import torch
    except ImportError:
        return text
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return text
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise argparse.ArgumentTypeError(f"{text!r}: {why}; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA device(s) (cuda:0 .. cuda:{count - 1})")
        return text
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; use "
                                             "--device cpu")
        return text
    raise argparse.ArgumentTypeError(f"unsupported device {text!r}; use cpu, cuda, cuda:N or mps")


def protocol(text: str) -> str:
    """A revision name or alias ("0.1.7", "latest", "0.1.1"), as the revision's name."""
    from soma_models.v1.revisions import UnknownProtocolError, lookup

    try:
        return lookup(text.strip()).name
    except UnknownProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def input_file(text: str) -> str:
    """A path to an existing file (not a folder)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable (permission denied)")
    return text


def output_file(text: str) -> str:
    """A path a file can be written to: not a folder, in a folder that exists. Whether an
    existing file may be replaced is the command's decision (`--force`)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file name")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: folder {folder} does not exist")
    return text


# --------------------------------------------------------------------------- errors, warnings

def one_line(exc: BaseException) -> str:
    """An exception as one line: every problem of a `WeightsError`, joined."""
    problems = getattr(exc, "problems", None)
    if problems and len(problems) > 1:
        return f"{exc.source}: " + "; ".join(problems)  # type: ignore[attr-defined]
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):
        text = f"missing {text}"
    return " ".join(text.split())


def _show_warning(prog: str) -> Callable[..., None]:
    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: Any = None) -> None:
        stream = sys.stderr if file is None else file
        try:
            stream.write(f"{prog}: warning: {' '.join(str(message).split())}\n")
        except OSError:
            pass
    return show


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """Within the block, each warning is printed once as `PROG: warning: MESSAGE`."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning(prog)
        yield


#: Exceptions that are the user's problem (bad input, files, keys), not our bugs.
USER_ERRORS = (UserError, WeightsError, ValueError, TypeError, OSError, ImportError)


def debug_requested(flag: bool = False) -> bool:
    """Whether errors should come with their traceback: `--debug`, or SOMA_MODELS_DEBUG set
    to anything but empty, 0, false or no."""
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return flag or value not in ("", "0", "false", "no")


DEBUG_HELP = (f"after an error's one line, print its full traceback (or set {DEBUG_ENV}=1)")


def run(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace,
        prog: str, *, interrupted: str = "interrupted", debug: bool = False) -> int:
    """Run `command(args)` with one-line warnings; a user error is one line on stderr
    (exit 1), Ctrl-C exit 130. With `debug` (or SOMA_MODELS_DEBUG=1) the one line is
    followed by the full traceback, exit status unchanged."""
    with one_line_warnings(prog):
        try:
            return int(command(args) or 0)
        except KeyboardInterrupt:
            print(f"{prog}: {interrupted}", file=sys.stderr)
            return 130
        except USER_ERRORS as exc:
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            if debug_requested(debug):
                traceback.print_exception(exc, file=sys.stderr)
            return 1
