"""What the audit log may say about a request: never data or key material."""

from __future__ import annotations

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.central.calls import describe_request

KEY = "projects/p/locations/global/keyRings/r/cryptoKeys/k"


def test_data_fields_are_reduced_to_their_length() -> None:
    resource, summary = describe_request(kms_v1.EncryptRequest(
        name=KEY, plaintext=b"top secret", additional_authenticated_data=b"context"))
    assert resource == KEY
    assert summary["plaintext_bytes"] == 10
    assert summary["additional_authenticated_data_bytes"] == 7
    text = repr(summary)
    assert "top secret" not in text and "dG9wIHNlY3JldA" not in text  # nor its base64
    assert "context" not in text


def test_the_resource_comes_from_name_parent_or_the_nested_resource() -> None:
    assert describe_request(kms_v1.CreateKeyRingRequest(
        parent="projects/p/locations/global", key_ring_id="r"))[0] == "projects/p/locations/global"
    assert describe_request(kms_v1.UpdateCryptoKeyRequest(
        crypto_key=kms_v1.CryptoKey(name=KEY)))[0] == KEY
    assert describe_request(kms_v1.DecryptRequest(name=KEY, ciphertext=b"\x01" * 60))[1] == {
        "name": KEY, "ciphertext_bytes": 60}


def test_checksums_of_secrets_are_recorded_only_as_present() -> None:
    _, summary = describe_request(kms_v1.EncryptRequest(
        name=KEY, plaintext=b"1234", plaintext_crc32c=4131058926,
        additional_authenticated_data_crc32c=0))
    assert summary["plaintext_crc32c"] == "present"
    assert summary["additional_authenticated_data_crc32c"] == "present"
    assert "4131058926" not in repr(summary)
    assert not any(key.endswith("crc32_c") for key in summary)
