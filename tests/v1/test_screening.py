"""screening against per-sample `compete`, and the `soma-models screen` command.

Tolerance: the losses must agree to rtol 1e-6 (about 8 float32 ulps). Screening runs the
same model code on the same rows; the only differences are float32 summation order (per
row, then per sample, where `compete` sums a whole piece at once) and the matmul kernels'
blocking for a different number of rows. Measured: at most ~1.5e-7 relative (one ulp).
Embeddings and distances use SPEC §9's rtol/atol 1e-5, since values near zero make a
relative bound meaningless. Winners and nearest targets must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.test_cli import assert_one_line_error
from tests.v1.test_scoring import data_of, random_weights

from soma_models.cli import main
from soma_models.safetensors_io import save_file
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.schema import file_metadata
from soma_models.v1.scoring import compete, cosine_distance
from soma_models.v1.screen_output import finished_samples
from soma_models.v1.screening import Screener, load_targets, screen
from soma_models.v1.transit import encrypt_weights

LOSS_RTOL = 1e-6
RTOL, ATOL = 1e-5, 1e-5
CONFIG = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
SIG_REG = SIGRegConfig(slices=48)
SEQ, BATCH = 16, 4                      # one batch holds 64 bytes
# 1 byte, exactly one batch, one byte over, several batches with a partial last row.
LENGTHS = [1, 64, 65, 64 * 3 + 5]


def assert_equals_compete(result, weights, data, targets, **kwargs) -> None:
    expected = compete(weights, data, 0, target=targets[0], **kwargs)
    np.testing.assert_allclose(result.losses, expected.losses, rtol=LOSS_RTOL, atol=0)
    assert result.winner == expected.winner
    assert result.loss == result.losses[result.winner]
    np.testing.assert_allclose(result.embedding, expected.embedding, rtol=RTOL, atol=ATOL)
    assert result.embedding.dtype == np.float32
    distances = [cosine_distance(expected.embedding, t) for t in targets]
    assert distances[0] == pytest.approx(expected.distance, abs=0)
    np.testing.assert_allclose(result.distances, distances, rtol=RTOL, atol=ATOL)
    assert result.nearest == int(np.argmin(distances))
    assert result.bytes == len(data)


@pytest.fixture(scope="module")
def weights():
    return [random_weights(CONFIG, seed) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def targets():
    return np.random.default_rng(5).standard_normal((4, CONFIG.embedding_dim)).astype(np.float32)


@pytest.mark.parametrize("micro_batch_size", [None, 3])
@pytest.mark.parametrize("framework", ["torch", "flax"])
def test_screen_equals_compete_per_sample(weights, targets, framework, micro_batch_size):
    if framework == "flax":
        pytest.importorskip("flax")
    samples = [(f"s{n}", data_of(n, seed=n)) for n in LENGTHS]
    sizes = {"model_config": CONFIG, "sig_reg_config": SIG_REG, "max_seq_len": SEQ,
             "batch_size": BATCH, "framework": framework}
    # micro_batch_size 3 splits batches across passes and mixes batch indices in a pass.
    results = screen(weights, samples, targets, 0, micro_batch_size=micro_batch_size,
                     threshold=1.0, **sizes)
    assert [r.sample for r in results] == [name for name, _ in samples]
    for result, (_, data) in zip(results, samples):
        assert_equals_compete(result, weights, data, targets, **sizes)
        assert result.hit == (result.distance < 1.0)
    # The winners differ between samples, so the comparison covers more than one model.
    assert len({r.winner for r in results}) > 1


def test_screen_nonzero_seed_and_one_target(weights):
    target = np.ones(CONFIG.embedding_dim, dtype=np.float32)
    data = data_of(64 * 2 + 1, seed=3)
    sizes = {"model_config": CONFIG, "sig_reg_config": SIG_REG, "max_seq_len": SEQ,
             "batch_size": BATCH}
    (result,) = screen(weights, [("x", data)], target, 2**40, **sizes)
    expected = compete(weights, data, 2**40, target=target, **sizes)
    np.testing.assert_allclose(result.losses, expected.losses, rtol=LOSS_RTOL, atol=0)
    assert result.distances == pytest.approx([expected.distance], abs=ATOL)
    assert result.hit is None


def test_wrong_target_dimension_is_refused(weights):
    with pytest.raises(ValueError, match="targets have 3 values each, the models' embeddings "
                                         "have 16"):
        Screener(weights, np.zeros((2, 3)), model_config=CONFIG, sig_reg_config=SIG_REG)


def test_empty_sample_is_refused(weights, targets):
    screener = Screener(weights, targets, model_config=CONFIG, sig_reg_config=SIG_REG,
                        max_seq_len=SEQ, batch_size=BATCH)
    with pytest.raises(ValueError, match="^empty.bin: sample is empty"):
        list(screener.screen([("empty.bin", b"")]))


def test_a_sample_over_the_submission_limit_is_refused_unless_unlimited(weights, targets):
    sizes = {"model_config": CONFIG, "sig_reg_config": SIG_REG, "max_seq_len": SEQ,
             "batch_size": BATCH}
    over = bytes(1_048_577)
    with pytest.raises(ValueError, match=r"^big.bin: 1,048,577 bytes, over the network's "
                                         r"limit of 1,048,576 bytes"):
        list(Screener(weights, targets, **sizes).screen([("big.bin", over)]))
    # A lower limit, or none: the sample is screened as compete scores it.
    with pytest.raises(ValueError, match="over the network's limit of 64 bytes"):
        list(Screener(weights, targets, max_sample_bytes=64, **sizes).screen(
            [("s", data_of(65))]))
    [result] = Screener(weights, targets, max_sample_bytes=None, **sizes).screen(
        [("s", data_of(65))])
    assert_equals_compete(result, weights, data_of(65), targets, **sizes)


def test_load_targets(tmp_path):
    np.save(tmp_path / "t.npy", np.eye(2, 4, dtype=np.float32))
    assert load_targets(tmp_path / "t.npy").shape == (2, 4)
    (tmp_path / "t.json").write_text("[[1, 2, 3], [4, 5, 6]]")
    np.testing.assert_array_equal(load_targets(tmp_path / "t.json"), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "ragged.json").write_text("[[1, 2, 3], [4, 5]]")
    with pytest.raises(ValueError, match="ragged.json: targets must be"):
        load_targets(tmp_path / "ragged.json")


def test_finished_samples_cuts_a_partial_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"sample": "a", "bytes": 1}\n{"sample": "b", "by')
    assert finished_samples(out) == {"a"}
    assert out.read_text() == '{"sample": "a", "bytes": 1}\n'
    out.write_text("not json\n")
    with pytest.raises(ValueError, match="r.jsonl:1: not a screening result line"):
        finished_samples(out)


# --------------------------------------------------------------------------- CLI

PROTOCOL = "0.1.7"                      # 1024 x 16 rows, 256 SIGReg slices
CONTRACT = {"max_seq_len": 1024, "batch_size": 16,
            "sig_reg_config": SIGRegConfig.for_protocol(PROTOCOL)}


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, weights, targets):
    folder = tmp_path_factory.mktemp("screen")
    for i, arrays in enumerate(weights):
        save_file(folder / f"m{i}.safetensors", arrays, file_metadata(CONFIG))
    (folder / "samples" / "more").mkdir(parents=True)
    # 1 byte, and one byte over a 0.1.7 batch (16 KiB), in a folder tree (the library tests
    # above cover every boundary at small sizes).
    for name, n in (("one.bin", 1), ("more/over.bin", 1024 * 16 + 1)):
        (folder / "samples" / name).write_bytes(data_of(n, seed=n))
    np.save(folder / "targets.npy", targets)
    return folder


def screen_cli(folder, *extra):
    return main(["screen", "--models", *(str(folder / f"m{i}.safetensors") for i in range(3)),
                 "--targets", str(folder / "targets.npy"), "--protocol", PROTOCOL,
                 "--quiet", *extra])


def test_cli_screen_with_protocol_and_resume(cli_files, weights, targets, capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    samples = cli_files / "samples"
    assert screen_cli(cli_files, "--data", str(samples / "one.bin"), "--out", str(out),
                      "--threshold", "0.9", "--embeddings") == 0
    assert "screened 1 samples" in capsys.readouterr().err
    first = out.read_text()
    # Rerun over the whole folder: the finished sample is skipped, the others appended.
    assert screen_cli(cli_files, "--data", str(samples), "--out", str(out),
                      "--threshold", "0.9", "--embeddings") == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert summary.startswith("screened 1 samples (1 already done), ")
    assert "samples/s" in summary
    assert out.read_text().startswith(first)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in records] == [str(samples / p) for p in
                                              ("one.bin", "more/over.bin")]
    hits = 0
    for record in records:
        data = Path(record["sample"]).read_bytes()
        expected = compete(weights, data, 0, target=targets[0], model_config=CONFIG, **CONTRACT)
        np.testing.assert_allclose(record["losses"], expected.losses, rtol=LOSS_RTOL, atol=0)
        assert record["winner"] == expected.winner and record["bytes"] == len(data)
        np.testing.assert_allclose(record["embedding"], expected.embedding, rtol=RTOL, atol=ATOL)
        distances = [cosine_distance(expected.embedding, t) for t in targets]
        np.testing.assert_allclose(record["distances"], distances, rtol=RTOL, atol=ATOL)
        assert record["nearest"] == int(np.argmin(distances))
        assert record["hit"] == (record["distance"] < 0.9)
        hits += record["hit"]
    assert f", {hits - records[0]['hit']} hits," in summary
    # Everything done: a third run screens nothing and leaves the file alone.
    before = out.read_text()
    assert screen_cli(cli_files, "--data", str(samples), "--out", str(out)) == 0
    assert capsys.readouterr().err.strip().startswith("screened 0 samples (2 already done)")
    assert out.read_text() == before


def test_cli_resume_refuses_results_of_another_screening(cli_files, capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    one = str(cli_files / "samples" / "one.bin")
    assert screen_cli(cli_files, "--data", one, "--out", str(out)) == 0
    capsys.readouterr()
    (line,) = out.read_text().splitlines()
    assert len(json.loads(line)["run"]) == 16
    # A partial line left by an interrupted write is not cut when the run is refused.
    with open(out, "a") as fh:
        fh.write('{"sample": "cut')
    before = out.read_bytes()
    assert screen_cli(cli_files, "--data", one, "--out", str(out), "--seed", "1") == 1
    assert_one_line_error(capsys.readouterr().err, "results.jsonl:1: written by another "
                          "screening", "use another --out")
    assert out.read_bytes() == before
    # The same screening resumes (and cuts the partial line).
    assert screen_cli(cli_files, "--data", one, "--out", str(out)) == 0
    assert capsys.readouterr().err.strip().startswith("screened 0 samples (1 already done)")
    assert out.read_text() == line + "\n"


def test_cli_screen_to_stdout_without_embeddings(cli_files, capsys):
    assert screen_cli(cli_files, "--data", str(cli_files / "samples" / "one.bin"),
                      "--micro-batch-size", "1") == 0
    captured = capsys.readouterr()
    (record,) = [json.loads(line) for line in captured.out.splitlines()]
    assert "embedding" not in record and "hit" not in record
    assert set(record) == {"sample", "bytes", "exact", "losses", "winner", "loss", "distances",
                           "nearest", "distance", "run"}
    assert "no --threshold" in captured.err


def test_cli_wrong_target_dimension(cli_files, tmp_path, capsys):
    (tmp_path / "t.json").write_text("[[1, 2, 3]]")
    code = main(["screen", "--models", str(cli_files / "m0.safetensors"), "--targets",
                 str(tmp_path / "t.json"), "--data", str(cli_files / "samples"), "--quiet"])
    assert code == 1
    assert_one_line_error(capsys.readouterr().err, "targets have 3 values each",
                          "embeddings have 16")


def test_cli_empty_sample(cli_files, tmp_path, capsys):
    (tmp_path / "empty.bin").write_bytes(b"")
    assert screen_cli(cli_files, "--data", str(tmp_path)) == 1
    assert_one_line_error(capsys.readouterr().err, "empty.bin: sample is empty")


def test_cli_sample_over_the_submission_limit(cli_files, tmp_path, capsys):
    (tmp_path / "big.bin").write_bytes(bytes(1_048_577))
    assert screen_cli(cli_files, "--data", str(tmp_path)) == 1
    assert_one_line_error(capsys.readouterr().err, "big.bin: 1,048,577 bytes",
                          "limit of 1,048,576 bytes")


def test_cli_wrong_key(cli_files, weights, tmp_path, capsys):
    encrypted, key = encrypt_weights((cli_files / "m0.safetensors").read_bytes())
    (tmp_path / "enc.safetensors").write_bytes(encrypted)
    wrong = encrypt_weights(b"")[1]                   # another valid key (Base58 under 0.1.7)
    args = ["screen", "--models", str(tmp_path / "enc.safetensors"),
            str(cli_files / "m1.safetensors"), "--targets", str(cli_files / "targets.npy"),
            "--data", str(cli_files / "samples" / "one.bin"), "--quiet"]
    assert main([*args, "--key", wrong, "--key", "none"]) == 1
    assert_one_line_error(capsys.readouterr().err, "wrong decryption key?")
    assert main([*args, "--key", "not-a-key", "--key", "none"]) == 1
    assert_one_line_error(capsys.readouterr().err, "decryption key must be")
    assert main([*args, "--key", key]) == 1                       # one key for two models
    assert_one_line_error(capsys.readouterr().err, "got 1 --key for 2 weights file(s)")
    assert main([*args, "--key", key, "--key", "none"]) == 0
    assert '"sample"' in capsys.readouterr().out


def test_nan_losses_follow_the_runtime_argmin(weights):
    """SPEC §7: a NaN loss at index 0 wins, a NaN elsewhere is passed over (as `compete`)."""
    broken = {k: v.copy() for k, v in weights[0].items()}
    broken["final_norm.beta"][0] = np.nan
    sizes = {"model_config": CONFIG, "sig_reg_config": SIG_REG, "max_seq_len": SEQ,
             "batch_size": BATCH}
    data = data_of(30, seed=2)
    target = np.ones(CONFIG.embedding_dim, dtype=np.float32)
    for models, nan_at in (([broken, weights[1]], 0), ([weights[1], broken, weights[2]], 1)):
        with pytest.warns(UserWarning, match="NaN loss"):
            (result,) = screen(models, [("x", data)], target, **sizes)
        with pytest.warns(UserWarning, match="NaN loss"):
            expected = compete(models, data, 0, target=target, **sizes)
        assert result.winner == expected.winner
        assert np.isnan(result.losses[nan_at])
        assert result.to_json()["losses"][nan_at] is None
        if nan_at == 0:
            assert result.winner == 0 and np.isnan(result.loss)
        else:
            assert result.winner != nan_at and not np.isnan(result.loss)
