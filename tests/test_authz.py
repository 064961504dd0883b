"""The Authorizer in process: callers authenticated by token, policies on a real store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.keystore_fixtures import open_keystore
from valv._proto.google.cloud import location as loc_pb
from valv._proto.google.cloud.kms import v1 as kms_pb
from valv._proto.google.iam import v1 as iam_pb
from valv.central.authz import IamAuthorizer
from valv.central.calls import Calls
from valv.central.service import IamPolicyService
from valv.core import iam
from valv.core.calls import DEV_PRINCIPAL, CallContext, Principal, current_call
from valv.core.clock import FakeClock
from valv.core.errors import InvalidArgument, PermissionDenied
from valv.core.iam import BindingInput, IamPolicies
from valv.core.keystore import NewCryptoKey
from valv.core.model import Purpose

LOC = "projects/p/locations/global"
RING = f"{LOC}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
MISSING_KEY = f"{RING}/cryptoKeys/missing"


def caller(member: str, rpc: str) -> CallContext:
    return CallContext(rpc=rpc, principal=Principal(member, "token"), peer="127.0.0.1:1",
                       request_id="r")


@pytest.fixture
async def policies(tmp_path: Path) -> AsyncIterator[IamPolicies]:
    clock = FakeClock()
    root = iam.Policy(iam.check_policy([BindingInput("roles/cloudkms.admin", ["user:admin"])]))
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        await ks.create_key_ring(LOC, "r")
        await ks.create_crypto_key(RING, "k", NewCryptoKey(purpose=Purpose.ENCRYPT_DECRYPT))
        yield IamPolicies(ks, clock, root=root, cache_ttl_s=1.0)


async def test_dev_mode_allows_everything(policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    call = CallContext(rpc="DestroyCryptoKeyVersion", principal=DEV_PRINCIPAL, peer="unix",
                       request_id="r")
    await authz.authorize(call, kms_pb.DestroyCryptoKeyVersionRequest(name=f"{KEY}/"
                                                                      "cryptoKeyVersions/1"))
    # Even an unknown RPC: dev mode skips the table.
    await authz.authorize(CallContext(rpc="Anything", principal=DEV_PRINCIPAL, peer="unix",
                                      request_id="r"), object())


async def test_denied_message_is_the_same_whether_or_not_the_resource_exists(
        policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    messages = []
    for name in (KEY, MISSING_KEY):
        with pytest.raises(PermissionDenied) as info:
            await authz.authorize(caller("user:nobody", "Encrypt"),
                                  kms_pb.EncryptRequest(name=name, plaintext=b"x"))
        messages.append(info.value.message.replace(name, "<name>"))
    assert messages[0] == messages[1] == (
        "Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on resource '<name>' "
        "(or it may not exist).")


async def test_grants_follow_the_policies(policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    encrypt = kms_pb.EncryptRequest(name=f"{KEY}/cryptoKeyVersions/1", plaintext=b"x")
    create = kms_pb.CreateCryptoKeyRequest(parent=RING, crypto_key_id="new")
    # The root admin manages, but can't use keys.
    await authz.authorize(caller("user:admin", "CreateCryptoKey"), create)
    with pytest.raises(PermissionDenied):
        await authz.authorize(caller("user:admin", "Encrypt"), encrypt)
    # A role on the ring reaches the key (through a version name, too).
    await policies.set_policy(RING, [BindingInput("roles/cloudkms.cryptoKeyEncrypter",
                                                  ["serviceAccount:app@p"])], etag=b"")
    await authz.authorize(caller("serviceAccount:app@p", "Encrypt"), encrypt)
    with pytest.raises(PermissionDenied, match="useToDecrypt"):
        await authz.authorize(caller("serviceAccount:app@p", "Decrypt"),
                              kms_pb.DecryptRequest(name=KEY, ciphertext=b"x"))
    with pytest.raises(PermissionDenied):
        await authz.authorize(caller("serviceAccount:other@p", "Encrypt"), encrypt)


async def test_malformed_names_are_invalid_argument_before_any_check(
        policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    with pytest.raises(InvalidArgument):
        await authz.authorize(caller("user:nobody", "Encrypt"),
                              kms_pb.EncryptRequest(name="projects/p"))


async def test_locations_and_random_bytes_need_the_root_policy(policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    await authz.authorize(caller("user:admin", "ListLocations"),
                          loc_pb.ListLocationsRequest(name="projects/p"))
    with pytest.raises(PermissionDenied, match="generateRandomBytes"):
        await authz.authorize(caller("user:admin", "GenerateRandomBytes"),
                              kms_pb.GenerateRandomBytesRequest(location=LOC, length_bytes=8))
    with pytest.raises(PermissionDenied, match=r"cloudkms\.locations\.list"):
        await authz.authorize(caller("user:nobody", "ListLocations"),
                              loc_pb.ListLocationsRequest(name="projects/p"))


async def test_test_iam_permissions_reports_the_callers_own(policies: IamPolicies) -> None:
    authz = IamAuthorizer(policies)
    service = IamPolicyService(policies, Calls())
    asked = [iam.USE_TO_ENCRYPT, iam.CRYPTO_KEYS_GET, iam.USE_TO_ENCRYPT, "storage.buckets.get"]
    request = iam_pb.TestIamPermissionsRequest(resource=KEY, permissions=asked)

    async def test_as(call: CallContext) -> list[str]:
        await authz.authorize(call, request)  # needs no permission
        token = current_call.set(call)
        try:
            response: Any = await service.test_iam_permissions(request)
        finally:
            current_call.reset(token)
        return list(response.permissions)

    assert await test_as(caller("user:nobody", "TestIamPermissions")) == []
    assert await test_as(caller("user:admin", "TestIamPermissions")) == [iam.CRYPTO_KEYS_GET]
    dev = CallContext(rpc="TestIamPermissions", principal=DEV_PRINCIPAL, peer="unix",
                      request_id="r")
    assert await test_as(dev) == [iam.USE_TO_ENCRYPT, iam.CRYPTO_KEYS_GET]
    with pytest.raises(InvalidArgument, match="wildcard"):
        await service.test_iam_permissions(iam_pb.TestIamPermissionsRequest(
            resource=KEY, permissions=["cloudkms.*"]))
    empty: Any = await service.test_iam_permissions(iam_pb.TestIamPermissionsRequest(
        resource=f"{RING}/importJobs/j", permissions=[iam.IMPORT_JOBS_GET]))
    assert list(empty.permissions) == []
