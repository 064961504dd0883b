"""The permission table: every RPC central serves, the permission it needs, and where."""

from __future__ import annotations

from typing import Any

import pytest
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from valv._proto.google.cloud import location as loc_pb
from valv._proto.google.cloud.kms import v1 as kms_pb
from valv._proto.google.iam import v1 as iam_pb
from valv._proto.google.longrunning import OperationsBase
from valv._proto.valv.sidecar import v1 as sidecar_pb
from valv.central import permissions
from valv.central.permissions import Check, required
from valv.core.errors import InvalidArgument, PermissionDenied
from valv.core.names import (
    parse_crypto_key,
    parse_crypto_key_version,
    parse_key_ring,
    parse_location,
    parse_project,
)

# The expected permission of every RPC, written out (not derived from the code
# under test). Sources: Cloud KMS's REST reference, "Authorization requires the
# following IAM permission on the specified resource ...".
EXPECTED: dict[str, str | None] = {
    "CreateKeyRing": "cloudkms.keyRings.create",
    "GetKeyRing": "cloudkms.keyRings.get",
    "ListKeyRings": "cloudkms.keyRings.list",
    "CreateCryptoKey": "cloudkms.cryptoKeys.create",
    "GetCryptoKey": "cloudkms.cryptoKeys.get",
    "ListCryptoKeys": "cloudkms.cryptoKeys.list",
    "UpdateCryptoKey": "cloudkms.cryptoKeys.update",
    "UpdateCryptoKeyPrimaryVersion": "cloudkms.cryptoKeys.update",
    "DeleteCryptoKey": "cloudkms.cryptoKeys.delete",
    "CreateCryptoKeyVersion": "cloudkms.cryptoKeyVersions.create",
    "GetCryptoKeyVersion": "cloudkms.cryptoKeyVersions.get",
    "ListCryptoKeyVersions": "cloudkms.cryptoKeyVersions.list",
    "UpdateCryptoKeyVersion": "cloudkms.cryptoKeyVersions.update",
    "DestroyCryptoKeyVersion": "cloudkms.cryptoKeyVersions.destroy",
    "RestoreCryptoKeyVersion": "cloudkms.cryptoKeyVersions.restore",
    "DeleteCryptoKeyVersion": "cloudkms.cryptoKeyVersions.delete",
    "ImportCryptoKeyVersion": "cloudkms.cryptoKeyVersions.create",
    "ImportTrustedKeyWrappedCryptoKeyVersion": "cloudkms.cryptoKeyVersions.trustedImportExport",
    "ExportTrustedKeyWrappedCryptoKeyVersion": "cloudkms.cryptoKeyVersions.trustedImportExport",
    "Encrypt": "cloudkms.cryptoKeyVersions.useToEncrypt",
    "Decrypt": "cloudkms.cryptoKeyVersions.useToDecrypt",
    "RawEncrypt": "cloudkms.cryptoKeyVersions.useToEncrypt",
    "RawDecrypt": "cloudkms.cryptoKeyVersions.useToDecrypt",
    "AsymmetricSign": "cloudkms.cryptoKeyVersions.useToSign",
    "AsymmetricDecrypt": "cloudkms.cryptoKeyVersions.useToDecrypt",
    "MacSign": "cloudkms.cryptoKeyVersions.useToSign",
    "MacVerify": "cloudkms.cryptoKeyVersions.useToVerify",
    "Decapsulate": "cloudkms.cryptoKeyVersions.useToDecapsulate",
    "GetPublicKey": "cloudkms.cryptoKeyVersions.viewPublicKey",
    "CreateImportJob": "cloudkms.importJobs.create",
    "GetImportJob": "cloudkms.importJobs.get",
    "ListImportJobs": "cloudkms.importJobs.list",
    "GetRetiredResource": "cloudkms.retiredResources.get",
    "ListRetiredResources": "cloudkms.retiredResources.list",
    "GenerateRandomBytes": "cloudkms.locations.generateRandomBytes",
    "ListLocations": "cloudkms.locations.list",
    "GetLocation": "cloudkms.locations.get",
    # By resource kind; see EXPECTED_IAM.
    "GetIamPolicy": "getIamPolicy",
    "SetIamPolicy": "setIamPolicy",
    "TestIamPermissions": None,
    # Valv has no long-running operations: UNIMPLEMENTED, no permission.
    "ListOperations": None,
    "GetOperation": None,
    "DeleteOperation": None,
    "CancelOperation": None,
    "WaitOperation": None,
    # By the request's purpose; see test_material_service.
    "FetchVersion": "useToEncrypt or useToDecrypt, by purpose",
    # Authenticated, no resource permission: Watch filters key events per principal
    # (test_watch_service), ReportUsage records under the caller's own name.
    "Watch": None,
    "ReportUsage": None,
}

