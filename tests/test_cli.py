"""The `soma-models` command, end to end (subprocesses) and in-process for the error paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from soma_models.cli import main
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.scoring import compete, score
from soma_models.v1.transit import commitment, parse_key

SUBCOMMANDS = ["score", "validate", "inspect", "init", "encrypt", "decrypt", "publish"]
# Small contract sizes keep every score fast; the chain's are the defaults.
SIZES = ["--max-seq-len", "64", "--batch-size", "4"]
SMALL_SIZES = {"max_seq_len": 64, "batch_size": 4}


def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "soma_models", *args],
                            capture_output=True, text=True, timeout=300, check=False)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    # Usage errors name the subcommand ("soma-models score: error: argument ...").
    assert re.match(r"soma-models( [a-z]+)?: error: ", lines[0]) and "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    for seed in (1, 2):
        assert main(["init", str(folder / f"w{seed}.safetensors"), "--config", "tiny",
                     "--seed", str(seed)]) == 0
    (folder / "data.bin").write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 300,
                                                                               dtype=np.uint8)))
    return folder


def test_help_on_every_subcommand(capsys):
    assert "score" in run("--help").stdout
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert "usage: soma-models " + command in capsys.readouterr().out


def test_score_json_end_to_end(files):
    w1, data = str(files / "w1.safetensors"), str(files / "data.bin")
    result = run("score", w1, "--data", data, "--seed", "7", "--json", *SIZES)
    doc = json.loads(result.stdout)
    expected = score(w1, (files / "data.bin").read_bytes(), 7, **SMALL_SIZES)
    np.testing.assert_allclose(doc["loss"], expected.loss, rtol=1e-6)
    np.testing.assert_allclose(doc["embedding"], expected.embedding, rtol=1e-6, atol=1e-7)
    assert set(doc) == {"weights", "protocol", "loss", "embedding"}
    assert doc["protocol"] == expected.protocol == "0.1.7"


def test_competition_json(files, capsys):
    paths = [str(files / "w1.safetensors"), str(files / "w2.safetensors")]
    target = np.linspace(-1, 1, 64)
    np.save(files / "target.npy", target)
    assert main(["score", *paths, "--data", str(files / "data.bin"), "--seed", "3",
                 "--target", str(files / "target.npy"), "--json", *SIZES]) == 0
    doc = json.loads(capsys.readouterr().out)
    expected = compete(paths, (files / "data.bin").read_bytes(), 3, target, **SMALL_SIZES)
    assert doc["competition"]["winner"] == expected.winner
    assert doc["competition"]["winner_weights"] == paths[expected.winner]
    np.testing.assert_allclose(doc["competition"]["losses"], expected.losses, rtol=1e-6)
    np.testing.assert_allclose(doc["competition"]["distance"], expected.distance, rtol=1e-5)
    assert [s["weights"] for s in doc["scores"]] == paths


def test_user_errors_exit_non_zero_with_one_line(files, tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    w1 = str(files / "w1.safetensors")
    result = run("score", w1, "--data", str(empty), "--seed", "1", ok=False)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "empty")
    # A missing path is a usage error, found before any work starts (exit 2).
    result = run("score", str(tmp_path / "nope"), "--data", str(files / "data.bin"),
                 "--seed", "1", ok=False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "argument weights", "nope", "no such file")
    result = run("score", w1, "--data", str(files / "data.bin"), "--seed", "-3", ok=False)
    assert result.returncode == 2 and "u64" in result.stderr and "Traceback" not in result.stderr


def test_encrypt_then_score_with_key(files, tmp_path, capsys):
    w1, encrypted = files / "w1.safetensors", tmp_path / "w1.enc"
    assert main(["encrypt", str(w1), "-o", str(encrypted)]) == 0
    out = capsys.readouterr().out
    key = next(line.split()[1] for line in out.splitlines() if line.startswith("key "))
    assert "protocol    0.1.7" in out and parse_key(key) and len(key) <= 44  # Base58
    assert f"commitment  {commitment(encrypted.read_bytes())}" in out
    data = str(files / "data.bin")
    assert main(["score", str(encrypted), "--data", data, "--seed", "5", "--key", key,
                 "--json", *SIZES]) == 0
    via_key = json.loads(capsys.readouterr().out)
    plain = score(w1, (files / "data.bin").read_bytes(), 5, **SMALL_SIZES)
    assert via_key["loss"] == plain.loss
    # A wrong key: the decrypted bytes are not weights.
    assert main(["score", str(encrypted), "--data", data, "--seed", "5",
                 "--key", "ab" * 32]) == 1
    assert_one_line_error(capsys.readouterr().err, "wrong decryption key")
    # Round trip through decrypt; a wrong key is refused before anything is written.
    out_path = tmp_path / "w1.dec"
    assert main(["decrypt", str(encrypted), "-o", str(out_path), "--key", key]) == 0
    assert out_path.read_bytes() == w1.read_bytes()
    assert main(["decrypt", str(encrypted), "-o", str(tmp_path / "x"), "--key", "ab" * 32]) == 1
    assert_one_line_error(capsys.readouterr().err, "wrong key")
    assert not (tmp_path / "x").exists()
    assert main(["decrypt", str(encrypted), "-o", str(tmp_path / "x"), "--key", "abc"]) == 1
    assert_one_line_error(capsys.readouterr().err, "Base58 of 32 bytes or 64 hex")


def test_text_output_with_range_and_inline_target(files, capsys):
    paths = [str(files / "w1.safetensors"), str(files / "w2.safetensors")]
    target = ",".join(["0.5"] * 64)
    assert main(["score", *paths, "--data", str(files / "data.bin"), "--seed", "1",
                 "--target", target, "--range", *SIZES]) == 0
    out = capsys.readouterr().out
    assert out.count("loss ") >= 2 and "winner" in out and "distance" in out
    assert out.count("range ") == 2 and "batch orders" in out
    assert main(["score", paths[0], "--data", str(files / "data.bin"), "--seed", "1",
                 "--target", "1,2", *SIZES]) == 1
    assert_one_line_error(capsys.readouterr().err, "target embedding has 2 values")
    assert main(["score", *paths, "--data", str(files / "data.bin"), "--seed", "1",
                 "--key", "none", *SIZES]) == 1
    assert_one_line_error(capsys.readouterr().err, "1 --key for 2")


def test_validate_and_inspect(files, tmp_path, capsys):
    w1 = files / "w1.safetensors"
    assert main(["validate", str(w1)]) == 0
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(w1.read_bytes()[:-64])
    assert main(["validate", str(w1), str(bad), "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [r["ok"] for r in reports] == [True, False] and reports[1]["errors"]
    assert main(["inspect", str(w1), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == ModelConfig(embedding_dim=64, pwff_hidden_dim=256, num_layers=2,
                                         num_heads=4).to_dict()
    assert info["commitment"] == commitment(w1.read_bytes())
    assert info["file_bytes"] == w1.stat().st_size and info["parameters"] == 134_152
    assert main(["inspect", str(bad)]) == 1
    assert_one_line_error(capsys.readouterr().err, "bad.safetensors")


def test_init_presets_custom_sizes_and_refusals(tmp_path, capsys):
    path = tmp_path / "custom.safetensors"
    assert main(["init", str(path), "--config", "tiny", "--embedding-dim", "32",
                 "--num-layers", "1", "--seed", "4"]) == 0
    from soma_models.v1.torch.modules.model import Model

    model = Model.load(path)
    assert (model.config.embedding_dim, model.config.num_layers, model.config.num_heads) == \
        (32, 1, 4)
    # Initial distributions: N(0, 0.02) weights, residual projections scaled down, unit norms.
    embedding = model.embedding.weight.detach().numpy()
    assert abs(embedding.std() - 0.02) < 0.002 and abs(embedding.mean()) < 0.002
    outer = model.encoder.layers[0].pwff.linear_outer.weight.detach().numpy()
    assert abs(outer.std() - 0.02 / np.sqrt(2)) < 0.002
    assert np.all(model.final_norm.weight.detach().numpy() == 1.0)
    assert np.all(model.predictor.bias.detach().numpy() == 0.0)
    # The same seed gives the same file; another seed another one.
    again = tmp_path / "again.safetensors"
    main(["init", str(again), "--config", "tiny", "--embedding-dim", "32", "--num-layers", "1",
          "--seed", "4"])
    assert again.read_bytes() == path.read_bytes()
    capsys.readouterr()
    assert main(["init", str(path), "--config", "tiny"]) == 1
    assert_one_line_error(capsys.readouterr().err, "already exists")
    assert main(["init", str(path), "--config", "tiny", "--num-heads", "3"]) == 1
    assert_one_line_error(capsys.readouterr().err, "num_heads")
    with pytest.raises(SystemExit) as exc:
        main(["init", str(path), "--config", "huge"])
    assert exc.value.code == 2


@pytest.mark.slow  # compiles the Flax model (~15 s); torch vs Flax scores are checked elsewhere
def test_score_flax_framework(files, capsys):
    pytest.importorskip("soma_models.v1.flax.evaluate")
    w1, data = str(files / "w1.safetensors"), str(files / "data.bin")
    assert main(["score", w1, "--data", data, "--seed", "2", "--framework", "flax",
                 "--json", *SIZES]) == 0
    flax_loss = json.loads(capsys.readouterr().out)["loss"]
    expected = score(w1, (files / "data.bin").read_bytes(), 2, sig_reg_config=SIGRegConfig(),
                     **SMALL_SIZES)
    np.testing.assert_allclose(flax_loss, expected.loss, rtol=1e-5)


# --------------------------------------------------------------------------- bad input, up front

def usage_error(capsys, argv: list[str], *fragments: str) -> None:
    """`argv` fails while parsing: one line, exit 2, naming each fragment."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_paths_that_are_folders_or_missing_fail_before_work(files, tmp_path, capsys):
    w1, data = str(files / "w1.safetensors"), str(files / "data.bin")
    folder, missing = str(tmp_path), str(tmp_path / "nope.bin")
    out = str(tmp_path / "out.bin")
    for bad, what in ((folder, "is a directory"), (missing, "no such file")):
        usage_error(capsys, ["score", bad, "--data", data, "--seed", "1"],
                    "argument weights", bad, what)
        usage_error(capsys, ["score", w1, "--data", bad, "--seed", "1"], "argument --data", bad,
                    what)
        usage_error(capsys, ["validate", w1, bad], "argument weights", bad, what)
        usage_error(capsys, ["inspect", bad], "argument weights", bad, what)
        usage_error(capsys, ["encrypt", bad, "-o", out], "argument input", bad, what)
        usage_error(capsys, ["decrypt", bad, "-o", out, "--key", "ab" * 32], "argument input",
                    bad, what)
    usage_error(capsys, ["init", folder, "--config", "tiny"], "argument output", folder,
                "is a directory")
    usage_error(capsys, ["init", str(tmp_path / "no" / "w.st")], "argument output",
                "does not exist")
    usage_error(capsys, ["encrypt", w1, "-o", folder], "argument -o/--output", "is a directory")
    usage_error(capsys, ["score", w1, "--data", data, "--seed", "1", "--micro-batch-size", "0"],
                "argument --micro-batch-size")


