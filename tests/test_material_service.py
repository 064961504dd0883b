"""valv.sidecar.v1.KeyMaterial/FetchVersion against a real central, through the generated
grpclib stub: sealed material that works with central's ciphertexts, and its refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.cloud import kms_v1
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status

from tests.helpers import CALL, CentralProcess
from valv._proto.valv.sidecar import v1 as sidecar_pb
from valv.core.crypto.ciphertext import CiphertextCodec
from valv.core.material import MaterialError, open_sealed

ENCRYPT, DECRYPT = sidecar_pb.Purpose.ENCRYPT, sidecar_pb.Purpose.DECRYPT
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT


def raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def fetch(central: CentralProcess, token: str | None = None, **request: Any
          ) -> sidecar_pb.FetchVersionResponse:
    host, port = central.addr.rsplit(":", 1)
    metadata = {"authorization": f"Bearer {token}"} if token else None

    async def run() -> sidecar_pb.FetchVersionResponse:
        channel = Channel(host, int(port))
        try:
            stub = sidecar_pb.KeyMaterialStub(channel, timeout=10)
            return await stub.fetch_version(sidecar_pb.FetchVersionRequest(**request),
                                            metadata=metadata)
        finally:
            channel.close()

    return asyncio.run(run())


def status_of(central: CentralProcess, token: str | None = None, **request: Any) -> Status:
    with pytest.raises(GRPCError) as info:
        fetch(central, token, **request)
    return info.value.status


# ---- dev mode ---------------------------------------------------------------------


def test_encrypt_material_makes_ciphertexts_central_decrypts(
        central: CentralProcess, kms: kms_v1.KeyManagementServiceClient,
        crypto_key: str) -> None:
    recipient = X25519PrivateKey.generate()
    response = fetch(central, crypto_key=crypto_key, version_id=0, purpose=ENCRYPT,
                     recipient_public_key=raw(recipient))
    assert response.version == f"{crypto_key}/cryptoKeyVersions/1"
    assert response.state == sidecar_pb.VersionState.ENABLED
    assert response.is_primary and response.ttl_seconds == 60
    kek = open_sealed(response.sealed_material, recipient, version_name=response.version,
                      purpose="ENCRYPT")
    assert len(kek) == 32 and bytes(kek) not in response.sealed_material
    ciphertext = CiphertextCodec().encrypt(kek, key_name=crypto_key, version_id=1,
                                           plaintext=b"from the sidecar", aad=b"ctx")
    decrypted = kms.decrypt(request={"name": crypto_key, "ciphertext": ciphertext,
                                     "additional_authenticated_data": b"ctx"}, **CALL)
    assert decrypted.plaintext == b"from the sidecar"

    # And the other way: decrypt material opens central's ciphertexts.
    made = kms.encrypt(request={"name": crypto_key, "plaintext": b"from central"}, **CALL)
    response = fetch(central, crypto_key=crypto_key, version_id=1, purpose=DECRYPT,
                     recipient_public_key=raw(recipient))
    kek = open_sealed(response.sealed_material, recipient, version_name=response.version,
                      purpose="DECRYPT")
    assert CiphertextCodec().decrypt(kek, key_name=crypto_key, version_id=1,
                                     ciphertext=made.ciphertext, aad=b"") == b"from central"


def test_material_opens_only_for_its_recipient_and_context(
        central: CentralProcess, crypto_key: str) -> None:
    recipient = X25519PrivateKey.generate()
    response = fetch(central, crypto_key=crypto_key, purpose=ENCRYPT,
                     recipient_public_key=raw(recipient))
    with pytest.raises(MaterialError):
        open_sealed(response.sealed_material, X25519PrivateKey.generate(),
                    version_name=response.version, purpose="ENCRYPT")
    with pytest.raises(MaterialError):
        open_sealed(response.sealed_material, recipient, version_name=response.version,
                    purpose="DECRYPT")
    with pytest.raises(MaterialError):
        open_sealed(response.sealed_material, recipient,
                    version_name=f"{crypto_key}/cryptoKeyVersions/2", purpose="ENCRYPT")


def test_refusals(central: CentralProcess, kms: kms_v1.KeyManagementServiceClient,
                  crypto_key: str) -> None:
    pub = raw(X25519PrivateKey.generate())
    kms.update_crypto_key_version(request={
        "crypto_key_version": {"name": f"{crypto_key}/cryptoKeyVersions/1", "state": 2},
        "update_mask": {"paths": ["state"]}}, **CALL)
    for purpose in (ENCRYPT, DECRYPT):
        assert status_of(central, crypto_key=crypto_key, purpose=purpose,
                         recipient_public_key=pub) == Status.FAILED_PRECONDITION
        assert status_of(central, crypto_key=crypto_key, version_id=1, purpose=purpose,
                         recipient_public_key=pub) == Status.FAILED_PRECONDITION
        # As Encrypt and Decrypt at central: a missing version named by the caller is
        # NOT_FOUND; one named by a ciphertext (DECRYPT) is a decryption failure.
        assert status_of(central, crypto_key=crypto_key, version_id=7, purpose=purpose,
                         recipient_public_key=pub) == (
            Status.NOT_FOUND if purpose == ENCRYPT else Status.INVALID_ARGUMENT)
        assert status_of(central, crypto_key=f"{crypto_key}-missing", purpose=purpose,
                         recipient_public_key=pub) == Status.NOT_FOUND
        for bad in (b"", b"\x01" * 31, bytes(32)):
            assert status_of(central, crypto_key=crypto_key, purpose=purpose,
                             recipient_public_key=bad) == Status.INVALID_ARGUMENT
    assert status_of(central, crypto_key=crypto_key, recipient_public_key=pub) \
        == Status.INVALID_ARGUMENT  # no purpose
    assert status_of(central, crypto_key="not/a/key", purpose=ENCRYPT,
                     recipient_public_key=pub) == Status.INVALID_ARGUMENT


# ---- with authentication --------------------------------------------------------

ADMIN = "user:admin@example.com"
SIDECAR = "serviceAccount:sidecar@example.com"
APP = "serviceAccount:app@example.com"  # uses keys, but is no sidecar
TOKENS = {member: f"token-{uuid.uuid4().hex}" for member in (ADMIN, SIDECAR, APP)}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CentralProcess]:
    home = tmp_path_factory.mktemp("secured")
    tokens_file = home / "tokens.json"
    tokens_file.write_text(json.dumps(
        {member: hashlib.sha256(token.encode()).hexdigest() for member, token in TOKENS.items()}))
    root_policy = home / "root-policy.json"
    root_policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": [ADMIN]},
        # The admin is a sidecar identity too, so what refuses it below is its
        # lack of use permission.
        {"role": "roles/valv.sidecar", "members": [SIDECAR, ADMIN]}]}))
    process = CentralProcess(home / "central", "--tokens-file", str(tokens_file),
                             "--dev-root-key",
                             env={"VALV_ROOT_POLICY_FILE": str(root_policy)}).start()
    yield process
    process.stop()


def test_the_use_permission_of_the_purpose_is_checked(secured: CentralProcess) -> None:
    client = secured.client()
    admin = [("authorization", f"Bearer {TOKENS[ADMIN]}")]
    ring = client.create_key_ring(request={
        "parent": f"projects/p-{uuid.uuid4().hex[:12]}/locations/global",
        "key_ring_id": "ring", "key_ring": {}}, metadata=admin, **CALL).name
    key = client.create_crypto_key(request={
        "parent": ring, "crypto_key_id": "key", "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
        metadata=admin, **CALL).name
    client.set_iam_policy(request={"resource": key, "policy": {"bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypter", "members": [SIDECAR, APP]}]}},
        metadata=admin, **CALL)
    recipient = X25519PrivateKey.generate()
    request: dict[str, Any] = {"crypto_key": key, "recipient_public_key": raw(recipient)}

    response = fetch(secured, TOKENS[SIDECAR], purpose=ENCRYPT, **request)
    assert open_sealed(response.sealed_material, recipient, version_name=response.version,
                       purpose="ENCRYPT")
    assert status_of(secured, TOKENS[SIDECAR], purpose=DECRYPT, **request) \
        == Status.PERMISSION_DENIED
    # The same answer for a key that does not exist: nothing leaks.
    assert status_of(secured, TOKENS[SIDECAR], purpose=DECRYPT,
                     **{**request, "crypto_key": f"{key}-missing"}) == Status.PERMISSION_DENIED
    # An admin manages keys but does not use them.
    for purpose in (ENCRYPT, DECRYPT):
        assert status_of(secured, TOKENS[ADMIN], purpose=purpose, **request) \
            == Status.PERMISSION_DENIED
    assert status_of(secured, None, purpose=ENCRYPT, **request) == Status.UNAUTHENTICATED
    # A key user that is not a sidecar identity may Encrypt, but gets no KEK.
    with pytest.raises(GRPCError) as refused:
        fetch(secured, TOKENS[APP], purpose=ENCRYPT, **request)
    assert refused.value.status is Status.PERMISSION_DENIED
    assert "valv.sidecar.connect" in (refused.value.message or "")
    assert "roles/valv.sidecar" in (refused.value.message or "")
    assert client.encrypt(request={"name": key, "plaintext": b"dek"}, metadata=[
        ("authorization", f"Bearer {TOKENS[APP]}")], **CALL).ciphertext
    logs = secured.logs()
    assert bytes(open_sealed(response.sealed_material, recipient,
                             version_name=response.version, purpose="ENCRYPT")).hex() not in logs
