"""EncryptResponse and DecryptResponse written straight to protobuf bytes.

The sidecar's Encrypt/Decrypt are its hot path, and building a betterproto2
message and serializing it cost about as much as the AES-GCM and HKDF work
put together (about 20 µs of 40 per call). These two replies have a handful
of fixed fields, so they are written here directly. The bytes are exactly
those of the generated messages (field-number order, proto3 defaults
omitted, the Int64Value wrapper always present): tests/test_sidecar_replies.py
checks that with Hypothesis against ``bytes(kms_v1.EncryptResponse(...))``.
"""

from __future__ import annotations

_SOFTWARE = 1  # google.cloud.kms.v1.ProtectionLevel.SOFTWARE


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data


def _int64_value(tag: int, value: int) -> bytes:
    """A google.protobuf.Int64Value field (present even when 0); value >= 0 here."""
    inner = b"\x08" + _varint(value) if value else b""
    return _length_delimited(tag, inner)


def encrypt_response(name: str, ciphertext: bytes, ciphertext_crc32c: int,
                     verified_plaintext_crc32c: bool, verified_aad_crc32c: bool) -> bytes:
    """google.cloud.kms.v1.EncryptResponse, protection_level SOFTWARE."""
    parts = [_length_delimited(0x0A, name.encode()) if name else b"",
             _length_delimited(0x12, ciphertext) if ciphertext else b"",
             _int64_value(0x22, ciphertext_crc32c)]
    if verified_plaintext_crc32c:
        parts.append(b"\x28\x01")
    if verified_aad_crc32c:
        parts.append(b"\x30\x01")
    parts.append(b"\x38" + _varint(_SOFTWARE))
    return b"".join(parts)


def decrypt_response(plaintext: bytes, plaintext_crc32c: int, used_primary: bool) -> bytes:
    """google.cloud.kms.v1.DecryptResponse, protection_level SOFTWARE."""
    parts = [_length_delimited(0x0A, plaintext) if plaintext else b"",
             _int64_value(0x12, plaintext_crc32c)]
    if used_primary:
        parts.append(b"\x18\x01")
    parts.append(b"\x20" + _varint(_SOFTWARE))
    return b"".join(parts)
