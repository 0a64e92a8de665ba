"""Get trained weights ready for registration on the network (SPEC §8), offline.

`publish(weights, data, output_dir)` validates the file for a revision, encrypts it with
AES-256-CTR (a fresh random key unless one is given) into `output_dir/`, and writes
`output_dir/manifest.json` with everything the network's `commit_model` and
`reveal_model` take: the encrypted file's name, checksum (Blake2b-256 of the *encrypted*
bytes) and size, the decryption key, the embedding and the two commitments. Keys and
hashes are written in the revision's encoding (Base58 under "0.1.7", hex under "0.1.1").
Nothing is uploaded and no chain is contacted.

The embedding is the running-mean embedding of the weights on `data` with seed 0,
computed by `soma_models.v1.scoring.score` exactly as the chain scores. The chain assigns
models to targets by the distance between their registered embedding and the targets, so
`data` should be representative of what the model is for.

All or nothing: the encrypted file and the manifest are written in a hidden staging
folder next to `output_dir`, which is renamed into place at the end. An exception or a
SIGTERM removes the staging folder; so does a tiny watchdog process when the publish is
killed outright (SIGKILL). A staging folder that still survives (say, the machine lost
power) carries its process id and is removed by the next `publish` to the same folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from soma_models.v1.configs import V1_EMBEDDING_DIM, V1_PWFF_HIDDEN_DIM, V1_VOCAB_SIZE
from soma_models.v1.revisions import ARCHITECTURE_VERSION, Revision, resolve
from soma_models.v1.sources import check_weights
from soma_models.v1.transit import (
    CHUNK_BYTES,
    KeyLike,
    digest,
    embedding_commitment,
    encode_text,
    iter_ctr_file,
    key_commitment,
    new_key,
    parse_key,
)

MANIFEST_NAME = "manifest.json"
#: The seed the chain's registration embedding (and audit) uses.
EMBEDDING_SEED = 0
_STAGING_MARK = ".publish-"
MANIFEST_KEYS = ("protocol", "architecture_version", "weights_file", "checksum", "size",
                 "decryption_key", "embedding", "embedding_commitment",
                 "decryption_key_commitment")


class PublishError(ValueError):
    """The weights cannot be published as they are (one line naming the problem)."""


@dataclass(frozen=True)
class Manifest:
    """What `publish` wrote. Text fields are in the revision's encoding (Base58 or hex)."""

    protocol: str
    architecture_version: int
    weights_file: str
    checksum: str
    size: int
    decryption_key: str
    embedding: np.ndarray
    embedding_commitment: str
    decryption_key_commitment: str
    data_checksum: str
    data_size: int
    seed: int = EMBEDDING_SEED

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "architecture_version": self.architecture_version,
            "weights_file": self.weights_file,
            "checksum": self.checksum,
            "size": self.size,
            "decryption_key": self.decryption_key,
            "embedding": [float(v) for v in self.embedding],
            "embedding_commitment": self.embedding_commitment,
            "decryption_key_commitment": self.decryption_key_commitment,
            "embedding_data": {"checksum": self.data_checksum, "size": self.data_size,
                               "seed": self.seed},
        }


# --------------------------------------------------------------------------- staging

def _staging_prefix(output: Path) -> str:
    return f".{output.name}{_STAGING_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_staging(output: Path) -> None:
    """Remove staging folders of earlier publishes to `output` whose process is gone."""
    prefix = _staging_prefix(output)
    for entry in output.parent.glob(prefix + "*"):
        pid_text = entry.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