def test_bad_device_fails_before_work(files, capsys):
    torch = pytest.importorskip("torch")
    w1, data = str(files / "w1.safetensors"), str(files / "data.bin")
    usage_error(capsys, ["score", w1, "--data", data, "--seed", "1", "--device", "bogus"],
                "argument --device", "unknown device 'bogus'")
    if not torch.cuda.is_available():
        usage_error(capsys, ["score", w1, "--data", data, "--seed", "1", "--device", "cuda"],
                    "argument --device", "'cuda'", "--device cpu")


def test_encrypt_and_decrypt_refuse_to_overwrite_without_force(files, tmp_path, capsys):
    w1 = files / "w1.safetensors"
    encrypted, plain = tmp_path / "w.enc", tmp_path / "w.dec"
    key = "cd" * 32
    assert main(["encrypt", str(w1), "-o", str(encrypted), "--key", key]) == 0
    before = encrypted.read_bytes()
    plain.write_bytes(b"precious")
    capsys.readouterr()
    assert main(["encrypt", str(plain), "-o", str(encrypted), "--key", key]) == 1
    assert_one_line_error(capsys.readouterr().err, "-o", str(encrypted), "already exists",
                          "--force")
    assert encrypted.read_bytes() == before
    assert main(["decrypt", str(encrypted), "-o", str(plain), "--key", key]) == 1
    assert_one_line_error(capsys.readouterr().err, "-o", str(plain), "already exists")
    assert plain.read_bytes() == b"precious"
    assert main(["decrypt", str(encrypted), "-o", str(plain), "--key", key, "--force"]) == 0
    assert plain.read_bytes() == w1.read_bytes()
    assert main(["decrypt", str(encrypted), "-o", str(encrypted), "--key", key,
                 "--force"]) == 1
    assert "overwrite the input" in capsys.readouterr().err


