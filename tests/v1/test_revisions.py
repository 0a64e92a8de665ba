"""Revisions as data: the two V1 revisions, aliases, precedence and the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from soma_models.v1 import revisions
from soma_models.v1.revisions import REVISIONS, UnknownProtocolError, lookup, resolve


def test_the_two_revisions_match_spec_section_1() -> None:
    old, new = REVISIONS["0.1.1"], REVISIONS["0.1.7"]
    assert (old.num_layers, old.max_seq_len, old.batch_size, old.sig_reg_slices,
            old.text_encoding) == (32, 8192, 32, 1024, "hex")
    assert (new.num_layers, new.max_seq_len, new.batch_size, new.sig_reg_slices,
            new.text_encoding) == (24, 1024, 16, 256, "base58")
    assert new.batch_bytes == 16_384
    for rev in (old, new):
        assert (rev.sig_reg_t_max, rev.sig_reg_points, rev.sig_reg_coefficient) == (3.0, 17, 0.02)


def test_latest_and_default_are_0_1_7() -> None:
    assert lookup("latest") is REVISIONS["0.1.7"]
    assert revisions.DEFAULT_PROTOCOL == "0.1.7"
    assert resolve(None) is revisions.default_revision()


def test_explicit_argument_wins() -> None:
    assert resolve("0.1.1").name == "0.1.1"
    assert resolve(REVISIONS["0.1.1"]) is REVISIONS["0.1.1"]


@pytest.mark.parametrize("bad", ["0.1.2", "", "LATEST", 17, 1.0])
def test_unknown_names_list_the_known_ones(bad: object) -> None:
    with pytest.raises(UnknownProtocolError) as info:
        lookup(bad)
    message = str(info.value)
    assert "\n" not in message
    for name in ("0.1.1", "0.1.7", "latest"):
        assert name in message


def _run(code: str, protocol: str | None, *, module: str | None = None
         ) -> subprocess.CompletedProcess:
    """Python running `code` (or `-m module --help`) with only `protocol` in the environment."""
    env = {k: v for k, v in os.environ.items() if k != revisions.ENV_VAR}
    if protocol is not None:
        env[revisions.ENV_VAR] = protocol
    argv = ["-m", module, "--help"] if module is not None else ["-c", code]
    return subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("protocol, expected", [
    (None, "24 1024 16 256"), ("0.1.1", "32 8192 32 1024"), ("latest", "24 1024 16 256")])
def test_environment_variable_selects_the_process_revision(protocol: str | None,
                                                           expected: str) -> None:
    code = ("from soma_models.v1 import configs as c, tokenizer as t; import inspect;"
            "m = c.ModelConfig(); s = c.SIGRegConfig();"
            "assert c.preset('v1') == m;"
            "d = inspect.signature(t.tokenize).parameters;"
            "assert d['max_seq_len'].default == c.V1_MAX_SEQ_LEN;"
            "print(m.num_layers, c.V1_MAX_SEQ_LEN, c.V1_BATCH_SIZE, s.slices)")
    result = _run(code, protocol)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == expected


@pytest.mark.parametrize("module", ["soma_models", "soma_models.train"])
def test_bad_environment_value_is_one_line_in_the_cli(module: str) -> None:
    result = _run("", "0.9", module=module)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "SOMA_MODELS_PROTOCOL='0.9'" in lines[0] and "0.1.1, 0.1.7, latest" in lines[0]


def test_bad_environment_value_fails_the_import_of_configs() -> None:
    result = _run("import soma_models.v1.configs", "0.9")
    assert result.returncode != 0 and "UnknownProtocolError" in result.stderr