# A separate, minimal interpreter that removes the staging folder unless told the publish
# finished: it notices its parent's death (even by SIGKILL) as end-of-file on its stdin. It
# ignores SIGINT/SIGTERM and runs in its own session, so the signals that stop the publish
# do not stop it before it has cleaned up.
_WATCHDOG = """
import shutil, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if sys.stdin.buffer.read() != b"done":
    shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


@contextlib.contextmanager
def _staging_folder(output: Path) -> Iterator[Path]:
    """A hidden folder next to `output` that disappears unless renamed away.

    An exception or SIGTERM removes it here; a SIGKILL leaves it to the watchdog process.
    """
    # The name is chosen, and the watchdog told, before the folder exists: no moment in
    # which a kill would leave an unguarded folder behind.
    staging = output.parent / f"{_staging_prefix(output)}{os.getpid()}.{secrets.token_hex(6)}"
    watchdog = None
    try:
        watchdog = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(staging)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
    except OSError:
        pass  # no watchdog: an exception still cleans up, a stale folder is removed later
    finished = False
    try:
        staging.mkdir(mode=0o700)
        yield staging
        finished = not staging.exists()
    finally:
        if not finished:
            shutil.rmtree(staging, ignore_errors=True)
        if watchdog is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                watchdog.communicate(b"done" if finished else b"", timeout=30)
            if watchdog.poll() is None:
                watchdog.kill()


@contextlib.contextmanager
def _sigterm_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception for the block, so that cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_output(output: Path) -> None:
    if output.exists() and not (output.is_dir() and not any(output.iterdir())):
        raise PublishError(f"{output}: already exists and is not an empty folder; choose "
                           "another output folder")
    if not output.parent.is_dir():
        raise PublishError(f"{output.parent}: no such folder for the output")


# --------------------------------------------------------------------------- publish

def publish(weights: str | os.PathLike, data: object, output_dir: str | os.PathLike, *,
            key: KeyLike | None = None, protocol: str | Revision | None = None,
            framework: str = "torch", device: object = None,
            micro_batch_size: int | str | None = "auto", progress: bool = False,
            any_width: bool = False) -> Manifest:
    """Validate, embed and encrypt `weights` for registration; write `output_dir/`.

    weights: a plain (unencrypted) safetensors file.
    data: bytes-like data representative of what the model is for (the embedding is its
        running-mean embedding with seed 0; the chain assigns targets by embedding
        distance). Empty data is refused.
    output_dir: a folder that does not exist yet (or is empty); it appears complete or
        not at all.
    key: the AES-256 key (Base58, 64 hex or 32 bytes); None draws a fresh random one.
    protocol: the revision ("0.1.7", "0.1.1"; None: the process-wide one). It decides the
        scoring settings of the embedding and the text encoding of keys and hashes.
    framework, device, micro_batch_size, progress: as for `score`.
    any_width: publish a file whose sizes are not the network's V1 width (local tests).
        Without it such a file is refused: the runtime's sizes are compiled in and it
        rejects any tensor of another shape (SPEC §4), so the registration would be lost.
    Returns the `Manifest` written to `output_dir/manifest.json`.
    """
    from soma_models.v1.scoring import score
    from soma_models.v1.validation import validate

    check_weights(weights, ("path",))
    revision = resolve(protocol)
    source = Path(weights)
    output = Path(output_dir)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such weights file")
    _check_output(output)
    raw_key = new_key() if key is None else parse_key(key)
    data_view = memoryview(data)  # type: ignore[arg-type]
    if data_view.nbytes == 0:
        raise PublishError("data is empty: the embedding needs at least one byte "
                           "(the runtime refuses empty data)")

    report = validate(source, protocol=revision)
    if not report.ok:
        raise PublishError(f"{source}: not publishable: " + "; ".join(report.errors))
    if report.non_finite:
        raise PublishError(f"{source}: not publishable: {report.non_finite} NaN/Inf value(s) "
                           "(the runtime would score it NaN)")
    if not report.network_width:
        config = report.config
        found = (f"embedding_dim {config.embedding_dim}, pwff_hidden_dim "
                 f"{config.pwff_hidden_dim}, vocab_size {config.vocab_size}")
        if not any_width:
            raise PublishError(
                f"{source}: not publishable: {found}, where the network's V1 has "
                f"{V1_EMBEDDING_DIM}, {V1_PWFF_HIDDEN_DIM}, {V1_VOCAB_SIZE} and its runtime "
                "rejects every other shape; pass any_width=True (--any-width) to publish "
                "it for a local test")
        warnings.warn(f"{source}: {found} is not the network's V1 width: published for a "
                      "local test only (the runtime would reject it)", UserWarning,
                      stacklevel=2)
    for caveat in report.caveats:  # accepted by the runtime, but worth a line
        warnings.warn(f"{source}: {caveat}", UserWarning, stacklevel=2)
    embedding = score(source, data_view, EMBEDDING_SEED, protocol=revision,
                      framework=framework, device=device, micro_batch_size=micro_batch_size,
                      progress=progress).embedding
    if not np.all(np.isfinite(embedding)):
        raise PublishError(f"{source}: the embedding on this data has NaN/Inf values; a "
                           "model with such an embedding cannot be registered")

    encrypted_name = f"{source.name}.enc"
    with _sigterm_as_exception():
        _remove_stale_staging(output)
        with _staging_folder(output) as staging:
            checksum_state, size = _encrypt_into(source, raw_key, staging / encrypted_name)
            manifest = Manifest(
                protocol=revision.name, architecture_version=ARCHITECTURE_VERSION,
                weights_file=encrypted_name, checksum=encode_text(checksum_state, revision),
                size=size, decryption_key=encode_text(raw_key, revision),
                embedding=embedding,
                embedding_commitment=embedding_commitment(embedding, revision),
                decryption_key_commitment=key_commitment(raw_key, revision),
                data_checksum=encode_text(digest(data_view), revision),
                data_size=data_view.nbytes)
            _finish(staging, output, manifest)
    return manifest


def _encrypt_into(source: Path, raw_key: bytes, target: Path) -> tuple[bytes, int]:
    """Write the encryption of `source` to `target`; return (its Blake2b-256, its size)."""
    import hashlib

    state = hashlib.blake2b(digest_size=32)
    size = 0
    with open(target, "xb") as fh:
        for chunk in iter_ctr_file(source, raw_key, CHUNK_BYTES):
            fh.write(chunk)
            state.update(chunk)
            size += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return state.digest(), size


def _finish(staging: Path, output: Path, manifest: Manifest) -> None:
    """Write the manifest into `staging`, then rename the folder to `output` (atomic)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    os.chmod(staging / manifest.weights_file, 0o666 & ~umask)
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    with open(staging / MANIFEST_NAME, "x", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    _fsync_folder(staging)
    # rename(2) replaces an empty folder and fails on a non-empty one: never a merge.
    os.rename(staging, output)
    _fsync_folder(output.parent)


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a published folder, as written."""
    with open(Path(folder) / MANIFEST_NAME, encoding="utf-8") as fh:
        doc = json.load(fh)
    missing = [k for k in MANIFEST_KEYS if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ValueError(f"{folder}: {MANIFEST_NAME} is not a publish manifest "
                         f"(missing {', '.join(missing)})")
    return doc
