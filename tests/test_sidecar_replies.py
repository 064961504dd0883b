"""The sidecar's hand-written Encrypt/Decrypt replies are byte for byte the generated ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.sidecar import replies

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
    assert replies.encrypt_response(name, ciphertext, crc32c, verified_plaintext,
                                    verified_aad) == expected


@given(plaintext=st.binary(max_size=70_000), crc32c=crc, used_primary=st.booleans())
def test_decrypt_response(plaintext: bytes, crc32c: int, used_primary: bool) -> None:
    expected = bytes(kms_v1.DecryptResponse(
        plaintext=plaintext, plaintext_crc32c=crc32c, used_primary=used_primary,
        protection_level=SOFTWARE))
    assert replies.decrypt_response(plaintext, crc32c, used_primary) == expected


def test_replies_parse_back() -> None:
    parsed = kms_v1.EncryptResponse.parse(replies.encrypt_response("n", b"c", 0, True, False))
    assert (parsed.name, parsed.ciphertext, parsed.ciphertext_crc32c) == ("n", b"c", 0)
    assert parsed.verified_plaintext_crc32c and not \
        parsed.verified_additional_authenticated_data_crc32c
    assert parsed.protection_level == SOFTWARE
    decrypted = kms_v1.DecryptResponse.parse(replies.decrypt_response(b"", 5, False))
    assert (decrypted.plaintext, decrypted.plaintext_crc32c, decrypted.used_primary) == \
        (b"", 5, False)
