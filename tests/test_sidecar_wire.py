"""The sidecar's hand-written Encrypt/Decrypt wire code agrees with betterproto2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.sidecar import wire

SOFTWARE = kms_v1.ProtectionLevel.SOFTWARE
crc = st.integers(min_value=0, max_value=2**32 - 1)


@given(name=st.text(max_size=300), ciphertext=st.binary(max_size=70_000), crc32c=crc,
       verified_plaintext=st.booleans(), verified_aad=st.booleans())
def test_encrypt_response(name: str, ciphertext: bytes, crc32c: int, verified_plaintext: bool,
                          verified_aad: bool) -> None:
    expected = bytes(kms_v1.EncryptResponse(
        name=name, ciphertext=ciphertext, ciphertext_crc32c=crc32c,
        verified_plaintext_crc32c=verified_plaintext,
        verified_additional_authenticated_data_crc32c=verified_aad,
        protection_level=SOFTWARE))
    assert wire.encrypt_response(name, ciphertext, crc32c, verified_plaintext,
                                    verified_aad) == expected


@given(plaintext=st.binary(max_size=70_000), crc32c=crc, used_primary=st.booleans())
def test_decrypt_response(plaintext: bytes, crc32c: int, used_primary: bool) -> None:
    expected = bytes(kms_v1.DecryptResponse(
        plaintext=plaintext, plaintext_crc32c=crc32c, used_primary=used_primary,
        protection_level=SOFTWARE))
    assert wire.decrypt_response(plaintext, crc32c, used_primary) == expected


def test_replies_parse_back() -> None:
    parsed = kms_v1.EncryptResponse.parse(wire.encrypt_response("n", b"c", 0, True, False))
    assert (parsed.name, parsed.ciphertext, parsed.ciphertext_crc32c) == ("n", b"c", 0)
    assert parsed.verified_plaintext_crc32c and not \
        parsed.verified_additional_authenticated_data_crc32c
    assert parsed.protection_level == SOFTWARE
    decrypted = kms_v1.DecryptResponse.parse(wire.decrypt_response(b"", 5, False))
    assert (decrypted.plaintext, decrypted.plaintext_crc32c, decrypted.used_primary) == \
        (b"", 5, False)


int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
optional_int64 = st.none() | int64


def _as_tuple(message: kms_v1.EncryptRequest | kms_v1.DecryptRequest) -> wire.Request:
    if isinstance(message, kms_v1.EncryptRequest):
        return wire.Request(message.name, message.plaintext,
                            message.additional_authenticated_data, message.plaintext_crc32c,
                            message.additional_authenticated_data_crc32c)
    return wire.Request(message.name, message.ciphertext, message.additional_authenticated_data,
                        message.ciphertext_crc32c, message.additional_authenticated_data_crc32c)


@given(name=st.text(max_size=200), payload=st.binary(max_size=3000),
       aad=st.binary(max_size=300), payload_crc=optional_int64, aad_crc=optional_int64)
def test_requests_read_as_betterproto_does(name: str, payload: bytes, aad: bytes,
                                           payload_crc: int | None,
                                           aad_crc: int | None) -> None:
    encrypt = kms_v1.EncryptRequest(name=name, plaintext=payload,
                                    additional_authenticated_data=aad,
                                    plaintext_crc32c=payload_crc,
                                    additional_authenticated_data_crc32c=aad_crc)
    assert wire.read_encrypt_request(bytes(encrypt)) == _as_tuple(encrypt)
    decrypt = kms_v1.DecryptRequest(name=name, ciphertext=payload,
                                    additional_authenticated_data=aad,
                                    ciphertext_crc32c=payload_crc,
                                    additional_authenticated_data_crc32c=aad_crc)
    assert wire.read_decrypt_request(bytes(decrypt)) == _as_tuple(decrypt)


@given(st.binary(max_size=200))
def test_any_bytes_are_read_as_betterproto_reads_them_or_left_to_it(data: bytes) -> None:
    for read, message_type in ((wire.read_encrypt_request, kms_v1.EncryptRequest),
                               (wire.read_decrypt_request, kms_v1.DecryptRequest)):
        try:
            ours = read(data)
        except wire.Unusual:
            continue  # betterproto2 parses it (or refuses it) instead
        assert ours == _as_tuple(message_type.parse(data))


@given(base=st.binary(max_size=50), extra=st.sampled_from(
    [b"\x20\x01", b"\x0a\x01x", b"\x3a\x00\x3a\x00", b"\x92\x01\x00", b"\x42\x02\x10\x01"]))
def test_unusual_shapes_are_left_to_betterproto(base: bytes, extra: bytes) -> None:
    """Unknown fields, repeats, multi-byte tags and odd wrappers are not guessed at."""
    message = bytes(kms_v1.EncryptRequest(name="n", plaintext=base)) + b"\x0a\x01n" + extra
    with pytest.raises(wire.Unusual):
        wire.read_encrypt_request(message)
