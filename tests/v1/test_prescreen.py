"""The bf16 prescreen: its margins and decision (framework-free), and screening with it.

The backbone is planted hits: the targets include the exact winner embeddings of some
samples, so those samples are hits at distance ~0. The prescreen must never drop them,
every sample it keeps must get exactly the line exact screening writes (micro-batches of
one row make both runs compute each row alike, so "exactly" is field for field, bit for
bit), and every sample it drops must be a miss under exact screening.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from tests.test_cli import assert_one_line_error
from tests.v1.test_scoring import data_of, random_weights

from soma_models.cli import main
from soma_models.safetensors_io import save_file
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.prescreen import (
    MARGIN_FLOOR,
    Approximate,
    Margins,
    calibrate,
    can_drop,
    largest_deviations,
)
from soma_models.v1.schema import file_metadata
from soma_models.v1.screening import DroppedSample, SampleResult, Screener

CONFIG = ModelConfig(embedding_dim=16, num_heads=2, num_layers=1, pwff_hidden_dim=32)
SIZES = {"model_config": CONFIG, "sig_reg_config": SIGRegConfig(slices=48), "max_seq_len": 16,
         "batch_size": 4}
PLANTED = (5, 11, 14)
THRESHOLD = 0.02


def approx(losses, distances) -> Approximate:
    return Approximate(np.array(losses, float), np.array(distances, float))


# --------------------------------------------------------------------------- margins

def test_calibrated_margins_are_k_times_the_largest_deviation_with_a_floor():
    exact = [approx([2.0, 3.0], [[0.5], [0.6]]), approx([1.0, 1.5], [[0.2], [0.9]])]
    rough = [approx([2.01, 2.98], [[0.5], [0.61]]), approx([1.0, 1.5], [[0.203], [0.9]])]
    assert largest_deviations(rough, exact) == pytest.approx((0.02, 0.01))
    margins = calibrate(rough, exact, factor=4.0)
    assert (margins.loss, margins.distance) == pytest.approx((0.08, 0.04))
    assert (margins.loss_deviation, margins.distance_deviation) == pytest.approx((0.02, 0.01))
    assert margins.samples == 2
    # No deviation at all: the floor, not zero.
    same = calibrate(exact, exact)
    assert (same.loss, same.distance) == (MARGIN_FLOOR, MARGIN_FLOOR)
    # Given by hand: taken as given, and not reported as measured.
    given = calibrate(rough, exact, margin_loss=0.5)
    assert given.loss == 0.5 and given.loss_deviation is None
    assert given.distance == pytest.approx(0.04)
    with pytest.raises(ValueError, match="margin_distance must be a positive finite number"):
        calibrate(rough, exact, margin_distance=float("inf"))


def test_non_finite_values_are_left_out_of_the_deviations():
    exact = [approx([1.0, math.nan], [[0.5], [math.nan]])]
    rough = [approx([1.001, 2.0], [[0.502], [0.3]])]
    assert largest_deviations(rough, exact) == pytest.approx((0.001, 0.002))


def test_drop_only_when_every_contender_is_far_from_every_target():
    margins = Margins(loss=0.1, distance=0.05)
    threshold = 0.3
    # Model 1 is within 2 dL of the lowest loss and near a target (0.33 <= 0.3 + 0.05).
    assert not can_drop(approx([1.0, 1.19], [[0.9, 0.8], [0.33, 0.9]]), threshold, margins)
    # The same model beyond 2 dL cannot be the exact winner: the sample is a proven miss.
    assert can_drop(approx([1.0, 1.21], [[0.9, 0.8], [0.33, 0.9]]), threshold, margins)
    # The lowest model itself near a target: kept.
    assert not can_drop(approx([1.0, 2.0], [[0.34, 0.9], [0.9, 0.9]]), threshold, margins)
    assert can_drop(approx([1.0, 2.0], [[0.36, 0.9], [0.9, 0.9]]), threshold, margins)
    # Anything non-finite is for the exact pass to settle.
    assert not can_drop(approx([math.nan, 2.0], [[0.9], [0.9]]), threshold, margins)
    assert not can_drop(approx([1.0, 2.0], [[math.nan], [0.9]]), threshold, margins)


def test_approximate_nearest_is_the_approximate_winners():
    a = approx([2.0, 1.0], [[0.1, 0.2], [0.7, 0.6]])
    assert a.nearest() == (1, 0.6)
    assert approx([1.0], [[math.nan]]).nearest() == (None, None)


# --------------------------------------------------------------------------- screening

@pytest.fixture(scope="module")
def weights():
    return [random_weights(CONFIG, seed) for seed in (11, 12, 13)]


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    # Text-like and uniform bytes, 1 to ~130 bytes (1 to 3 batches of 64 bytes).
    return [(f"s{i}", data_of(int(rng.integers(1, 130)), seed=i) if i % 2 else
             rng.integers(0, 256, int(rng.integers(1, 130)), dtype=np.uint8).tobytes())
            for i in range(16)]


@pytest.fixture(scope="module")
def targets(weights, samples):
    """The exact winner embeddings of the PLANTED samples, and one random target."""
    rng = np.random.default_rng(1)
    first = Screener(weights, rng.standard_normal((1, 16)), micro_batch_size=1, **SIZES)
    results = list(first.screen([samples[i] for i in PLANTED]))
    return np.stack([r.embedding for r in results] +
                    [rng.standard_normal(16).astype(np.float32)])


def test_prescreen_keeps_planted_hits_and_writes_exact_lines(weights, samples, targets):
    calibration_samples = 4
    exact = list(Screener(weights, targets, threshold=THRESHOLD, micro_batch_size=1,
                          **SIZES).screen(samples))
    screener = Screener(weights, targets, threshold=THRESHOLD, micro_batch_size=1,
                        prescreen="bf16", calibration_samples=calibration_samples, **SIZES)
    fast = list(screener.screen(samples))
    assert [r.sample for r in fast] == [name for name, _ in samples]
    dropped = [i for i, r in enumerate(fast) if not r.exact]
    for i in PLANTED:
        assert fast[i].exact and fast[i].hit and fast[i].distance < 1e-5
    # The calibration samples are scored exactly whatever they are.
    assert not set(dropped) & set(range(calibration_samples))
    for ours, reference in zip(fast, exact):
        if ours.exact:
            assert isinstance(ours, SampleResult)
            assert ours.to_json(True) == reference.to_json(True)
        else:
            assert isinstance(ours, DroppedSample)
            # A proven miss is a miss, and its approximate distance is within the margin.
            assert not reference.hit and reference.distance >= THRESHOLD
            assert ours.to_json() == {"sample": ours.sample, "bytes": reference.bytes,
                                      "exact": False, "nearest": ours.nearest,
                                      "distance": ours.distance, "hit": False}
            assert abs(ours.distance - reference.distance) <= screener.margins.distance
    # Not vacuous: the prescreen proves most samples misses.
    assert len(dropped) > len(samples) // 2


def test_calibrated_margins_are_positive_and_finite(weights, samples, targets):
    screener = Screener(weights, targets, threshold=THRESHOLD, prescreen="bf16",
                        calibration_samples=8, **SIZES)
    list(screener.screen(samples[:10]))
    margins = screener.margins
    assert margins.samples == 8
    for value in (margins.loss, margins.distance):
        assert math.isfinite(value) and value >= MARGIN_FLOOR
    # bf16 does differ from float32 on these models, and the margin is 4x what was seen.
    assert 0 < margins.loss_deviation and 0 < margins.distance_deviation
    assert margins.loss == pytest.approx(max(4 * margins.loss_deviation, MARGIN_FLOOR))
    assert margins.distance == pytest.approx(max(4 * margins.distance_deviation, MARGIN_FLOOR))
    # Margins given by hand skip calibration: every sample is decided by them.
    given = Screener(weights, targets, threshold=THRESHOLD, prescreen="bf16",
                     margin_loss=0.5, margin_distance=0.25, **SIZES)
    assert (given.margins.loss, given.margins.distance, given.margins.samples) == (0.5, 0.25, 0)


def test_prescreen_refusals(weights, targets):
    with pytest.raises(ValueError, match="prescreen 'bf16' needs a threshold"):
        Screener(weights, targets, prescreen="bf16", **SIZES)
    with pytest.raises(ValueError, match="prescreen must be one of bf16, got 'fp8'"):
        Screener(weights, targets, prescreen="fp8", threshold=0.1, **SIZES)
    with pytest.raises(ValueError, match="margin_loss must be a positive finite number"):
        Screener(weights, targets, prescreen="bf16", threshold=0.1, margin_loss=0.0, **SIZES)
    with pytest.raises(ValueError, match="runs with the torch framework; the flax backend "
                                         "scores in float32 only"):
        Screener(weights, targets, prescreen="bf16", threshold=0.1, framework="flax", **SIZES)


# --------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, weights, samples, targets):
    folder = tmp_path_factory.mktemp("prescreen")
    for i, arrays in enumerate(weights):
        save_file(folder / f"m{i}.safetensors", arrays, file_metadata(CONFIG))
    (folder / "samples").mkdir()
    for name, data in samples[:10]:
        (folder / "samples" / f"{name}.bin").write_bytes(data)
    np.save(folder / "targets.npy", targets)
    return folder


def screen_cli(folder, *extra):
    return main(["screen", "--models", *(str(folder / f"m{i}.safetensors") for i in range(3)),
                 "--targets", str(folder / "targets.npy"), "--data", str(folder / "samples"),
                 "--quiet", "--micro-batch-size", "1", *extra])


def test_cli_prescreen_lines_resume_and_summary(cli_files, tmp_path, capsys):
    exact_out, fast_out = tmp_path / "exact.jsonl", tmp_path / "fast.jsonl"
    assert screen_cli(cli_files, "--threshold", "0.3", "--out", str(exact_out)) == 0
    capsys.readouterr()
    assert screen_cli(cli_files, "--threshold", "0.3", "--out", str(fast_out),
                      "--prescreen", "bf16", "--calibration-samples", "4") == 0
    summary = capsys.readouterr().err.strip()
    exact = [json.loads(line) for line in exact_out.read_text().splitlines()]
    fast = [json.loads(line) for line in fast_out.read_text().splitlines()]
    assert [r["sample"] for r in fast] == [r["sample"] for r in exact]
    kept = [f for f in fast if f["exact"]]
    assert all(f == e for f, e in zip(fast, exact) if f["exact"]) and kept
    dropped = len(fast) - len(kept)
    assert all(not e["hit"] for f, e in zip(fast, exact) if not f["exact"]) and dropped
    hits = sum(e["hit"] for e in exact)
    assert summary.startswith(f"screened {len(fast)} samples, {hits} hits, ")
    assert (f"prescreen bf16 dropped {dropped} as proven misses, re-scored "
            f"{len(kept)} exactly; margins loss ") in summary
    assert "largest deviation" in summary and "over 4 calibration samples" in summary
    # Both kinds of line count as done.
    before = fast_out.read_text()
    assert screen_cli(cli_files, "--threshold", "0.3", "--out", str(fast_out),
                      "--prescreen", "bf16") == 0
    assert capsys.readouterr().err.startswith(f"screened 0 samples ({len(fast)} already done)")
    assert fast_out.read_text() == before


@pytest.mark.parametrize("extra, fragments", [
    ([], ("prescreen 'bf16' needs a threshold",)),
    (["--threshold", "0.1", "--framework", "flax"], ("flax backend scores in float32 only",)),
])
def test_cli_prescreen_refusals_are_one_line(cli_files, capsys, extra, fragments):
    assert screen_cli(cli_files, "--prescreen", "bf16", *extra) == 1
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_cli_margin_must_be_positive(cli_files, capsys):
    with pytest.raises(SystemExit):
        screen_cli(cli_files, "--prescreen", "bf16", "--threshold", "0.1",
                   "--margin-loss", "-1")
    assert_one_line_error(capsys.readouterr().err, "--margin-loss",
                          "expected a positive finite number, got '-1'")