LOC = "projects/p/locations/global"
RING = f"{LOC}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
VERSION = f"{KEY}/cryptoKeyVersions/2"

EXPECTED_IAM = {
    ("GetIamPolicy", RING): "cloudkms.keyRings.getIamPolicy",
    ("GetIamPolicy", KEY): "cloudkms.cryptoKeys.getIamPolicy",
    ("GetIamPolicy", f"{RING}/importJobs/j"): "cloudkms.importJobs.getIamPolicy",
    ("SetIamPolicy", RING): "cloudkms.keyRings.setIamPolicy",
    ("SetIamPolicy", KEY): "cloudkms.cryptoKeys.setIamPolicy",
    ("SetIamPolicy", f"{RING}/importJobs/j"): "cloudkms.importJobs.setIamPolicy",
}


def served_rpcs() -> set[str]:
    """Every method of every service central serves, from the generated service bases."""
    names = set()
    for base in (kms_pb.KeyManagementServiceBase, loc_pb.LocationsBase, iam_pb.IamPolicyBase,
                 OperationsBase, sidecar_pb.KeyMaterialBase):
        names |= {path.rsplit("/", 1)[-1] for path in base.__mapping__(base())}
    return names


def client_rpcs() -> set[str]:
    """Every RPC Google's client can call (its gRPC transport's method properties)."""
    non_rpc = {"grpc_channel", "operations_client", "kind"}
    return {"".join(part.capitalize() for part in name.split("_"))
            for name, value in vars(KeyManagementServiceGrpcTransport).items()
            if isinstance(value, property) and not name.startswith("_") and name not in non_rpc}


def test_every_rpc_has_the_expected_permission() -> None:
    rpcs = served_rpcs()
    assert len(rpcs) >= 45
    assert client_rpcs() - {"GetOperation"} <= rpcs
    assert set(permissions.RULES) == rpcs, sorted(set(permissions.RULES) ^ rpcs)
    assert set(EXPECTED) == rpcs, sorted(set(EXPECTED) ^ rpcs)
    for rpc, expected in EXPECTED.items():
        assert permissions.RULES[rpc].permission == expected, rpc


@pytest.mark.parametrize(("rpc", "resource"), sorted(EXPECTED_IAM))
def test_iam_methods_check_the_permission_of_the_resource_kind(rpc: str, resource: str) -> None:
    request = getattr(iam_pb, f"{rpc}Request")(resource=resource)
    check = required(rpc, request)
    assert check is not None and check.permission == EXPECTED_IAM[(rpc, resource)]