def test_wrong_key_hints_everywhere(files, tmp_path, capsys):
    w1 = files / "w1.safetensors"
    encrypted = tmp_path / "w.enc"
    assert main(["encrypt", str(w1), "-o", str(encrypted), "--key", "cd" * 32]) == 0
    capsys.readouterr()
    wrong = "ef" * 32
    assert main(["inspect", str(encrypted), "--key", wrong]) == 1
    assert_one_line_error(capsys.readouterr().err, str(encrypted), "wrong key?")
    assert main(["inspect", str(encrypted)]) == 1  # no key for an encrypted file
    assert_one_line_error(capsys.readouterr().err, str(encrypted), "pass its --key")
    assert main(["validate", str(encrypted), "--key", wrong]) == 1
    assert "wrong decryption key?" in capsys.readouterr().out
    assert main(["decrypt", str(encrypted), "-o", str(tmp_path / "x"), "--key", wrong]) == 1
    assert_one_line_error(capsys.readouterr().err, str(encrypted), "wrong key?", "--raw")
    # A malformed key names the option, never echoes the key.
    assert main(["inspect", str(encrypted), "--key", "zz" * 32]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "--key") and "zz" * 32 not in err
    assert main(["validate", str(w1), str(encrypted), "--key", "none", "--key", "12"]) == 1
    assert_one_line_error(capsys.readouterr().err, "--key #2")


