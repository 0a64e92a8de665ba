"""Weights and numbers across packages: ours against the published soma-models 0.1.1 / 0.1.7.

For each version, `pip download soma-models==X --no-deps` fetches the wheel into a
temporary folder, which is unpacked and imported in a subprocess with that folder first
on `sys.path` (`published_side.py`). Both packages save a tiny model; each loads the
other's file. We check that the tensors survive the trip bit for bit, that `encode` of
the same weights agrees both ways (SPEC §9 tolerances), and that SIGReg.compute,
apply_rope and the tokenizer agree. The test is skipped, saying why, only when the wheel
cannot be downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from soma_models.safetensors_io import SafetensorsFile
from soma_models.v1.configs import ModelConfig, SIGRegConfig
from soma_models.v1.flax import Model as FlaxModel
from soma_models.v1.flax import SIGReg as FlaxSIGReg
from soma_models.v1.tokenizer import tokenize, tokenize_sequences
from soma_models.v1.torch import Model, SIGReg
from soma_models.v1.torch.modules.attention import apply_rope

RTOL = ATOL = 1e-5
SIZES = {"embedding_dim": 16, "pwff_hidden_dim": 32, "num_layers": 2, "num_heads": 2}
CONFIG = ModelConfig(**SIZES)
SIG_REG = {"slices": 16, "points": 17, "t_max": 3.0, "coefficient": 0.02}
MAX_SEQ_LEN, BATCH_SIZE = 12, 2
HERE = Path(__file__).parent


def _download(version: str, folder: Path) -> Path:
    """The unpacked wheel of soma-models==version (skips the test if pip cannot get it)."""
    wheels = folder / "wheels"
    command = [sys.executable, "-m", "pip", "download", f"soma-models=={version}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(wheels)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"could not download soma-models=={version}: {exc}")
    found = sorted(wheels.glob(f"soma_models-{version}-*.whl"))
    if done.returncode != 0 or not found:
        reason = (done.stderr.strip().splitlines() or ["no wheel in pip's output"])[-1]
        pytest.skip(f"could not download soma-models=={version} (pip exit "
                    f"{done.returncode}): {reason}")
    site = folder / "site"
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(site)
    return site


def _canonical_tensors(path: Path) -> dict[str, np.ndarray]:
    weights = SafetensorsFile(path)
    return {key: np.array(weights.array(key)) for key in weights.tensors}


def _assert_same_tensors(got: Path, want: Path) -> None:
    got_t, want_t = _canonical_tensors(got), _canonical_tensors(want)
    assert sorted(got_t) == sorted(want_t)
    for key, value in want_t.items():
        np.testing.assert_array_equal(got_t[key], value, err_msg=key)


@pytest.fixture(scope="module", params=["0.1.1", "0.1.7"])
def exchange(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Run both halves for one published version; returns (work dir, their results, inputs)."""
    version = request.param
    folder = tmp_path_factory.mktemp(f"soma-models-{version}")
    site = _download(version, folder)
    work = folder / "work"
    work.mkdir()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=5 * MAX_SEQ_LEN - 3, dtype=np.uint8)  # ends in EOS/PAD
    (row_batch,) = tokenize(data.tobytes(), MAX_SEQ_LEN, 3)[:1]
    inputs = {
        "data": data,
        "token_ids": np.array(row_batch.token_ids, dtype=np.int64),
        "pos_ids": np.array(row_batch.pos_ids, dtype=np.int64),
        "x": rng.standard_normal((2, 7, SIZES["embedding_dim"]), dtype=np.float32),
        "noise": rng.standard_normal((SIZES["embedding_dim"], SIG_REG["slices"]),
                                     dtype=np.float32),
        "rope_x": rng.standard_normal((3, MAX_SEQ_LEN, 2, 8), dtype=np.float32),
    }
    np.savez(work / "inputs.npz", **inputs)
    spec = {"config": SIZES, "seed": 1, "sig_reg": SIG_REG, "head_dim": 8,
            "max_seq_len": MAX_SEQ_LEN, "batch_size": BATCH_SIZE}
    (work / "spec.json").write_text(json.dumps(spec))
    torch.manual_seed(7)
    Model(CONFIG).save(work / "torch_ours.safetensors")
    FlaxModel(CONFIG, nnx.Rngs(7)).save(work / "flax_ours.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    done = subprocess.run([sys.executable, str(HERE / "published_side.py"), str(site), str(work)],
                          capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, f"published {version} side failed:\n{done.stderr[-4000:]}"
    return version, work, dict(np.load(work / "theirs.npz")), inputs


def test_torch_weights_load_both_ways_with_identical_tensors_and_representations(exchange):
    _, work, theirs, inputs = exchange
    tokens, positions = torch.from_numpy(inputs["token_ids"]), torch.from_numpy(inputs["pos_ids"])
    # Their file in ours: same tensors, same representations.
    model = Model.load(work / "torch_theirs.safetensors", CONFIG).eval()
    model.save(work / "torch_theirs_resaved.safetensors")
    _assert_same_tensors(work / "torch_theirs_resaved.safetensors",
                         work / "torch_theirs.safetensors")
    with torch.no_grad():
        got = model.encode(input=tokens, positions=positions).numpy()
    np.testing.assert_allclose(got, theirs["torch_theirs_encode"], rtol=RTOL, atol=ATOL)
    # Our file in theirs: they re-save exactly our tensors and compute our representations.
    _assert_same_tensors(work / "torch_ours_resaved.safetensors", work / "torch_ours.safetensors")
    with torch.no_grad():
        ours = Model.load(work / "torch_ours.safetensors", CONFIG).eval()
        want = ours.encode(tokens, positions).numpy()
    np.testing.assert_allclose(theirs["torch_ours_encode"], want, rtol=RTOL, atol=ATOL)


def test_flax_weights_load_both_ways_with_identical_tensors_and_representations(exchange):
    _, work, theirs, inputs = exchange
    model = FlaxModel.load(work / "flax_theirs.safetensors", CONFIG, nnx.Rngs(0))
    model.save(work / "flax_theirs_resaved.safetensors")
    _assert_same_tensors(work / "flax_theirs_resaved.safetensors",
                         work / "flax_theirs.safetensors")
    got = np.asarray(model.encode(inputs["token_ids"], positions=inputs["pos_ids"]))
    np.testing.assert_allclose(got, theirs["flax_theirs_encode"], rtol=RTOL, atol=ATOL)
    _assert_same_tensors(work / "flax_ours_resaved.safetensors", work / "flax_ours.safetensors")
    ours = FlaxModel.load(work / "flax_ours.safetensors", CONFIG, nnx.Rngs(0))
    want = np.asarray(ours.encode(inputs["token_ids"], inputs["pos_ids"]))
    np.testing.assert_allclose(theirs["flax_ours_encode"], want, rtol=RTOL, atol=ATOL)


def test_files_cross_frameworks_and_packages(exchange):
    """Their torch file in our Flax model gives their torch representations."""
    _, work, theirs, inputs = exchange
    model = FlaxModel.load(work / "torch_theirs.safetensors", CONFIG, nnx.Rngs(0))
    got = np.asarray(model.encode(inputs["token_ids"], inputs["pos_ids"]))
    np.testing.assert_allclose(got, theirs["torch_theirs_encode"], rtol=RTOL, atol=ATOL)


def test_sig_reg_compute_matches(exchange):
    _, _, theirs, inputs = exchange
    config = SIGRegConfig(**SIG_REG)
    x, noise = inputs["x"], inputs["noise"]
    torch_value = SIGReg(config).compute(torch.from_numpy(x), torch.from_numpy(noise)).item()
    flax_value = float(FlaxSIGReg(config, nnx.Rngs(0)).compute(x, noise))
    np.testing.assert_allclose(torch_value, theirs["torch_sig_reg"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(flax_value, theirs["flax_sig_reg"], rtol=RTOL, atol=ATOL)


def test_apply_rope_in_the_published_form_matches(exchange):
    _, _, theirs, inputs = exchange
    got = apply_rope(torch.from_numpy(inputs["rope_x"]), torch.from_numpy(inputs["pos_ids"]), 8)
    np.testing.assert_allclose(got.numpy(), theirs["torch_rope"], rtol=RTOL, atol=ATOL)


def test_tokenizer_rows_match(exchange):
    version, _, theirs, inputs = exchange
    data = inputs["data"].tobytes()
    assert int(theirs["tokenize_empty"]) == 0 == len(tokenize(b"")) == len(tokenize_sequences(b""))
    if version == "0.1.7":
        rows = tokenize_sequences(data, max_seq_len=MAX_SEQ_LEN)
        np.testing.assert_array_equal(np.array([list(r) for r in rows]), theirs["tokenize"])
    else:
        batches = tokenize(data, max_seq_len=MAX_SEQ_LEN, batch_size=BATCH_SIZE)
        rows = [row for b in batches for row in zip(b.token_ids, b.targets, b.pos_ids)]
        np.testing.assert_array_equal(np.array(rows), theirs["tokenize"])
        assert [len(b.token_ids) for b in batches] == theirs["batch_rows"].tolist()
