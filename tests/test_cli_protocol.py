"""`--protocol` on every subcommand that has it, and its precedence over the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import base58
import numpy as np
import pytest

from soma_models.cli import build_parser, main
from soma_models.safetensors_io import SafetensorsFile
from soma_models.v1.revisions import ENV_VAR
from soma_models.v1.scoring import score
from soma_models.v1.transit import parse_key

SHORT = ["--max-seq-len", "64", "--batch-size", "4"]
PROTOCOL_COMMANDS = ["score", "validate", "inspect", "init", "encrypt", "publish"]
# `--config v1` at a tiny width: the layer count is the preset's, the file stays small.
NARROW_V1 = ["--config", "v1", "--embedding-dim", "16", "--num-heads", "2",
             "--pwff-hidden-dim", "32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_protocol")
    assert main(["init", str(folder / "w.safetensors"), "--config", "tiny", "--seed", "1"]) == 0
    (folder / "data.bin").write_bytes(bytes(np.random.default_rng(0).integers(
        0, 256, 1500, dtype=np.uint8)))
    return folder


def test_every_subcommand_with_a_revision_takes_protocol():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command in PROTOCOL_COMMANDS:
        options = {s for a in subparsers[command]._actions for s in a.option_strings}
        assert "--protocol" in options, command


def test_an_unknown_protocol_is_one_usage_line(files, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["score", str(files / "w.safetensors"), "--data", str(files / "data.bin"),
              "--seed", "1", "--protocol", "0.2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown protocol revision '0.2'; known: 0.1.1, 0.1.7, latest" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("protocol, layers", [("0.1.7", 24), ("0.1.1", 32), ("latest", 24)])
def test_init_v1_layers_follow_the_revision(tmp_path, capsys, protocol, layers):
    path = tmp_path / "v1.safetensors"
    assert main(["init", str(path), *NARROW_V1, "--protocol", protocol]) == 0
    assert f"{layers} layers" in capsys.readouterr().out
    weights = SafetensorsFile(path)
    found = {int(k.split(".")[2]) for k in weights.tensors if k.startswith("encoder.layers.")}
    assert found == set(range(layers))
    assert weights.metadata["soma_models.protocol"] == ("0.1.7" if protocol == "latest"
                                                        else protocol)


def test_score_names_the_revision_and_uses_its_settings(files, capsys):
    w, data = str(files / "w.safetensors"), str(files / "data.bin")
    # 0.1.7 at its own defaults; 0.1.1 with short rows (its 8192 are slow on CPU) but its
    # own SIGReg slices (1024), which alone change the loss.
    for protocol, sizes in (("0.1.7", []), ("0.1.1", SHORT)):
        assert main(["score", w, "--data", data, "--seed", "9", "--json", "--quiet",
                     "--protocol", protocol, *sizes]) == 0
        captured = capsys.readouterr()
        doc = json.loads(captured.out)
        expected = score(w, (files / "data.bin").read_bytes(), 9, protocol=protocol,
                         **({"max_seq_len": 64, "batch_size": 4} if sizes else {}))
        assert doc["protocol"] == protocol and doc["loss"] == expected.loss
        # The file records 0.1.7 (init's default): one line when scored under 0.1.1.
        mismatch = [line for line in captured.err.splitlines() if "written for" in line]
        assert len(mismatch) == (1 if protocol == "0.1.1" else 0), captured.err
    assert main(["score", w, "--data", data, "--seed", "9", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("protocol   0.1.7: the network")
    assert main(["score", w, w, "--data", data, "--seed", "9", "--json", "--quiet",
                 "--protocol", "0.1.1", *SHORT]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["protocol"] == "0.1.1" and {s["protocol"] for s in doc["scores"]} == {"0.1.1"}


def test_validate_inspect_encrypt_name_the_revision(files, tmp_path, capsys):
    w = files / "w.safetensors"
    assert main(["validate", str(w), "--protocol", "0.1.1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["protocol"] == "0.1.1"
    assert main(["validate", str(w)]) == 0
    assert "protocol   0.1.7" in capsys.readouterr().out
    assert main(["inspect", str(w), "--json", "--protocol", "0.1.1"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["protocol"] == "0.1.1" and info["recorded_protocol"] == "0.1.7"
    assert len(info["commitment"]) == 64  # hex under 0.1.1
    assert main(["inspect", str(w)]) == 0
    out = capsys.readouterr().out
    assert "protocol    0.1.7" in out and "Base58" in out
    assert main(["encrypt", str(w), "-o", str(tmp_path / "e"), "--protocol", "0.1.1"]) == 0
    out = capsys.readouterr().out
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key "))
    assert len(key) == 64 and "protocol    0.1.1" in out
    # The hex key works as a Base58 one would, whatever the revision in use.
    b58 = base58.b58encode(parse_key(key)).decode()
    assert main(["decrypt", str(tmp_path / "e"), "-o", str(tmp_path / "d"), "--key", b58]) == 0
    assert (tmp_path / "d").read_bytes() == w.read_bytes()


def run_cli(*args: str, env_protocol: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_protocol is not None:
        env[ENV_VAR] = env_protocol
    return subprocess.run([sys.executable, "-m", "soma_models", *args], env=env, check=False,
                          capture_output=True, text=True, timeout=300)


def test_precedence_argument_then_environment_then_default(files):
    w, data = str(files / "w.safetensors"), str(files / "data.bin")
    common = ["score", w, "--data", data, "--seed", "3", "--json", "--quiet", *SHORT]
    by_env = run_cli(*common, env_protocol="0.1.1")
    explicit = run_cli(*common, "--protocol", "0.1.7", env_protocol="0.1.1")
    default = run_cli(*common, env_protocol=None)
    for result in (by_env, explicit, default):
        assert result.returncode == 0, result.stderr
    assert json.loads(by_env.stdout)["protocol"] == "0.1.1"
    assert json.loads(explicit.stdout)["protocol"] == "0.1.7"
    assert json.loads(default.stdout)["protocol"] == "0.1.7"
    assert json.loads(explicit.stdout)["loss"] == json.loads(default.stdout)["loss"]
    assert json.loads(by_env.stdout)["loss"] != json.loads(default.stdout)["loss"]


def test_a_nan_loss_is_one_warning_line(files, tmp_path, capsys):
    from soma_models.safetensors_io import SafetensorsFile, save_file

    source = SafetensorsFile(files / "w.safetensors")
    arrays = {k: np.array(source.array(k)) for k in source.tensors}
    arrays["predictor.bias"][5] = np.nan
    broken = tmp_path / "nan.safetensors"
    save_file(broken, arrays, dict(source.metadata))
    good, data = str(files / "w.safetensors"), str(files / "data.bin")
    for order, winner in (([str(broken), good], 0), ([good, str(broken)], 0)):
        assert main(["score", *order, "--data", data, "--seed", "2", "--quiet", *SHORT]) == 0
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if "NaN" in line]
        assert len(lines) == 1 and lines[0].startswith("soma-models: warning: ")
        assert f"winner     {order[winner]} (#{winner + 1})" in captured.out
