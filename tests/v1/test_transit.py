"""AES-256-CTR transit encryption and Blake2b commitments (SPEC §8)."""

from __future__ import annotations

import hashlib

import base58
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from soma_models.v1.revisions import default_revision
from soma_models.v1.transit import (
    apply_ctr,
    commitment,
    decrypt_file,
    decrypt_weights,
    digest,
    embedding_bcs,
    embedding_commitment,
    encode_text,
    encrypt_weights,
    file_commitment,
    iter_ctr_file,
    key_commitment,
    key_text,
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
    encrypted, returned_key = encrypt_weights(bytes(16), key_hex, protocol="0.1.1")
    assert encrypted.hex() == expected
    assert returned_key == key_hex


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 100, 4096 + 3])
def test_ctr_matches_ecb_construction(length):
    rng = np.random.default_rng(length)
    key = rng.bytes(32)
    data = rng.bytes(length)
    encrypted, key_hex = encrypt_weights(data, key, protocol="0.1.1")
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
    encrypted, key_hex = encrypt_weights(data, protocol="0.1.1")
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
    ("abc", "Base58 'abc' decodes to"), ("zz" * 32, "not valid hex"), (b"short", "32 bytes"),
    (12, "bytes or a Base58/hex string"), ("0OIl" * 11, "neither"), ("", "decodes to 0"),
])
def test_bad_keys_are_refused(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        parse_key(bad)


def test_commitment_is_blake2b_256_in_the_revisions_encoding():
    for data in (b"", b"soma", bytes(range(256)) * 10):
        raw = hashlib.blake2b(data, digest_size=32).digest()
        assert commitment(data, protocol="0.1.1") == raw.hex()
        assert commitment(data, protocol="0.1.7") == base58.b58encode(raw).decode()
        assert commitment(data, protocol="latest") == commitment(data, protocol="0.1.7")
        assert digest(data) == raw
    assert commitment([b"so", b"ma"]) == commitment(b"soma")
    # The default is the process-wide revision (0.1.7 unless SOMA_MODELS_PROTOCOL says).
    assert commitment(b"soma") == commitment(b"soma", protocol=default_revision())


# Base58 (Bitcoin alphabet) known answers: leading zero bytes become '1's.
BASE58_KNOWN = [
    (bytes(32), "1" * 32),
    (bytes(31) + b"\x01", "1" * 31 + "2"),
    (b"\xff" * 32, "JEKNVnkbo3jma5nREBBJCDoXFVeKkD56V3xKrvRmWxFG"),
]


@pytest.mark.parametrize("raw, text", BASE58_KNOWN)
def test_base58_known_answers(raw, text):
    assert encode_text(raw, "0.1.7") == text
    assert key_text(raw, "0.1.7") == text
    assert encode_text(raw, "0.1.1") == raw.hex()
    # Every key input form gives the same bytes, whatever the revision.
    assert parse_key(text) == parse_key(raw.hex()) == parse_key(raw) == raw
    assert parse_key("0x" + raw.hex().upper()) == raw


def test_base58_checked_against_a_direct_big_integer_conversion():
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    rng = np.random.default_rng(3)
    for _ in range(20):
        raw = rng.bytes(32)
        n, digits = int.from_bytes(raw, "big"), ""
        while n:
            n, r = divmod(n, 58)
            digits = alphabet[r] + digits
        zeros = len(raw) - len(raw.lstrip(b"\0"))
        assert encode_text(raw, "0.1.7") == "1" * zeros + digits


def test_encrypted_with_a_base58_key_decrypts_with_its_hex_form():
    data = b"weights" * 100
    encrypted, key_b58 = encrypt_weights(data, protocol="0.1.7")
    assert 32 <= len(key_b58) <= 44
    hex_form = parse_key(key_b58).hex()
    assert decrypt_weights(encrypted, hex_form) == data
    assert decrypt_weights(encrypted, key_b58) == data


def test_embedding_bcs_known_answer_built_by_hand():
    # D = 3: 0x00 (float32), ULEB128(12) = 0x0c, 1.0 / -2.0 / 0.5 as f32 little-endian,
    # ULEB128(1) = 0x01, then 3 as a u64 little-endian.
    expected = bytes([0x00, 0x0C,
                      0x00, 0x00, 0x80, 0x3F,
                      0x00, 0x00, 0x00, 0xC0,
                      0x00, 0x00, 0x00, 0x3F,
                      0x01,
                      0x03, 0, 0, 0, 0, 0, 0, 0])
    embedding = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    assert embedding_bcs(embedding) == expected
    raw = hashlib.blake2b(expected, digest_size=32).digest()
    assert embedding_commitment(embedding, "0.1.1") == raw.hex()
    assert embedding_commitment(embedding, "0.1.7") == base58.b58encode(raw).decode()


def test_embedding_bcs_of_the_v1_width_uses_a_two_byte_length():
    # 2048 values = 8192 bytes: ULEB128(8192) = 0x80 0x40.
    encoded = embedding_bcs(np.zeros(2048, np.float32))
    assert encoded[:3] == b"\x00\x80\x40" and len(encoded) == 3 + 8192 + 1 + 8
    assert encoded[-9:] == b"\x01" + (2048).to_bytes(8, "little")
    with pytest.raises(ValueError, match="vector"):
        embedding_bcs(np.zeros((2, 2)))


def test_key_commitment_hashes_the_32_key_bytes():
    key = bytes(range(32))
    raw = hashlib.blake2b(key, digest_size=32).digest()
    assert key_commitment(key, "0.1.1") == raw.hex()
    assert key_commitment(key.hex(), "0.1.7") == key_commitment(key_text(key, "0.1.7"), "0.1.7") \
        == base58.b58encode(raw).decode()
