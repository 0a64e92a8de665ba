"""Weights in transit (SPEC §8): AES-256-CTR encryption and Blake2b commitments.

Published weights may be encrypted with AES-256 in CTR mode: a 32-byte key, a 16-byte
all-zero initial counter block incremented as one big-endian 128-bit integer, applied to
the whole file. CTR is a stream cipher, so encryption and decryption are the same
operation and the output is as long as the input.

A commitment to some bytes (weights, data, a key, an embedding's BCS encoding) is their
32-byte Blake2b digest. Keys and digests are *written* in the revision's text encoding:
Base58 (Bitcoin alphabet) under "0.1.7", 64 hex characters under "0.1.1"
(`soma_models.v1.revisions`). Every key *input* takes Base58, 64 hex characters or the 32
raw bytes, whatever the revision: the two text forms cannot be confused, since the Base58
of 32 bytes is at most 44 characters.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Iterator

import base58
import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from soma_models.v1.revisions import Revision, resolve

KEY_BYTES = 32
ZERO_COUNTER_BLOCK = bytes(16)
# Files are processed this many bytes at a time (encrypting a 6.4 GB file holds one chunk).
CHUNK_BYTES = 64 * 1024 * 1024

KeyLike = bytes | bytearray | memoryview | str
BytesLike = bytes | bytearray | memoryview


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_key(key: KeyLike) -> bytes:
    """A 32-byte AES-256 key from its Base58 text, 64 hex characters (0x prefix allowed)
    or the raw bytes, whatever the revision."""
    if isinstance(key, str):
        text = key.strip()
        hex_text = text[2:] if text[:2].lower() == "0x" else text
        if len(hex_text) == 2 * KEY_BYTES:
            if not set(hex_text) <= _HEX_DIGITS:
                raise ValueError("decryption key is not valid hex (expected 64 characters "
                                 "0-9, a-f)")
            return bytes.fromhex(hex_text)
        try:
            raw = base58.b58decode(text)
        except ValueError:
            raise ValueError(f"decryption key must be Base58 (32 bytes) or {2 * KEY_BYTES} hex "
                             f"characters, got {len(text)} characters that are neither") from None
        if len(raw) != KEY_BYTES or not text:
            raise ValueError(f"decryption key must be Base58 of {KEY_BYTES} bytes or "
                             f"{2 * KEY_BYTES} hex characters; the Base58 {text!r} decodes to "
                             f"{len(raw)} bytes")
        return raw
    if isinstance(key, (bytes, bytearray, memoryview)):
        raw = bytes(key)
        if len(raw) != KEY_BYTES:
            raise ValueError(f"decryption key must be {KEY_BYTES} bytes, got {len(raw)}")
        return raw
    raise TypeError(f"key must be bytes or a Base58/hex string, got {type(key).__name__}")


def encode_text(raw: BytesLike, protocol: str | Revision | None = None) -> str:
    """Bytes (a key or a digest) as revision `protocol` writes them: Base58 or hex."""
    raw = bytes(raw)
    if resolve(protocol).text_encoding == "base58":
        return base58.b58encode(raw).decode("ascii")
    return raw.hex()


def key_text(key: KeyLike, protocol: str | Revision | None = None) -> str:
    """`key` (any accepted form) written in revision `protocol`'s encoding."""
    return encode_text(parse_key(key), protocol)


def _keystream_cipher(key: bytes):
    """A fresh CTR context starting at counter block 0 (encrypt == decrypt in CTR)."""
    return Cipher(algorithms.AES(key), modes.CTR(ZERO_COUNTER_BLOCK)).encryptor()


def apply_ctr(data: BytesLike, key: KeyLike) -> bytes:
    """XOR `data` with the AES-256-CTR keystream of `key` (encrypts and decrypts)."""
    ctx = _keystream_cipher(parse_key(key))
    return ctx.update(bytes(data) if not isinstance(data, bytes) else data) + ctx.finalize()


def new_key() -> bytes:
    """A fresh random 32-byte key (from the operating system's CSPRNG)."""
    return secrets.token_bytes(KEY_BYTES)


def encrypt_weights(data: BytesLike, key: KeyLike | None = None,
                    protocol: str | Revision | None = None) -> tuple[bytes, str]:
    """Encrypt `data`; returns `(ciphertext, key_text)`, the key in revision `protocol`'s
    encoding (Base58 or hex). A random key is drawn when `key` is None."""
    raw_key = new_key() if key is None else parse_key(key)
    return apply_ctr(data, raw_key), encode_text(raw_key, protocol)


def decrypt_weights(data: BytesLike, key: KeyLike) -> bytes:
    """Decrypt AES-256-CTR `data` with `key` (Base58, 64 hex characters or 32 bytes)."""
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


def digest(data: BytesLike | Iterable[BytesLike]) -> bytes:
    """32-byte Blake2b of `data`, or of the concatenation of its pieces."""
    state = hashlib.blake2b(digest_size=32)
    if isinstance(data, (bytes, bytearray, memoryview)):
        state.update(data)
    else:
        for piece in data:
            state.update(piece)
    return state.digest()


def commitment(data: BytesLike | Iterable[BytesLike],
               protocol: str | Revision | None = None) -> str:
    """Blake2b-256 of `data` (or of its pieces, concatenated) in revision `protocol`'s
    encoding: Base58 under "0.1.7", 64 hex characters under "0.1.1"."""
    return encode_text(digest(data), protocol)


def file_digest(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> bytes:
    """Blake2b-256 of a file's bytes, read chunk by chunk."""
    with open(path, "rb") as fh:
        return digest(iter(lambda: fh.read(chunk_bytes), b""))


def file_commitment(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES,
                    protocol: str | Revision | None = None) -> str:
    """Commitment of a file's bytes, read chunk by chunk."""
    return encode_text(file_digest(path, chunk_bytes), protocol)


def _uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def embedding_bcs(embedding: object) -> bytes:
    """The BCS encoding of a float32 embedding as the chain hashes it (SPEC §8).

    `0x00` (dtype float32), ULEB128 of the byte length 4 D, the D values little-endian,
    ULEB128(1) (one dimension), and D as a little-endian u64.
    """
    values = np.asarray(embedding)
    if values.ndim != 1:
        raise ValueError(f"an embedding is a vector, got shape {list(values.shape)}")
    if not np.issubdtype(values.dtype, np.floating) and not np.issubdtype(values.dtype,
                                                                         np.integer):
        raise TypeError(f"an embedding holds numbers, got dtype {values.dtype}")
    data = values.astype("<f4").tobytes()
    return (b"\x00" + _uleb128(len(data)) + data + _uleb128(1)
            + struct.pack("<Q", values.shape[0]))


def embedding_commitment(embedding: object, protocol: str | Revision | None = None) -> str:
    """Blake2b-256 of the embedding's BCS encoding, in revision `protocol`'s encoding."""
    return encode_text(digest(embedding_bcs(embedding)), protocol)


def key_commitment(key: KeyLike, protocol: str | Revision | None = None) -> str:
    """Blake2b-256 of the 32 key bytes, in revision `protocol`'s encoding."""
    return encode_text(digest(parse_key(key)), protocol)
