"""Encrypt, Decrypt and GenerateRandomBytes through Google's official client.

Every test talks to a real ``valv central`` process (tests/conftest.py) and
checks the status codes and fields Cloud KMS documents.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import google_crc32c
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.protobuf import field_mask_pb2

from tests.helpers import CALL, CentralProcess

KiB64 = 64 * 1024
HEADER_LEN = 33  # format byte, version id, salt, nonce (DESIGN.md §3)
TAG_LEN = 16
ENABLED = kms_v1.CryptoKeyVersion.CryptoKeyVersionState.ENABLED
DISABLED = kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT

Client = kms_v1.KeyManagementServiceClient


def crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def encrypt(kms: Client, name: str, plaintext: bytes, aad: bytes = b"",
            **extra: Any) -> kms_v1.EncryptResponse:
    return kms.encrypt(request={"name": name, "plaintext": plaintext,
                                "additional_authenticated_data": aad, **extra}, **CALL)


def decrypt(kms: Client, name: str, ciphertext: bytes, aad: bytes = b"",
            **extra: Any) -> kms_v1.DecryptResponse:
    return kms.decrypt(request={"name": name, "ciphertext": ciphertext,
                                "additional_authenticated_data": aad, **extra}, **CALL)


def new_key(kms: Client, ring: str, key_id: str, **extra: Any) -> str:
    return kms.create_crypto_key(
        request={"parent": ring, "crypto_key_id": key_id,
                 "crypto_key": {"purpose": ENCRYPT_DECRYPT}, **extra}, **CALL).name


def new_ring(kms: Client, project: str, ring_id: str) -> str:
    return kms.create_key_ring(
        request={"parent": f"projects/{project}/locations/global", "key_ring_id": ring_id,
                 "key_ring": {}}, **CALL).name


def new_version(kms: Client, key: str) -> str:
    return kms.create_crypto_key_version(
        request={"parent": key, "crypto_key_version": {}}, **CALL).name


def set_state(kms: Client, version: str, state: Any) -> None:
    updated = kms.update_crypto_key_version(
        request={"crypto_key_version": {"name": version, "state": state},
                 "update_mask": field_mask_pb2.FieldMask(paths=["state"])}, **CALL)
    assert updated.state == state


def make_primary(kms: Client, key: str, version: str) -> None:
    kms.update_crypto_key_primary_version(
        request={"name": key, "crypto_key_version_id": version.rsplit("/", 1)[-1]}, **CALL)


def expect(exc_type: type[Exception], call: Callable[[], Any]) -> Exception:
    with pytest.raises(exc_type) as info:
        call()
    return info.value


# ---- Encrypt ------------------------------------------------------------------------


def test_encrypt_with_key_name_uses_primary_and_round_trips(kms: Client, crypto_key: str
                                                           ) -> None:
    resp = encrypt(kms, crypto_key, b"attack at dawn", b"context")
    assert resp.name == f"{crypto_key}/cryptoKeyVersions/1"
    assert resp.ciphertext_crc32c == crc(resp.ciphertext)
    assert not resp.verified_plaintext_crc32c
    assert not resp.verified_additional_authenticated_data_crc32c
    assert resp.protection_level == kms_v1.ProtectionLevel.SOFTWARE
    assert len(resp.ciphertext) == HEADER_LEN + len(b"attack at dawn") + TAG_LEN
    out = decrypt(kms, crypto_key, resp.ciphertext, b"context")
    assert out.plaintext == b"attack at dawn"
    assert out.plaintext_crc32c == crc(b"attack at dawn")
    assert out.used_primary
    assert out.protection_level == kms_v1.ProtectionLevel.SOFTWARE


def test_encrypt_with_explicit_version_uses_that_version(kms: Client, crypto_key: str) -> None:
    v2 = new_version(kms, crypto_key)
    assert v2.endswith("/cryptoKeyVersions/2")
    resp = encrypt(kms, v2, b"to version two")
    assert resp.name == v2
    assert resp.ciphertext[1:5] == struct.pack(">I", 2)
    out = decrypt(kms, crypto_key, resp.ciphertext)
    assert out.plaintext == b"to version two"
    assert not out.used_primary  # v1 is still the primary
    # The key name still encrypts under the primary, v1.
    assert encrypt(kms, crypto_key, b"x").name.endswith("/cryptoKeyVersions/1")


def test_encrypt_verifies_crcs_and_reports_them(kms: Client, crypto_key: str) -> None:
    pt, aad = b"checked plaintext", b"checked aad"
    both = encrypt(kms, crypto_key, pt, aad, plaintext_crc32c=crc(pt),
                   additional_authenticated_data_crc32c=crc(aad))
    assert both.verified_plaintext_crc32c
    assert both.verified_additional_authenticated_data_crc32c
    assert both.ciphertext_crc32c == crc(both.ciphertext)

    only_pt = encrypt(kms, crypto_key, pt, aad, plaintext_crc32c=crc(pt))
    assert only_pt.verified_plaintext_crc32c
    assert not only_pt.verified_additional_authenticated_data_crc32c

    only_aad = encrypt(kms, crypto_key, pt, aad, additional_authenticated_data_crc32c=crc(aad))
    assert not only_aad.verified_plaintext_crc32c
    assert only_aad.verified_additional_authenticated_data_crc32c


def test_encrypt_rejects_crc_mismatch(kms: Client, crypto_key: str) -> None:
    pt, aad = b"payload", b"aad"
    err = expect(gexc.InvalidArgument, lambda: encrypt(
        kms, crypto_key, pt, aad, plaintext_crc32c=crc(pt) ^ 1))
    assert "plaintext_crc32c" in str(err)
    err = expect(gexc.InvalidArgument, lambda: encrypt(
        kms, crypto_key, pt, aad, additional_authenticated_data_crc32c=crc(aad) ^ 1))
    assert "additional_authenticated_data_crc32c" in str(err)


def test_encrypt_crc_zero_is_a_present_value(kms: Client, crypto_key: str) -> None:
    # crc32c(b"") is 0, so 0 is the right checksum of an empty plaintext...
    assert crc(b"") == 0
    ok = encrypt(kms, crypto_key, b"", b"", plaintext_crc32c=0,
                 additional_authenticated_data_crc32c=0)
    assert ok.verified_plaintext_crc32c
    assert ok.verified_additional_authenticated_data_crc32c
    # ...and the wrong checksum of anything else: it must not be read as "absent".
    expect(gexc.InvalidArgument, lambda: encrypt(kms, crypto_key, b"x", plaintext_crc32c=0))
    expect(gexc.InvalidArgument, lambda: encrypt(
        kms, crypto_key, b"", b"aad", additional_authenticated_data_crc32c=0))


def test_encrypt_size_limits(kms: Client, crypto_key: str) -> None:
    biggest = os.urandom(KiB64)
    big_aad = os.urandom(KiB64)
    resp = encrypt(kms, crypto_key, biggest, big_aad)
    assert len(resp.ciphertext) == HEADER_LEN + KiB64 + TAG_LEN
    assert decrypt(kms, crypto_key, resp.ciphertext, big_aad).plaintext == biggest

    err = expect(gexc.InvalidArgument, lambda: encrypt(kms, crypto_key, biggest + b"x"))
    assert "plaintext" in str(err)
    err = expect(gexc.InvalidArgument,
                 lambda: encrypt(kms, crypto_key, b"small", big_aad + b"x"))
    assert "additional_authenticated_data" in str(err)


def test_encrypt_empty_plaintext_round_trips(kms: Client, crypto_key: str) -> None:
    resp = encrypt(kms, crypto_key, b"")
    assert len(resp.ciphertext) == HEADER_LEN + TAG_LEN
    out = decrypt(kms, crypto_key, resp.ciphertext)
    assert out.plaintext == b""
    assert out.plaintext_crc32c == 0


def test_encrypt_dek_round_trip(kms: Client, crypto_key: str) -> None:
    dek = os.urandom(32)
    wrapped = encrypt(kms, crypto_key, dek, b"object-42").ciphertext
    assert dek not in wrapped
    assert decrypt(kms, crypto_key, wrapped, b"object-42").plaintext == dek


def test_ciphertext_header_layout(kms: Client, crypto_key: str) -> None:
    new_version(kms, crypto_key)
    v3 = new_version(kms, crypto_key)
    ct = encrypt(kms, v3, b"header").ciphertext
    assert ct[0] == 1
    assert ct[1:5] == b"\x00\x00\x00\x03"
    ct1 = encrypt(kms, crypto_key, b"header").ciphertext
    assert ct1[1:5] == b"\x00\x00\x00\x01"
    # One writer session: the same salt, different nonces.
    assert ct[5:21] == ct1[5:21]
    assert ct[21:33] != ct1[21:33]


def test_two_encryptions_of_the_same_plaintext_differ(kms: Client, crypto_key: str) -> None:
    a = encrypt(kms, crypto_key, b"same", b"same").ciphertext
    b = encrypt(kms, crypto_key, b"same", b"same").ciphertext
    assert a != b
    assert decrypt(kms, crypto_key, a, b"same").plaintext == b"same"
    assert decrypt(kms, crypto_key, b, b"same").plaintext == b"same"


def test_concurrent_encryptions_never_reuse_a_nonce(kms: Client, crypto_key: str) -> None:
    def one(i: int) -> bytes:
        return bytes(encrypt(kms, crypto_key, b"n%d" % i).ciphertext)

    with ThreadPoolExecutor(max_workers=8) as pool:
        cts = list(pool.map(one, range(200)))
    salts_nonces = {ct[5:33] for ct in cts}
    assert len(salts_nonces) == len(cts)


def test_encrypt_without_primary_fails_precondition(kms: Client, key_ring: str) -> None:
    key = new_key(kms, key_ring, "noprimary", skip_initial_version_creation=True)
    err = expect(gexc.FailedPrecondition, lambda: encrypt(kms, key, b"x"))
    assert "primary" in str(err)


def test_encrypt_with_disabled_primary_fails_precondition(kms: Client, crypto_key: str) -> None:
    v1 = f"{crypto_key}/cryptoKeyVersions/1"
    set_state(kms, v1, DISABLED)
    err = expect(gexc.FailedPrecondition, lambda: encrypt(kms, crypto_key, b"x"))
    assert "DISABLED" in str(err)
    set_state(kms, v1, ENABLED)
    assert encrypt(kms, crypto_key, b"x").name == v1


def test_encrypt_with_unusable_explicit_version_fails_precondition(kms: Client,
                                                                   crypto_key: str) -> None:
    v2 = new_version(kms, crypto_key)
    v3 = new_version(kms, crypto_key)
    set_state(kms, v2, DISABLED)
    kms.destroy_crypto_key_version(request={"name": v3}, **CALL)
    err = expect(gexc.FailedPrecondition, lambda: encrypt(kms, v2, b"x"))
    assert "DISABLED" in str(err)
    err = expect(gexc.FailedPrecondition, lambda: encrypt(kms, v3, b"x"))
    assert "DESTROY_SCHEDULED" in str(err)


def test_encrypt_not_found_and_bad_names(kms: Client, crypto_key: str, key_ring: str) -> None:
    expect(gexc.NotFound, lambda: encrypt(kms, f"{key_ring}/cryptoKeys/missing", b"x"))
    expect(gexc.NotFound, lambda: encrypt(kms, f"{crypto_key}/cryptoKeyVersions/9", b"x"))
    expect(gexc.NotFound, lambda: encrypt(
        kms, "projects/nobody/locations/global/keyRings/r/cryptoKeys/k", b"x"))
    expect(gexc.InvalidArgument, lambda: encrypt(kms, key_ring, b"x"))
    expect(gexc.InvalidArgument, lambda: encrypt(kms, "not a name", b"x"))


# ---- Decrypt ------------------------------------------------------------------------


def test_decrypt_requires_a_crypto_key_name(kms: Client, crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"x").ciphertext
    expect(gexc.InvalidArgument,
           lambda: decrypt(kms, f"{crypto_key}/cryptoKeyVersions/1", ct))


def test_decrypt_verifies_crcs(kms: Client, crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"payload", b"aad").ciphertext
    out = decrypt(kms, crypto_key, ct, b"aad", ciphertext_crc32c=crc(ct),
                  additional_authenticated_data_crc32c=crc(b"aad"))
    assert out.plaintext == b"payload"
    assert out.plaintext_crc32c == crc(b"payload")
    err = expect(gexc.InvalidArgument, lambda: decrypt(
        kms, crypto_key, ct, b"aad", ciphertext_crc32c=crc(ct) ^ 1))
    assert "ciphertext_crc32c" in str(err)
    err = expect(gexc.InvalidArgument, lambda: decrypt(
        kms, crypto_key, ct, b"aad", additional_authenticated_data_crc32c=crc(b"aad") ^ 1))
    assert "additional_authenticated_data_crc32c" in str(err)
    # 0 is a present (and here wrong) checksum, not "absent".
    expect(gexc.InvalidArgument, lambda: decrypt(kms, crypto_key, ct, b"aad",
                                                 ciphertext_crc32c=0))


def test_decrypt_with_another_key_fails(kms: Client, project: str, key_ring: str,
                                        crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"for key A").ciphertext
    same_ring = new_key(kms, key_ring, "other")
    other_ring = new_key(kms, new_ring(kms, project, "ring2"), "key")
    other_project = new_key(kms, new_ring(kms, f"{project}-b", "ring"), "key")
    for name in (same_ring, other_ring, other_project):
        err = expect(gexc.InvalidArgument, lambda n=name: decrypt(kms, n, ct))
        assert "Decryption failed" in str(err)
    assert decrypt(kms, crypto_key, ct).plaintext == b"for key A"


def test_decrypt_with_wrong_aad_fails(kms: Client, crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"secret", b"right").ciphertext
    for aad in (b"wrong", b"", b"right\x00", b"Right"):
        expect(gexc.InvalidArgument, lambda a=aad: decrypt(kms, crypto_key, ct, a))
    no_aad = encrypt(kms, crypto_key, b"secret").ciphertext
    expect(gexc.InvalidArgument, lambda: decrypt(kms, crypto_key, no_aad, b"extra"))


def test_decrypt_detects_every_bit_flip(kms: Client, crypto_key: str) -> None:
    # Three versions, so flipping the version id can land on one that exists (1 ^ 2 == 3).
    new_version(kms, crypto_key)
    new_version(kms, crypto_key)
    ct = encrypt(kms, crypto_key, b"flip me", b"aad").ciphertext
    for i in range(len(ct)):
        for bit in (0x01, 0x02, 0x80):
            bad = bytearray(ct)
            bad[i] ^= bit
            with pytest.raises(gexc.InvalidArgument):
                decrypt(kms, crypto_key, bytes(bad), b"aad")
    assert decrypt(kms, crypto_key, ct, b"aad").plaintext == b"flip me"


def test_decrypt_rejects_truncated_extended_garbage_and_empty(kms: Client, crypto_key: str
                                                              ) -> None:
    ct = encrypt(kms, crypto_key, b"0123456789").ciphertext
    bad_inputs = [ct[:n] for n in range(len(ct))]  # includes b""
    bad_inputs += [ct + b"\x00", ct + ct, ct[:-1] + b"", b"\x01" + ct[1:5]]
    bad_inputs += [os.urandom(n) for n in (1, 5, 33, 48, 49, 64, 1000)]
    bad_inputs += [b"\x01" + os.urandom(100), b"\x02" + ct[1:], b"\x00" * 60]
    for data in bad_inputs:
        with pytest.raises(gexc.InvalidArgument):
            decrypt(kms, crypto_key, data)


def test_decrypt_oversize_ciphertext(kms: Client, crypto_key: str) -> None:
    biggest = encrypt(kms, crypto_key, bytes(KiB64)).ciphertext
    assert decrypt(kms, crypto_key, biggest).plaintext == bytes(KiB64)
    err = expect(gexc.InvalidArgument,
                 lambda: decrypt(kms, crypto_key, biggest + b"\x00"))
    assert "ciphertext" in str(err)
    expect(gexc.InvalidArgument, lambda: decrypt(kms, crypto_key, b"x" * (1 << 19)))
    # Over the 1 MiB request limit the message is refused before it is read.
    expect(gexc.ResourceExhausted, lambda: decrypt(kms, crypto_key, b"x" * (1 << 20)))
    expect(gexc.InvalidArgument,
           lambda: decrypt(kms, crypto_key, biggest, os.urandom(KiB64 + 1)))


def test_decrypt_disabled_version_then_reenabled(kms: Client, crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"pause").ciphertext
    v1 = f"{crypto_key}/cryptoKeyVersions/1"
    set_state(kms, v1, DISABLED)
    err = expect(gexc.FailedPrecondition, lambda: decrypt(kms, crypto_key, ct))
    assert "DISABLED" in str(err)
    set_state(kms, v1, ENABLED)
    assert decrypt(kms, crypto_key, ct).plaintext == b"pause"


def test_decrypt_destroy_scheduled_then_restored(kms: Client, crypto_key: str) -> None:
    ct = encrypt(kms, crypto_key, b"almost gone").ciphertext
    v1 = f"{crypto_key}/cryptoKeyVersions/1"
    kms.destroy_crypto_key_version(request={"name": v1}, **CALL)
    err = expect(gexc.FailedPrecondition, lambda: decrypt(kms, crypto_key, ct))
    assert "DESTROY_SCHEDULED" in str(err)
    restored = kms.restore_crypto_key_version(request={"name": v1}, **CALL)
    assert restored.state == DISABLED
    expect(gexc.FailedPrecondition, lambda: decrypt(kms, crypto_key, ct))
    set_state(kms, v1, ENABLED)
    assert decrypt(kms, crypto_key, ct).plaintext == b"almost gone"


def test_used_primary_and_old_versions_after_new_primary(kms: Client, crypto_key: str) -> None:
    old = encrypt(kms, crypto_key, b"old").ciphertext
    assert decrypt(kms, crypto_key, old).used_primary
    v2 = new_version(kms, crypto_key)
    make_primary(kms, crypto_key, v2)
    new = encrypt(kms, crypto_key, b"new")
    assert new.name == v2
    out_old = decrypt(kms, crypto_key, old)
    assert out_old.plaintext == b"old"
    assert not out_old.used_primary
    out_new = decrypt(kms, crypto_key, new.ciphertext)
    assert out_new.plaintext == b"new"
    assert out_new.used_primary


def test_decrypt_missing_key_is_not_found(kms: Client, crypto_key: str, key_ring: str) -> None:
    ct = encrypt(kms, crypto_key, b"x").ciphertext
    expect(gexc.NotFound, lambda: decrypt(kms, f"{key_ring}/cryptoKeys/missing", ct))
    expect(gexc.NotFound, lambda: decrypt(
        kms, "projects/nobody/locations/global/keyRings/r/cryptoKeys/k", ct))


def test_ciphertexts_survive_a_restart(fresh_central: CentralProcess, project: str) -> None:
    kms = fresh_central.client()
    ring = new_ring(kms, project, "ring")
    key = new_key(kms, ring, "key")
    v2 = new_version(kms, key)
    before = [encrypt(kms, key, b"before-1", b"a").ciphertext,
              encrypt(kms, v2, b"before-2", b"b").ciphertext]
    fresh_central.restart()
    kms = fresh_central.client()
    assert decrypt(kms, key, before[0], b"a").plaintext == b"before-1"
    assert decrypt(kms, key, before[1], b"b").plaintext == b"before-2"
    after = encrypt(kms, key, b"after").ciphertext
    assert after[5:21] != before[0][5:21]  # a new writer session picks a new salt
    assert decrypt(kms, key, after).plaintext == b"after"


# ---- GenerateRandomBytes ------------------------------------------------------------


def random_bytes(kms: Client, location: str, length: int, **extra: Any
                 ) -> kms_v1.GenerateRandomBytesResponse:
    return kms.generate_random_bytes(
        request={"location": location, "length_bytes": length, **extra}, **CALL)


@pytest.mark.parametrize("length", [1, 32, 1024])
def test_generate_random_bytes(kms: Client, length: int) -> None:
    loc = "projects/p/locations/global"
    a = random_bytes(kms, loc, length)
    assert len(a.data) == length
    assert a.data_crc32c == crc(a.data)
    if length >= 32:
        assert random_bytes(kms, loc, length).data != a.data


@pytest.mark.parametrize("length", [0, 1025, -1])
def test_generate_random_bytes_bad_length(kms: Client, length: int) -> None:
    err = expect(gexc.InvalidArgument,
                 lambda: random_bytes(kms, "projects/p/locations/global", length))
    assert "length_bytes" in str(err)


def test_generate_random_bytes_location_and_protection_level(kms: Client) -> None:
    expect(gexc.NotFound, lambda: random_bytes(kms, "projects/p/locations/mars", 8))
    expect(gexc.InvalidArgument, lambda: random_bytes(kms, "projects/p", 8))
    hsm = random_bytes(kms, "projects/p/locations/global", 16,
                       protection_level=kms_v1.ProtectionLevel.HSM)
    assert len(hsm.data) == 16
    sw = random_bytes(kms, "projects/p/locations/global", 16,
                      protection_level=kms_v1.ProtectionLevel.SOFTWARE)
    assert len(sw.data) == 16
    expect(gexc.InvalidArgument, lambda: random_bytes(
        kms, "projects/p/locations/global", 16,
        protection_level=kms_v1.ProtectionLevel.EXTERNAL))
