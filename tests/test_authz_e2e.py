"""Authorization end to end: a real central with static tokens and a root policy, driven
through Google's official client with per-call bearer tokens."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT

ADMIN = "user:admin@example.com"
APP = "serviceAccount:app@example.com"
NOBODY = "user:nobody@example.com"
AUDITOR = "user:auditor@example.com"
TOKENS = {member: f"token-{uuid.uuid4().hex}" for member in (ADMIN, APP, NOBODY, AUDITOR)}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CentralProcess]:
    """A central that authenticates callers by token; user:admin is cloudkms.admin everywhere."""
    home = tmp_path_factory.mktemp("secured")
    tokens_file = home / "tokens.json"
    tokens_file.write_text(json.dumps(
        {member: hashlib.sha256(token.encode()).hexdigest() for member, token in TOKENS.items()}))
    root_policy = home / "root-policy.json"
    root_policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": [ADMIN]},
        {"role": "roles/cloudkms.viewer", "members": [AUDITOR]}]}))
    process = CentralProcess(home / "central", "--tokens-file", str(tokens_file),
                             "--dev-root-key",
                             env={"VALV_ROOT_POLICY_FILE": str(root_policy)}).start()
    yield process
    process.stop()


class As:
    """Google's client, calling as one member (its bearer token on every call)."""

    def __init__(self, client: Client, member: str) -> None:
        self._client = client
        self._metadata = [("authorization", f"Bearer {TOKENS[member]}")]

    def __getattr__(self, method: str) -> Callable[..., Any]:
        call = getattr(self._client, method)

        def with_token(**request: Any) -> Any:
            return call(request=request, metadata=self._metadata, **CALL)

        return with_token


@pytest.fixture(scope="module")
def client(secured: CentralProcess) -> Client:
    return secured.client()


@pytest.fixture
def admin(client: Client) -> As:
    return As(client, ADMIN)


@pytest.fixture
def app(client: Client) -> As:
    return As(client, APP)


@pytest.fixture
def nobody(client: Client) -> As:
    return As(client, NOBODY)


@pytest.fixture
def ring(admin: As) -> str:
    project = f"p-{uuid.uuid4().hex[:12]}"
    return str(admin.create_key_ring(parent=f"projects/{project}/locations/global",
                                     key_ring_id="ring", key_ring={}).name)


def make_key(admin: As, ring: str, key_id: str = "key") -> str:
    return str(admin.create_crypto_key(parent=ring, crypto_key_id=key_id,
                                       crypto_key={"purpose": ENCRYPT_DECRYPT}).name)


def every_rpc(ring: str, key: str, ciphertext: bytes) -> dict[str, dict[str, Any]]:
    """A valid request for every RPC Valv implements."""
    version = f"{key}/cryptoKeyVersions/1"
    location = ring.rsplit("/keyRings/", 1)[0]
    return {
        "create_key_ring": {"parent": location, "key_ring_id": "other", "key_ring": {}},
        "get_key_ring": {"name": ring},
        "list_key_rings": {"parent": location},
        "create_crypto_key": {"parent": ring, "crypto_key_id": "other",
                              "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
        "get_crypto_key": {"name": key},
        "list_crypto_keys": {"parent": ring},
        "update_crypto_key": {"crypto_key": {"name": key, "labels": {"a": "b"}},
                              "update_mask": {"paths": ["labels"]}},
        "update_crypto_key_primary_version": {"name": key, "crypto_key_version_id": "1"},
        "create_crypto_key_version": {"parent": key, "crypto_key_version": {}},
        "get_crypto_key_version": {"name": version},
        "list_crypto_key_versions": {"parent": key},
        "update_crypto_key_version": {"crypto_key_version": {"name": version, "state": 2},
                                      "update_mask": {"paths": ["state"]}},
        "destroy_crypto_key_version": {"name": version},
        "restore_crypto_key_version": {"name": version},
        "encrypt": {"name": key, "plaintext": b"secret"},
        "decrypt": {"name": key, "ciphertext": ciphertext},
        "generate_random_bytes": {"location": location, "length_bytes": 16,
                                  "protection_level": kms_v1.ProtectionLevel.SOFTWARE},
        "list_locations": {"name": location.rsplit("/locations/", 1)[0]},
        "get_location": {"name": location},
        "get_iam_policy": {"resource": key},
        "set_iam_policy": {"resource": key, "policy": {"bindings": []}},
    }


def call(member: As, method: str, request: dict[str, Any]) -> Any:
    result = getattr(member, method)(**request)
    if method.startswith("list_"):
        list(result)  # a pager calls the RPC lazily
    return result


def test_a_caller_without_roles_is_denied_every_rpc(admin: As, nobody: As, ring: str,
                                                    client: Client) -> None:
    key = make_key(admin, ring)
    app = As(client, APP)
    admin.set_iam_policy(resource=key, policy={"bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter", "members": [APP]}]})
    ciphertext = app.encrypt(name=key, plaintext=b"secret").ciphertext
    for method, request in every_rpc(ring, key, ciphertext).items():
        with pytest.raises(gexc.PermissionDenied) as info:
            call(nobody, method, request)
        assert "Permission 'cloudkms." in info.value.message, method
        assert "(or it may not exist)" in info.value.message, method
    # TestIamPermissions needs no permission: it reports none.
    assert list(nobody.test_iam_permissions(
        resource=key, permissions=["cloudkms.cryptoKeys.get"]).permissions) == []


