"""`publish`: validate, embed, encrypt and write a manifest for registration (SPEC §8)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import base58
import numpy as np
import pytest
from tests.test_cli import assert_one_line_error

from soma_models.cli import main
from soma_models.v1 import publish
from soma_models.v1.configs import ModelConfig
from soma_models.v1.initialization import write_initial_weights
from soma_models.v1.registration import MANIFEST_NAME, PublishError, read_manifest
from soma_models.v1.scoring import score
from soma_models.v1.transit import decrypt_file, embedding_bcs

# The files here are narrow (published with any_width=True); that warning is tested once.
pytestmark = pytest.mark.filterwarnings("ignore:.*not the network's V1 width:UserWarning")
TINY = ModelConfig(embedding_dim=32, num_heads=2, num_layers=1, pwff_hidden_dim=64)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("publish")
    weights = folder / "model.safetensors"
    write_initial_weights(weights, TINY, seed=4)
    data = folder / "data.bin"
    data.write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 2500, dtype=np.uint8)))
    return weights, data


def blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


@pytest.mark.parametrize("protocol, encode", [
    ("0.1.7", lambda raw: base58.b58encode(raw).decode()),
    ("0.1.1", lambda raw: raw.hex()),
])
def test_publish_round_trip(inputs, tmp_path, protocol, encode):
    weights, data = inputs
    out = tmp_path / "release"
    manifest = publish(weights, data.read_bytes(), out, protocol=protocol, any_width=True)
    doc = read_manifest(out)
    assert sorted(os.listdir(out)) == sorted([MANIFEST_NAME, doc["weights_file"]])
    assert doc == json.loads((out / MANIFEST_NAME).read_text()) == manifest.to_dict()
    assert doc["protocol"] == protocol and doc["architecture_version"] == 1
    encrypted = (out / doc["weights_file"]).read_bytes()
    # Checksum and size are the encrypted file's, recomputed here.
    assert doc["size"] == len(encrypted) == weights.stat().st_size
    assert doc["checksum"] == encode(blake(encrypted))
    # Decrypting with the written key gives the original bytes.
    key = base58.b58decode(doc["decryption_key"]) if protocol == "0.1.7" \
        else bytes.fromhex(doc["decryption_key"])
    assert len(key) == 32 and doc["decryption_key"] == encode(key)
    assert bytes(decrypt_file(out / doc["weights_file"], key)) == weights.read_bytes()
    assert encrypted != weights.read_bytes()
    assert doc["decryption_key_commitment"] == encode(blake(key))
    # The embedding: the running-mean embedding with seed 0, as scoring computes it.
    expected = score(weights, data.read_bytes(), 0, protocol=protocol).embedding
    embedding = np.asarray(doc["embedding"], dtype=np.float32)
    np.testing.assert_array_equal(embedding, expected)
    assert doc["embedding_commitment"] == encode(blake(embedding_bcs(embedding)))
    assert doc["embedding_data"] == {"checksum": encode(blake(data.read_bytes())),
                                     "size": 2500, "seed": 0}


def test_publish_with_a_given_key_in_any_form(inputs, tmp_path):
    weights, data = inputs
    raw = bytes(range(32))
    a = publish(weights, data.read_bytes(), tmp_path / "a", key=raw.hex(), any_width=True)
    b = publish(weights, data.read_bytes(), tmp_path / "b", any_width=True,
                key=base58.b58encode(raw).decode())
    assert a.decryption_key == b.decryption_key == base58.b58encode(raw).decode()
    assert a.checksum == b.checksum
    # A fresh key each time otherwise.
    c = publish(weights, data.read_bytes(), tmp_path / "c", any_width=True)
    d = publish(weights, data.read_bytes(), tmp_path / "d", any_width=True)
    assert c.decryption_key != d.decryption_key and c.checksum != d.checksum


def test_publish_refusals_leave_nothing(inputs, tmp_path):
    weights, data = inputs
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(PublishError, match="not an empty folder"):
        publish(weights, data.read_bytes(), busy, any_width=True)
    assert os.listdir(busy) == ["x"]
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(PublishError, match="not publishable"):
        publish(damaged, data.read_bytes(), tmp_path / "out", any_width=True)
    with pytest.raises(PublishError, match="empty"):
        publish(weights, b"", tmp_path / "out", any_width=True)
    assert sorted(os.listdir(tmp_path)) == ["busy", "damaged.safetensors"]
    # An empty folder is fine: it is replaced whole.
    empty = tmp_path / "empty"
    empty.mkdir()
    publish(weights, data.read_bytes(), empty, any_width=True)
    assert MANIFEST_NAME in os.listdir(empty)


def test_weights_of_another_width_are_refused_unless_asked(inputs, tmp_path, capsys):
    """The runtime's sizes are compiled in (SPEC §4): a registration of any other width
    would be rejected on chain, so publish refuses it unless told it is a local test."""
    weights, data = inputs
    with pytest.raises(PublishError, match=r"embedding_dim 32, pwff_hidden_dim 64, vocab_size "
                                           r"264, where the network's V1 has 2048, 8192, 264"):
        publish(weights, data.read_bytes(), tmp_path / "out")
    assert main(["publish", str(weights), "--data", str(data), "-o", str(tmp_path / "cli"),
                 "--quiet"]) == 1
    assert_one_line_error(capsys.readouterr().err, "not publishable", "--any-width")
    assert sorted(os.listdir(tmp_path)) == []
    with pytest.warns(UserWarning, match="not the network's V1 width"):
        publish(weights, data.read_bytes(), tmp_path / "out", any_width=True)


def test_publish_cli(inputs, tmp_path, capsys):
    weights, data = inputs
    out = tmp_path / "cli"
    assert main(["publish", str(weights), "--data", str(data), "-o", str(out), "--json",
                 "--any-width",
                 "--protocol", "0.1.1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == read_manifest(out) and doc["protocol"] == "0.1.1"
    assert len(doc["decryption_key"]) == 64
    assert main(["publish", str(weights), "--data", str(data), "-o", str(tmp_path / "h"),
                 "--any-width"]) == 0
    text = capsys.readouterr().out
    assert "protocol   0.1.7" in text and "checksum" in text
    with pytest.raises(SystemExit):
        main(["publish", "--help"])
    assert "representative" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_killed_publish_leaves_no_partial_folder_and_no_litter(tmp_path, signum):
    """Kill the publish while its staging folder exists: all or nothing, no litter."""
    weights = tmp_path / "big.safetensors"
    # ~40 MB, so that encrypting takes long enough to be caught in the act.
    write_initial_weights(weights, ModelConfig(embedding_dim=256, num_heads=4, num_layers=12,
                                               pwff_hidden_dim=1024), seed=0)
    data = tmp_path / "d.bin"
    data.write_bytes(b"x")
    out = tmp_path / "release"
    before = set(os.listdir(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "soma_models", "publish", str(weights),
                                "--data", str(data), "-o", str(out), "--quiet", "--any-width"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    caught = False
    deadline = time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if any(name.startswith(".release.publish-") for name in os.listdir(tmp_path)):
            process.send_signal(signum)
            caught = True
            break
        time.sleep(0.001)
    process.wait(timeout=60)
    assert caught, "the publish finished before its staging folder was seen"
    # The watchdog (SIGKILL) or the handler (SIGTERM) removes the staging folder.
    for _ in range(500):
        if set(os.listdir(tmp_path)) in (before, before | {"release"}):
            break
        time.sleep(0.01)
    after = set(os.listdir(tmp_path))
    if out.exists():  # the signal came after the rename: the folder must be complete
        assert after == before | {"release"}
        doc = read_manifest(out)
        assert (out / doc["weights_file"]).stat().st_size == doc["size"]
    else:
        assert after == before, after - before
        assert process.returncode != 0
    if signum == signal.SIGTERM and caught and not out.exists():
        assert b"Traceback" not in process.stderr.read()
