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

All or nothing: the encrypted file is written to an unnamed temporary file (Linux
`O_TMPFILE`, gone if the process dies), the manifest and the file are assembled in a
hidden staging folder next to `output_dir` in the last moment, and the folder is renamed
into place. A SIGTERM or an exception removes the staging folder; a staging folder left by
a killed process is recognised by its dead process id and removed by the next `publish`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from soma_models.v1.revisions import ARCHITECTURE_VERSION, Revision, resolve
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


@contextlib.contextmanager
def _unnamed_file(folder: Path) -> Iterator[tuple[BinaryIO, bool]]:
    """A writable file in `folder` that has no name (O_TMPFILE) when the system allows.

    Yields `(file, unnamed)`; an unnamed file vanishes with the process, whatever kills it.
    Elsewhere a named temporary file is used, removed on exit.
    """
    flags = getattr(os, "O_TMPFILE", 0)
    fd = -1
    if flags:
        try:
            fd = os.open(folder, flags | os.O_RDWR, 0o666)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    if fd >= 0:
        with os.fdopen(fd, "w+b") as fh:
            yield fh, True
        return
    fd, name = tempfile.mkstemp(prefix=".publish-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh, False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _link_into(fh: BinaryIO, unnamed: bool, target: Path) -> None:
    """Give the (flushed, fsynced) file `fh` the name `target`."""
    if unnamed:
        os.link(f"/proc/self/fd/{fh.fileno()}", target, follow_symlinks=True)
    else:
        os.link(fh.name, target)  # type: ignore[arg-type]


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
            micro_batch_size: int | str | None = "auto", progress: bool = False) -> Manifest:
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
    Returns the `Manifest` written to `output_dir/manifest.json`.
    """
    from soma_models.v1.scoring import score
    from soma_models.v1.validation import validate

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

    report = validate(source, **_validate_protocol(validate, revision))
    if not report.ok:
        raise PublishError(f"{source}: not publishable: " + "; ".join(report.errors))
    embedding = score(source, data_view, EMBEDDING_SEED, protocol=revision,
                      framework=framework, device=device, micro_batch_size=micro_batch_size,
                      progress=progress).embedding
    if not np.all(np.isfinite(embedding)):
        raise PublishError(f"{source}: the embedding on this data has NaN/Inf values; a "
                           "model with such an embedding cannot be registered")

    encrypted_name = f"{source.name}.enc"
    with _sigterm_as_exception():
        _remove_stale_staging(output)
        with _unnamed_file(output.parent) as (fh, unnamed):
            checksum_state, size = _encrypt_into(source, raw_key, fh)
            manifest = Manifest(
                protocol=revision.name, architecture_version=ARCHITECTURE_VERSION,
                weights_file=encrypted_name, checksum=encode_text(checksum_state, revision),
                size=size, decryption_key=encode_text(raw_key, revision),
                embedding=embedding,
                embedding_commitment=embedding_commitment(embedding, revision),
                decryption_key_commitment=key_commitment(raw_key, revision),
                data_checksum=encode_text(digest(data_view), revision),
                data_size=data_view.nbytes)
            _assemble(output, fh, unnamed, encrypted_name, manifest)
    return manifest


def _validate_protocol(validate: Any, revision: Revision) -> dict[str, Any]:
    """`protocol=` for `validate` when it takes one (the revision's layer-count rule)."""
    import inspect

    return {"protocol": revision} if "protocol" in inspect.signature(validate).parameters else {}


def _encrypt_into(source: Path, raw_key: bytes, fh: BinaryIO) -> tuple[bytes, int]:
    """Write the encryption of `source` to `fh`; return (Blake2b-256 of it, its size)."""
    import hashlib

    state = hashlib.blake2b(digest_size=32)
    size = 0
    for chunk in iter_ctr_file(source, raw_key, CHUNK_BYTES):
        fh.write(chunk)
        state.update(chunk)
        size += len(chunk)
    fh.flush()
    os.fsync(fh.fileno())
    return state.digest(), size


def _assemble(output: Path, fh: BinaryIO, unnamed: bool, encrypted_name: str,
              manifest: Manifest) -> None:
    """Staging folder with the encrypted file and the manifest, renamed to `output`."""
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(output)}{os.getpid()}.",
                                    dir=output.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        _link_into(fh, unnamed, staging / encrypted_name)
        os.chmod(staging / encrypted_name, 0o666 & ~umask)
        text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        _fsync_folder(staging)
        # rename(2) replaces an empty folder and fails on a non-empty one: never a merge.
        os.rename(staging, output)
        _fsync_folder(output.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a published folder, as written."""
    with open(Path(folder) / MANIFEST_NAME, encoding="utf-8") as fh:
        doc = json.load(fh)
    missing = [k for k in MANIFEST_KEYS if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise ValueError(f"{folder}: {MANIFEST_NAME} is not a publish manifest "
                         f"(missing {', '.join(missing)})")
    return doc