def test_admin_manages_but_cannot_use_keys(admin: As, ring: str) -> None:
    key = make_key(admin, ring)
    version = admin.create_crypto_key_version(parent=key, crypto_key_version={}).name
    admin.destroy_crypto_key_version(name=version)
    admin.restore_crypto_key_version(name=version)
    assert [k.name for k in admin.list_crypto_keys(parent=ring)] == [key]
    for method, request in (("encrypt", {"name": key, "plaintext": b"x"}),
                            ("decrypt", {"name": key, "ciphertext": b"x" * 40}),
                            ("encrypt", {"name": version, "plaintext": b"x"})):
        with pytest.raises(gexc.PermissionDenied, match="useTo"):
            call(admin, method, request)
    # The admin can grant use to someone else, but holds no use permission itself.
    tested = admin.test_iam_permissions(resource=key, permissions=[
        "cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeyVersions.useToDecrypt",
        "cloudkms.cryptoKeys.setIamPolicy", "cloudkms.cryptoKeyVersions.destroy"])
    assert list(tested.permissions) == ["cloudkms.cryptoKeys.setIamPolicy",
                                        "cloudkms.cryptoKeyVersions.destroy"]


def test_a_role_on_the_key_ring_reaches_its_keys(admin: As, app: As, ring: str,
                                                  client: Client) -> None:
    key = make_key(admin, ring)
    with pytest.raises(gexc.PermissionDenied):
        app.encrypt(name=key, plaintext=b"x")
    policy = admin.get_iam_policy(resource=ring)
    admin.set_iam_policy(resource=ring, policy={"etag": policy.etag, "bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter", "members": [APP]}]})
    # Granted at once through this central: the policy cache is dropped on write.
    ciphertext = app.encrypt(name=key, plaintext=b"x").ciphertext
    assert app.decrypt(name=key, ciphertext=ciphertext).plaintext == b"x"
    later = make_key(admin, ring, "later")  # keys created afterwards inherit too
    app.encrypt(name=later, plaintext=b"y")
    # Use, not management or reading.
    for method, request in (("get_crypto_key", {"name": key}),
                            ("create_crypto_key_version", {"parent": key,
                                                           "crypto_key_version": {}})):
        with pytest.raises(gexc.PermissionDenied):
            call(app, method, request)
    # Not on another ring.
    other_ring = admin.create_key_ring(parent=ring.rsplit("/keyRings/", 1)[0],
                                       key_ring_id="other", key_ring={}).name
    with pytest.raises(gexc.PermissionDenied):
        app.encrypt(name=make_key(admin, other_ring), plaintext=b"x")
    # Revoked: denied again.
    admin.set_iam_policy(resource=ring, policy={"bindings": []})
    with pytest.raises(gexc.PermissionDenied):
        app.encrypt(name=key, plaintext=b"x")


