"""soma_models.cli_common: argument types, one-line usage errors, the error handler, warnings."""

from __future__ import annotations

import argparse
import warnings

import pytest

from soma_models.cli_common import (
    Parser,
    UserError,
    device,
    input_file,
    micro_batch,
    one_line_warnings,
    output_file,
    positive_int,
    protocol,
    run,
    seed,
)
from soma_models.errors import WeightsError


@pytest.mark.parametrize("text, value", [("0", 0), ("0x10", 16), (str(2**64 - 1), 2**64 - 1)])
def test_seed_accepts_u64(text, value):
    assert seed(text) == value


@pytest.mark.parametrize("text, message", [("-1", "u64"), (str(2**64), "u64"),
                                           ("abc", "integer"), ("1.5", "integer")])
def test_seed_refuses(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        seed(text)


def test_positive_int_and_micro_batch():
    assert positive_int("3") == 3
    for bad in ("0", "-1", "x", "1.0"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            positive_int(bad)
    assert micro_batch("auto") == "auto" and micro_batch("4") == 4
    with pytest.raises(argparse.ArgumentTypeError, match="'auto'"):
        micro_batch("0")


def test_protocol_names_the_revision_or_is_one_usage_line():
    """The one --protocol type of `soma-models` and `soma-models train`."""
    assert protocol("latest") == protocol(" 0.1.7 ") == "0.1.7"
    assert protocol("0.1.1") == "0.1.1"
    with pytest.raises(argparse.ArgumentTypeError,
                       match=r"^unknown protocol revision '0.2'; known: 0.1.1, 0.1.7, latest$"):
        protocol("0.2")


def test_device():
    torch = pytest.importorskip("torch")
    assert device("cpu") == "cpu"
    with pytest.raises(argparse.ArgumentTypeError, match="unknown device 'bogus'"):
        device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="use --device cpu"):
            device("cuda")
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA device"):
            device(f"cuda:{torch.cuda.device_count()}")


def test_paths(tmp_path):
    existing = tmp_path / "f.bin"
    existing.write_bytes(b"x")
    assert input_file(str(existing)) == str(existing)
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory, expected a file"):
        input_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        input_file(str(tmp_path / "nope"))
    assert output_file(str(existing)) == str(existing)  # replacing is the command's call
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        output_file(str(tmp_path / "missing" / "out.bin"))


def test_parser_usage_error_is_one_line_exit_2(capsys):
    parser = Parser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("go")
    child.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["go", "--n", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool go: error: argument --n: ")
    assert "usage:" not in err


@pytest.mark.parametrize("raised, code, text", [
    (UserError("data.bin: empty"), 1, "tool: error: data.bin: empty"),
    (WeightsError("w.st", ["a", "b"]), 1, "tool: error: w.st: a; b"),
    (FileNotFoundError("x: no such\nfile"), 1, "tool: error: x: no such file"),
    (KeyboardInterrupt(), 130, "tool: interrupted"),
])
def test_run_reports_one_line(raised, code, text, capsys, monkeypatch):
    monkeypatch.delenv("SOMA_MODELS_DEBUG", raising=False)

    def command(args):
        raise raised

    assert run(command, argparse.Namespace(), "tool") == code
    assert capsys.readouterr().err == text + "\n"


def _raise_from_a_helper(args):
    def helper():
        raise UserError("data.bin: empty")
    helper()


@pytest.mark.parametrize(("env", "flag"), [("1", False), ("yes", False), (None, True)])
def test_debug_prints_the_one_line_then_the_traceback(env, flag, capsys, monkeypatch):
    if env is None:
        monkeypatch.delenv("SOMA_MODELS_DEBUG", raising=False)
    else:
        monkeypatch.setenv("SOMA_MODELS_DEBUG", env)
    assert run(_raise_from_a_helper, argparse.Namespace(), "tool", debug=flag) == 1
    first, *rest = capsys.readouterr().err.splitlines()
    assert first == "tool: error: data.bin: empty"
    assert rest[0] == "Traceback (most recent call last):"
    assert any("in helper" in line for line in rest)
    assert rest[-1] == "soma_models.cli_common.UserError: data.bin: empty"


@pytest.mark.parametrize("env", ["", "0", "false", "no"])
def test_debug_off_values_keep_the_one_line(env, capsys, monkeypatch):
    monkeypatch.setenv("SOMA_MODELS_DEBUG", env)
    assert run(_raise_from_a_helper, argparse.Namespace(), "tool") == 1
    assert capsys.readouterr().err == "tool: error: data.bin: empty\n"


def test_warnings_are_one_line_without_source(capsys):
    with one_line_warnings("tool"):
        warnings.warn("first line\nsecond part", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err == "tool: warning: first line second part\n"
