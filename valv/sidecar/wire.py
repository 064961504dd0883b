"""Encrypt/Decrypt requests and replies, read and written by hand.

The sidecar's Encrypt/Decrypt are its hot path. Building a betterproto2
reply and serializing it cost about as much as the AES-GCM and HKDF work put
together (about 20 µs of 40 per call), and parsing the request another 5-10
µs. These messages have a handful of fixed fields, so:

- replies are written here directly, byte for byte what the generated
  messages give (field-number order, proto3 defaults omitted, the Int64Value
  wrapper always present);
- requests of the usual shape (each known field at most once, nothing else)
  are read here; anything else raises :class:`Unusual` and the caller parses
  it with betterproto2 as before, so odd but valid input (unknown fields,
  repeated fields, multi-byte tags) keeps its exact protobuf meaning.

tests/test_sidecar_wire.py checks both against betterproto2 with Hypothesis.
"""

from __future__ import annotations

from typing import NamedTuple


class Unusual(ValueError):
    """Not the usual shape: parse this message with the generated code instead."""


class Request(NamedTuple):
    """The fields of an EncryptRequest or DecryptRequest."""

    name: str
    payload: bytes  # plaintext (Encrypt) or ciphertext (Decrypt)
    aad: bytes
    payload_crc32c: int | None
    aad_crc32c: int | None


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise Unusual("bad varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _read_int64_value(inner: bytes) -> int:
    """A google.protobuf.Int64Value's value: empty (0) or one field-1 varint."""
    if not inner:
        return 0
    if inner[0] != 0x08:
        raise Unusual("Int64Value with other fields")
    value, pos = _read_varint(inner, 1)
    if pos != len(inner) or value >= 1 << 64:
        raise Unusual("Int64Value with more than its value")
    return value - (1 << 64) if value >= 1 << 63 else value


def _read_request(data: bytes, payload_crc_field: int, aad_crc_field: int) -> Request:
    fields: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        tag = data[pos]
        if tag >= 0x80 or tag & 7 != 2:  # only length-delimited fields 1..15
            raise Unusual("unexpected tag")
        length, pos = _read_varint(data, pos + 1)
        stop = pos + length
        if stop > end:
            raise Unusual("truncated")
        field = tag >> 3
        if field in fields or field not in (1, 2, 3, payload_crc_field, aad_crc_field):
            raise Unusual("repeated or unknown field")
        fields[field] = data[pos:stop]
        pos = stop
    try:
        name = fields.get(1, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise Unusual("name is not UTF-8") from None
    payload_crc = fields.get(payload_crc_field)
    aad_crc = fields.get(aad_crc_field)
    return Request(name, fields.get(2, b""), fields.get(3, b""),
                   None if payload_crc is None else _read_int64_value(payload_crc),
                   None if aad_crc is None else _read_int64_value(aad_crc))


def read_encrypt_request(data: bytes) -> Request:
    """google.cloud.kms.v1.EncryptRequest (plaintext_crc32c = 7, aad crc = 8)."""
    return _read_request(data, 7, 8)


def read_decrypt_request(data: bytes) -> Request:
    """google.cloud.kms.v1.DecryptRequest (ciphertext_crc32c = 5, aad crc = 6)."""
    return _read_request(data, 5, 6)

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