def test_a_role_on_a_key_is_only_that_key(admin: As, app: As, ring: str) -> None:
    key, sibling = make_key(admin, ring), make_key(admin, ring, "sibling")
    admin.set_iam_policy(resource=key, policy={"bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypter", "members": [APP]}]})
    ciphertext = app.encrypt(name=f"{key}/cryptoKeyVersions/1", plaintext=b"x").ciphertext
    with pytest.raises(gexc.PermissionDenied, match="useToDecrypt"):
        app.decrypt(name=key, ciphertext=ciphertext)
    with pytest.raises(gexc.PermissionDenied):
        app.encrypt(name=sibling, plaintext=b"x")


def test_missing_resources_do_not_leak(admin: As, nobody: As, client: Client,
                                       ring: str) -> None:
    missing_key = f"{ring}/cryptoKeys/missing"
    missing_ring = ring.replace("/keyRings/ring", "/keyRings/missing")
    existing = make_key(admin, ring)
    denied = []
    for name in (existing, missing_key):
        with pytest.raises(gexc.PermissionDenied) as info:
            nobody.get_crypto_key(name=name)
        denied.append(info.value.message.replace(name, "NAME"))
    assert denied[0] == denied[1]
    with pytest.raises(gexc.PermissionDenied):
        nobody.get_key_ring(name=missing_ring)
    # With the permission, a missing resource is NOT_FOUND.
    auditor = As(client, AUDITOR)
    with pytest.raises(gexc.NotFound):
        auditor.get_crypto_key(name=missing_key)
    with pytest.raises(gexc.NotFound):
        auditor.get_key_ring(name=missing_ring)
    with pytest.raises(gexc.NotFound):
        admin.get_iam_policy(resource=missing_key)


def test_iam_policy_permissions(admin: As, app: As, client: Client, ring: str) -> None:
    key = make_key(admin, ring)
    auditor = As(client, AUDITOR)
    # cloudkms.viewer reads keys, not their policies.
    auditor.get_crypto_key(name=key)
    with pytest.raises(gexc.PermissionDenied, match=r"cloudkms\.cryptoKeys\.getIamPolicy"):
        auditor.get_iam_policy(resource=key)
    with pytest.raises(gexc.PermissionDenied, match=r"cloudkms\.keyRings\.setIamPolicy"):
        app.set_iam_policy(resource=ring, policy={"bindings": [
            {"role": "roles/owner", "members": [APP]}]})
    # A stale etag through the client, authenticated.
    first = admin.get_iam_policy(resource=key)
    admin.set_iam_policy(resource=key, policy={"etag": first.etag, "bindings": []})
    with pytest.raises(gexc.Aborted):
        admin.set_iam_policy(resource=key, policy={"etag": first.etag, "bindings": []})


def test_root_policy_reaches_locations(admin: As, app: As, ring: str) -> None:
    location = ring.rsplit("/keyRings/", 1)[0]
    assert admin.get_location(name=location).location_id == "global"
    with pytest.raises(gexc.PermissionDenied, match=r"cloudkms\.locations\.get"):
        app.get_location(name=location)
    # roles/cloudkms.admin has no generateRandomBytes (cryptoOperator does).
    with pytest.raises(gexc.PermissionDenied, match="generateRandomBytes"):
        admin.generate_random_bytes(location=location, length_bytes=8,
                                    protection_level=kms_v1.ProtectionLevel.SOFTWARE)


def test_malformed_names_stay_invalid_argument(nobody: As) -> None:
    with pytest.raises(gexc.InvalidArgument):
        nobody.encrypt(name="projects/p/keyRings/r", plaintext=b"x")


def test_dev_mode_still_has_full_rights(kms: Client, crypto_key: str) -> None:
    """No tokens configured: the caller is user:dev, and nothing is checked."""
    ciphertext = kms.encrypt(request={"name": crypto_key, "plaintext": b"x"}, **CALL).ciphertext
    assert kms.decrypt(request={"name": crypto_key, "ciphertext": ciphertext},
                       **CALL).plaintext == b"x"
    kms.set_iam_policy(request={"resource": crypto_key, "policy": {"bindings": [
        {"role": "roles/cloudkms.viewer", "members": [NOBODY]}]}}, **CALL)
    kms.encrypt(request={"name": crypto_key, "plaintext": b"x"}, **CALL)


def test_the_log_holds_no_tokens(secured: CentralProcess) -> None:
    text = secured.logs()
    assert not any(token in text for token in TOKENS.values())