def test_inspect_reads_only_the_header_of_an_encrypted_file(files, tmp_path, capsys):
    w1 = files / "w1.safetensors"
    encrypted = tmp_path / "w.enc"
    assert main(["encrypt", str(w1), "-o", str(encrypted), "--key", "cd" * 32]) == 0
    capsys.readouterr()
    assert main(["inspect", str(w1), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(encrypted), "--key", "cd" * 32, "--json"]) == 0
    via_key = json.loads(capsys.readouterr().out)
    assert via_key["config"] == plain["config"] and via_key["tensors"] == plain["tensors"]
    assert via_key["commitment"] == commitment(encrypted.read_bytes())


def write_bf16_copy(source, dest) -> None:
    """`source` with one tensor stored as BF16 (written by the `safetensors` package)."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    tensors["final_norm.beta"] = tensors["final_norm.beta"].to(torch.bfloat16)
    save_file(tensors, str(dest))


def test_warnings_are_single_lines(files, tmp_path):
    bf16 = tmp_path / "bf16.safetensors"
    write_bf16_copy(files / "w1.safetensors", bf16)
    result = run("score", str(bf16), "--data", str(files / "data.bin"), "--seed", "1",
                 "--quiet", *SIZES)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("soma-models: warning: ") and "BF16: final_norm.beta" in lines[0]
    assert "converted to float32" in lines[0] and "warnings.warn" not in result.stderr
    result = run("validate", str(bf16))
    assert "accepted, but:" in result.stdout and "final_norm.beta" in result.stdout


def test_validate_separates_refusals_from_caveats(files, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(files / "w1.safetensors"))
    tensors["embedding.weight"][0, 0] = np.nan
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file))
    tensors["counter"] = np.zeros(2, dtype=np.uint16)
    refused = tmp_path / "u16.safetensors"
    save_file(tensors, str(refused))
    assert main(["validate", str(nan_file), str(refused), "--json"]) == 1
    nan_report, refused_report = json.loads(capsys.readouterr().out)
    assert nan_report["ok"] and nan_report["non_finite"] == 1 and nan_report["caveats"]
    assert not refused_report["ok"] and any("counter (U16)" in e
                                            for e in refused_report["errors"])
    assert main(["validate", str(nan_file)]) == 1
    out = capsys.readouterr().out
    assert "accepted, but: embedding.weight: 1 NaN/Inf" in out and "loss will be NaN" in out


def test_zero_target_explains_the_nan_distance(files):
    zeros = ",".join(["0"] * 64)
    result = run("score", str(files / "w1.safetensors"), "--data", str(files / "data.bin"),
                 "--seed", "1", "--target", zeros, "--quiet", *SIZES)
    assert "distance   nan" in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soma-models: warning: distance is NaN")
    assert "target embedding is all zeros" in lines[0]


@pytest.mark.parametrize("entry, fragment", [
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}, "dtype must be a string"),
    ({"dtype": "F32", "shape": [2**63, 2], "data_offsets": [0, 8]}, "overflows"),
    ({"dtype": "F32", "shape": [2**64], "data_offsets": [0, 8]}, "[0, 2^64)"),
])
def test_crafted_headers_are_one_line_errors(entry, fragment, files, tmp_path, capsys):
    encoded = json.dumps({"embedding.weight": entry}).encode()
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(8))
    data = str(files / "data.bin")
    for argv in (["inspect", str(crafted)],
                 ["score", str(crafted), "--data", data, "--seed", "1", *SIZES]):
        assert main(argv) == 1
        assert_one_line_error(capsys.readouterr().err, str(crafted), fragment)
    assert main(["validate", str(crafted)]) == 1
    out = capsys.readouterr().out
    assert "refused" in out and fragment in out and "unhashable" not in out


def test_nan_loss_is_explained(files, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(files / "w1.safetensors"))
    tensors["final_norm.gamma"][:] = np.nan
    nan_file = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_file))
    result = run("score", str(nan_file), "--data", str(files / "data.bin"), "--seed", "1",
                 "--quiet", *SIZES)
    assert "loss       nan" in result.stdout
    notes = [line for line in result.stderr.splitlines() if "loss is NaN" in line]
    assert len(notes) == 1 and notes[0].startswith("soma-models: warning: ")
    assert "the runtime accepts this file" in notes[0] and "index 0 it wins" in notes[0]
    result = run("score", str(files / "w1.safetensors"), str(nan_file), "--data",
                 str(files / "data.bin"), "--seed", "1", "--quiet", *SIZES)
    assert f"winner     {files / 'w1.safetensors'}" in result.stdout
    notes = [line for line in result.stderr.splitlines() if "loss is NaN" in line]
    assert len(notes) == 1 and "passes over it" in notes[0]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_init_into_a_folder_that_takes_no_files_names_the_destination(capsys, monkeypatch):
    monkeypatch.delenv("SOMA_MODELS_DEBUG", raising=False)
    assert main(["init", "/proc/w.safetensors", "--config", "tiny"]) == 1
    err = capsys.readouterr().err
    assert_one_line_error(err, "/proc/w.safetensors: cannot write: folder /proc does not "
                               "take new files")
    assert "soma-tmp" not in err


def test_debug_flag_and_variable_add_the_traceback_after_the_line(files, tmp_path):
    data = tmp_path / "empty.bin"
    data.write_bytes(b"")
    args = ["score", str(files / "w1.safetensors"), "--data", str(data), "--seed", "0"]
    plain = run(*args, ok=False)
    assert plain.returncode == 1
    assert_one_line_error(plain.stderr, "empty")
    for command, env in ((["--debug", *args], {}), ([*args, "--debug"], {}),
                         (args, {"SOMA_MODELS_DEBUG": "1"})):
        result = subprocess.run([sys.executable, "-m", "soma_models", *command],
                                capture_output=True, text=True, timeout=300, check=False,
                                env={**os.environ, **env})
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert lines[0] == plain.stderr.strip()
        assert lines[1] == "Traceback (most recent call last):" and len(lines) > 3


def test_help_documents_debug():
    text = run("--help").stdout
    assert "--debug" in text and "SOMA_MODELS_DEBUG=1" in " ".join(text.split())
