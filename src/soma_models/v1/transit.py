"""Weights in transit (SPEC §8): AES-256-CTR encryption and Blake2b commitments.

Published weights may be encrypted with AES-256 in CTR mode: a 32-byte key (usually
written as 64 hex characters), a 16-byte all-zero initial counter block incremented as
one big-endian 128-bit integer, applied to the whole file. CTR is a stream cipher, so
encryption and decryption are the same operation and the output is as long as the input.

A commitment to some bytes (weights or data) is their 32-byte Blake2b digest, as 64 hex
characters.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
ZERO_COUNTER_BLOCK = bytes(16)
# Files are processed this many bytes at a time (encrypting a 6.4 GB file holds one chunk).
CHUNK_BYTES = 64 * 1024 * 1024

KeyLike = bytes | bytearray | memoryview | str
BytesLike = bytes | bytearray | memoryview


def parse_key(key: KeyLike) -> bytes:
    """A 32-byte AES-256 key from raw bytes or a 64-character hex string (0x prefix allowed)."""
    if isinstance(key, str):
        text = key.strip()
        if text[:2].lower() == "0x":
            text = text[2:]
        if len(text) != 2 * KEY_BYTES:
            raise ValueError(f"decryption key must be {2 * KEY_BYTES} hex characters "
                             f"({KEY_BYTES} bytes), got {len(text)} characters")
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValueError("decryption key is not valid hex (expected 64 characters 0-9, a-f)") \
                from None
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) != KEY_BYTES:
            raise ValueError(f"decryption key must be {KEY_BYTES} bytes, got {len(raw)}")
        return raw
    raise TypeError(f"key must be bytes or a hex string, got {type(key).__name__}")


def _keystream_cipher(key: bytes):
    """A fresh CTR context starting at counter block 0 (encrypt == decrypt in CTR)."""
    return Cipher(algorithms.AES(key), modes.CTR(ZERO_COUNTER_BLOCK)).encryptor()


def apply_ctr(data: BytesLike, key: KeyLike) -> bytes:
    """XOR `data` with the AES-256-CTR keystream of `key` (encrypts and decrypts)."""
    ctx = _keystream_cipher(parse_key(key))
    return ctx.update(bytes(data) if not isinstance(data, bytes) else data) + ctx.finalize()


def encrypt_weights(data: BytesLike, key: KeyLike | None = None) -> tuple[bytes, str]:
    """Encrypt `data`; returns `(ciphertext, key_hex)`. A random key is drawn when `key` is None."""
    raw_key = secrets.token_bytes(KEY_BYTES) if key is None else parse_key(key)
    return apply_ctr(data, raw_key), raw_key.hex()


def decrypt_weights(data: BytesLike, key: KeyLike) -> bytes:
    """Decrypt AES-256-CTR `data` with `key` (32 bytes or 64 hex characters)."""
    return apply_ctr(data, key)


def iter_ctr_file(path: str | os.PathLike, key: KeyLike,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Yield the en/decryption of a file, chunk by chunk (memory: one chunk)."""
    ctx = _keystream_cipher(parse_key(key))
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            yield ctx.update(chunk)
    tail = ctx.finalize()
    if tail:
        yield tail


def decrypt_file(path: str | os.PathLike, key: KeyLike,
                 chunk_bytes: int = CHUNK_BYTES) -> bytearray:
    """Decrypt a whole file into one buffer, reading it chunk by chunk.

    The plaintext is written straight into a preallocated buffer, so peak memory is the
    file size plus one chunk (not twice the file).
    """
    ctx = _keystream_cipher(parse_key(key))
    size = os.path.getsize(path)
    # `update_into` may need up to one block of slack past the data it writes.
    out = bytearray(size + 15)
    view = memoryview(out)
    written = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_bytes):
            written += ctx.update_into(chunk, view[written:])
    view.release()
    ctx.finalize()
    del out[written:]
    return out


def decrypt_source(source: object, key: KeyLike | None) -> object:
    """Weights given as a path or bytes, decrypted with `key` (unchanged when `key` is None).

    Anything else (arrays, a loaded model) cannot be encrypted and is refused with a key.
    """
    if key is None:
        return source
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"{os.fspath(source)}: no such weights file")
        return decrypt_file(source, key)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return decrypt_weights(source, key)
    raise TypeError("a decryption key applies to encrypted weights given as a path or bytes, "
                    f"not to {type(source).__name__}")


def commitment(data: BytesLike | Iterable[BytesLike]) -> str:
    """64-hex Blake2b (digest size 32) of `data`, or of the concatenation of its pieces."""
    digest = hashlib.blake2b(digest_size=32)
    if isinstance(data, (bytes, bytearray, memoryview)):
        digest.update(data)
    else:
        for piece in data:
            digest.update(piece)
    return digest.hexdigest()


def file_commitment(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Commitment of a file's bytes, read chunk by chunk."""
    with open(path, "rb") as fh:
        return commitment(iter(lambda: fh.read(chunk_bytes), b""))