# The resource each RPC is checked on (its policies: that resource's and above).
WHERE: list[tuple[str, Any, str, Any]] = [
    ("CreateKeyRing", kms_pb.CreateKeyRingRequest(parent=LOC, key_ring_id="r"), LOC,
     parse_location(LOC)),
    ("ListKeyRings", kms_pb.ListKeyRingsRequest(parent=LOC), LOC, parse_location(LOC)),
    ("CreateCryptoKey", kms_pb.CreateCryptoKeyRequest(parent=RING), RING, parse_key_ring(RING)),
    ("UpdateCryptoKey", kms_pb.UpdateCryptoKeyRequest(crypto_key=kms_pb.CryptoKey(name=KEY)),
     KEY, parse_crypto_key(KEY)),
    ("UpdateCryptoKeyVersion", kms_pb.UpdateCryptoKeyVersionRequest(
        crypto_key_version=kms_pb.CryptoKeyVersion(name=VERSION)), VERSION,
     parse_crypto_key_version(VERSION)),
    ("Encrypt", kms_pb.EncryptRequest(name=KEY), KEY, parse_crypto_key(KEY)),
    ("Encrypt", kms_pb.EncryptRequest(name=VERSION), VERSION, parse_crypto_key_version(VERSION)),
    ("Decrypt", kms_pb.DecryptRequest(name=KEY), KEY, parse_crypto_key(KEY)),
    ("DestroyCryptoKeyVersion", kms_pb.DestroyCryptoKeyVersionRequest(name=VERSION), VERSION,
     parse_crypto_key_version(VERSION)),
    ("GenerateRandomBytes", kms_pb.GenerateRandomBytesRequest(location=LOC), LOC,
     parse_location(LOC)),
    ("ListLocations", loc_pb.ListLocationsRequest(name="projects/p"), "projects/p",
     parse_project("projects/p")),
    ("GetLocation", loc_pb.GetLocationRequest(name=LOC), LOC, parse_location(LOC)),
    ("GetImportJob", kms_pb.GetImportJobRequest(name=f"{RING}/importJobs/j"),
     f"{RING}/importJobs/j", parse_key_ring(RING)),
    ("GetRetiredResource", kms_pb.GetRetiredResourceRequest(name=f"{LOC}/retiredResources/x"),
     f"{LOC}/retiredResources/x", parse_location(LOC)),
]


@pytest.mark.parametrize(("rpc", "request_message", "name", "resource"), WHERE,
                         ids=[f"{w[0]}-{i}" for i, w in enumerate(WHERE)])
def test_the_resource_comes_from_the_right_field(rpc: str, request_message: Any, name: str,
                                                 resource: Any) -> None:
    assert required(rpc, request_message) == Check(EXPECTED[rpc] or "", name, resource)


def test_no_permission_needed() -> None:
    assert required("TestIamPermissions", iam_pb.TestIamPermissionsRequest(resource=KEY)) is None
    assert required("GetOperation", object()) is None
    assert required("Watch", sidecar_pb.WatchRequest(after_seq=7)) is None
    assert required("ReportUsage", sidecar_pb.ReportUsageRequest()) is None


def test_exactly_the_sidecar_service_is_for_sidecars_only() -> None:
    from valv.central.permissions import RULES, sidecar_only

    assert {rpc for rpc in RULES if sidecar_only(rpc)} == {
        "FetchVersion", "Watch", "ReportUsage"}
    assert not sidecar_only("Frobnicate")


def test_an_rpc_without_a_rule_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="no permission is defined for Frobnicate"):
        required("Frobnicate", kms_pb.EncryptRequest(name=KEY))


@pytest.mark.parametrize(("rpc", "request_message", "message"), [
    ("Encrypt", kms_pb.EncryptRequest(name="nonsense"), "name 'nonsense' is not a valid"),
    ("Encrypt", kms_pb.EncryptRequest(), "not a valid crypto key or crypto key version"),
    ("Decrypt", kms_pb.DecryptRequest(name=VERSION), "not a valid crypto key name"),
    ("CreateKeyRing", kms_pb.CreateKeyRingRequest(parent=RING), "parent"),
    ("UpdateCryptoKey", kms_pb.UpdateCryptoKeyRequest(), "crypto_key.name is required"),
    ("GetIamPolicy", iam_pb.GetIamPolicyRequest(resource=VERSION), "not a KeyRing or CryptoKey"),
    ("GetImportJob", kms_pb.GetImportJobRequest(name=KEY), "not a valid import job name"),
    ("GetRetiredResource", kms_pb.GetRetiredResourceRequest(name=RING),
     "not a valid retired resource name"),
])
def test_malformed_names_are_invalid_argument(rpc: str, request_message: Any,
                                              message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        required(rpc, request_message)


def test_operations_stay_unimplemented() -> None:
    """They need no permission only because they do nothing: keep it that way."""
    from valv.central.service import OperationsService

    for method in ("list_operations", "get_operation", "delete_operation", "cancel_operation",
                   "wait_operation"):
        assert method not in vars(OperationsService)
