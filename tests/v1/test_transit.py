"""AES-256-CTR transit encryption and Blake2b commitments (SPEC §8)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from soma_models.v1.transit import (
    apply_ctr,
    commitment,
    decrypt_file,
    decrypt_weights,
    encrypt_weights,
    file_commitment,
    iter_ctr_file,
    parse_key,
)

# NIST AESAVS (AES Algorithm Validation Suite), Appendix D, AES-256 VarKey count 0 and
# KeySbox count 0: the encryption of the all-zero block, which is CTR's counter block 0.
AESAVS_ZERO_BLOCK = [
    ("80" + "00" * 31, "e35a6dcb19b201a01ebcfa8aa22b5759"),
    ("c47b0294dbbbee0fec4757f22ffeee3587ca4730c3d33b691df38bab076bc558",
     "46f2fb342d6f0ab477476fc501242c5f"),
]


def ctr_by_ecb(data: bytes, key: bytes) -> bytes:
    """Independent CTR: AES-ECB of the big-endian counter blocks 0, 1, 2, ... XOR data."""
    blocks = -(-len(data) // 16)
    counters = b"".join(i.to_bytes(16, "big") for i in range(blocks))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    keystream = ecb.update(counters) + ecb.finalize()
    return bytes(a ^ b for a, b in zip(data, keystream))


@pytest.mark.parametrize("key_hex, expected", AESAVS_ZERO_BLOCK)
def test_first_block_matches_published_aes_vectors(key_hex, expected):
    encrypted, returned_key = encrypt_weights(bytes(16), key_hex)
    assert encrypted.hex() == expected
    assert returned_key == key_hex


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 100, 4096 + 3])
def test_ctr_matches_ecb_construction(length):
    rng = np.random.default_rng(length)
    key = rng.bytes(32)
    data = rng.bytes(length)
    encrypted, key_hex = encrypt_weights(data, key)
    assert key_hex == key.hex()
    assert encrypted == ctr_by_ecb(data, key)
    assert decrypt_weights(encrypted, key_hex) == data


def test_counter_is_big_endian_over_the_whole_block():
    # A little-endian counter would give block 1 = AES(01 00 .. 00) instead.
    key = bytes(range(32))
    stream = apply_ctr(bytes(32), key)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert stream[16:] == ecb.update((1).to_bytes(16, "big"))
    assert stream[16:] != ecb.update((1).to_bytes(16, "little"))


def test_random_key_round_trip():
    data = b"weights" * 1000
    encrypted, key_hex = encrypt_weights(data)
    assert len(key_hex) == 64 and int(key_hex, 16) >= 0
    assert encrypted != data and len(encrypted) == len(data)
    assert decrypt_weights(encrypted, key_hex) == data
    assert decrypt_weights(encrypted, "0x" + key_hex.upper()) == data
    assert encrypt_weights(data)[1] != key_hex


def test_files_chunk_by_chunk(tmp_path):
    rng = np.random.default_rng(0)
    data, key = rng.bytes(1000), rng.bytes(32)
    path = tmp_path / "plain"
    path.write_bytes(data)
    # Odd chunk sizes cross block boundaries: the keystream must continue across chunks.
    assert b"".join(iter_ctr_file(path, key, chunk_bytes=7)) == ctr_by_ecb(data, key)
    (tmp_path / "enc").write_bytes(ctr_by_ecb(data, key))
    assert decrypt_file(tmp_path / "enc", key, chunk_bytes=13) == data
    assert file_commitment(path, chunk_bytes=9) == commitment(data)


@pytest.mark.parametrize("bad, message", [
    ("abc", "64 hex characters"), ("zz" * 32, "not valid hex"), (b"short", "32 bytes"),
    (12, "bytes or a hex string"),
])
def test_bad_keys_are_refused(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_key(bad)


def test_commitment_is_blake2b_256():
    for data in (b"", b"soma", bytes(range(256)) * 10):
        expected = hashlib.blake2b(data, digest_size=32).hexdigest()
        assert commitment(data) == expected and len(expected) == 64
    assert commitment([b"so", b"ma"]) == commitment(b"soma")
