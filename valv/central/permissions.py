"""Which permission each RPC needs, and on which resource: the one table.

Every method that central serves has a row here, keyed by its method name
(the call guard's ``CallContext.rpc``). The Authorizer (valv.central.authz)
looks the call up, reads the resource name from the request field the row
names, and checks the permission on it, with the policies of the KeyRing and
CryptoKey above it (valv.core.iam). An RPC without a row is refused, so a new
service or method must be added here before anyone but a dev-mode caller can
call it.

The permissions are those Cloud KMS documents in its REST reference
("Authorization requires the following IAM permission on the specified
resource ..."), e.g. https://cloud.google.com/kms/docs/reference/rest/v1/projects.locations.keyRings.cryptoKeys/encrypt.
Decisions where Valv had to choose:

- Encrypt accepts a CryptoKey or a CryptoKeyVersion name; either way the
  policies checked are the key's (IAM is set on keys and key rings, never on
  versions), and the message names the resource as requested.
- GetIamPolicy/SetIamPolicy need the KeyRing's or the CryptoKey's
  permission depending on the resource; TestIamPermissions needs none (it
  only reports the caller's own permissions).
- ImportCryptoKeyVersion checks cryptoKeyVersions.create on the key; Cloud
  KMS also checks importJobs.useToImport on the import job, which Valv will
  add when import jobs exist.
- valv.sidecar.v1.KeyMaterial (FetchVersion, Watch, ReportUsage) is for
  sidecars only: every method first needs Valv's own permission
  ``valv.sidecar.connect`` in the root policy (``roles/valv.sidecar``), so a
  key user who is not a sidecar can Encrypt and Decrypt but never fetch a
  KEK. FetchVersion also needs useToEncrypt/useToDecrypt (by purpose) on the
  key. Watch and ReportUsage need nothing more: Watch sends key events only
  to principals that may use the key (valv.central.watch filters them per
  event) and IAM, KeyRing and root-key events to every stream; ReportUsage
  records counts under the caller's own name only.
- google.longrunning.Operations: Valv has no long-running operations, so
  these need no permission and answer UNIMPLEMENTED; give them a permission
  before implementing them.
- A resource name that does not parse is INVALID_ARGUMENT, raised here
  before any handler code runs, with the handler's own message: it leaks
  nothing (the name is the caller's), and the handler never runs for a
  caller that was not checked.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from valv.core import iam
from valv.core.errors import InvalidArgument, PermissionDenied
from valv.core.iam import AnyName
from valv.core.names import (
    CryptoKeyName,
    KeyRingName,
    check_id,
    parse_crypto_key,
    parse_crypto_key_version,
    parse_key_or_version,
    parse_key_ring,
    parse_location,
    parse_project,
)


class Shape(enum.Enum):
    """What kind of resource name the request field holds."""

    PROJECT = "project"
    LOCATION = "location"
    KEY_RING = "key ring"
    CRYPTO_KEY = "crypto key"
    VERSION = "crypto key version"
    KEY_OR_VERSION = "crypto key or version"
    IMPORT_JOB = "import job"
    RETIRED_RESOURCE = "retired resource"
    POLICY_RESOURCE = "key ring or crypto key (IAM)"
    NONE = "no resource"


@dataclass(frozen=True, slots=True)
class Rule:
    """The permission an RPC needs on the resource named by ``field``.

    For IAM policy methods ``permission`` is a verb ("getIamPolicy") and the
    permission is that of the resource's kind (``permission_for``). None:
    no permission is needed.
    """

    permission: str | None
    field: str
    shape: Shape
    # For an RPC whose permission depends on the request (FetchVersion: on its
    # purpose): the permission, from the request. ``permission`` then only
    # describes the choice.
    choose: Callable[[Any], str] | None = None
    # Sidecars only: the caller must also hold iam.SIDECAR_CONNECT in the
    # root policy, checked before anything else.
    sidecar_only: bool = False

    def permission_for(self, kind: str) -> str | None:
        """The permission on a resource of ``kind`` ("keyRings", "cryptoKeys",
        "importJobs"; only IAM policy methods depend on it)."""
        if self.shape is not Shape.POLICY_RESOURCE or self.permission is None:
            return self.permission
        return f"cloudkms.{kind}.{self.permission}"

def _material_permission(request: Any) -> str:
    """valv.sidecar.v1 FetchVersion: the use permission of the purpose asked for."""
    purpose = int(getattr(request, "purpose", 0) or 0)
    if purpose == 1:  # Purpose.ENCRYPT
        return iam.USE_TO_ENCRYPT
    if purpose == 2:  # Purpose.DECRYPT
        return iam.USE_TO_DECRYPT
    raise InvalidArgument("purpose must be ENCRYPT or DECRYPT")


MATERIAL_PERMISSION = "useToEncrypt or useToDecrypt, by purpose"

RULES: dict[str, Rule] = {
    # ---- google.cloud.kms.v1.KeyManagementService
    "CreateKeyRing": Rule(iam.KEY_RINGS_CREATE, "parent", Shape.LOCATION),
    "GetKeyRing": Rule(iam.KEY_RINGS_GET, "name", Shape.KEY_RING),
    "ListKeyRings": Rule(iam.KEY_RINGS_LIST, "parent", Shape.LOCATION),
    "CreateCryptoKey": Rule(iam.CRYPTO_KEYS_CREATE, "parent", Shape.KEY_RING),
    "GetCryptoKey": Rule(iam.CRYPTO_KEYS_GET, "name", Shape.CRYPTO_KEY),
    "ListCryptoKeys": Rule(iam.CRYPTO_KEYS_LIST, "parent", Shape.KEY_RING),
    "UpdateCryptoKey": Rule(iam.CRYPTO_KEYS_UPDATE, "crypto_key.name", Shape.CRYPTO_KEY),
    "UpdateCryptoKeyPrimaryVersion": Rule(iam.CRYPTO_KEYS_UPDATE, "name", Shape.CRYPTO_KEY),
    "DeleteCryptoKey": Rule(iam.CRYPTO_KEYS_DELETE, "name", Shape.CRYPTO_KEY),
    "CreateCryptoKeyVersion": Rule(iam.VERSIONS_CREATE, "parent", Shape.CRYPTO_KEY),
    "GetCryptoKeyVersion": Rule(iam.VERSIONS_GET, "name", Shape.VERSION),
    "ListCryptoKeyVersions": Rule(iam.VERSIONS_LIST, "parent", Shape.CRYPTO_KEY),
    "UpdateCryptoKeyVersion": Rule(iam.VERSIONS_UPDATE, "crypto_key_version.name",
                                   Shape.VERSION),
    "DestroyCryptoKeyVersion": Rule(iam.VERSIONS_DESTROY, "name", Shape.VERSION),
    "RestoreCryptoKeyVersion": Rule(iam.VERSIONS_RESTORE, "name", Shape.VERSION),
    "DeleteCryptoKeyVersion": Rule(iam.VERSIONS_DELETE, "name", Shape.VERSION),
    "ImportCryptoKeyVersion": Rule(iam.VERSIONS_CREATE, "parent", Shape.CRYPTO_KEY),
    "ImportTrustedKeyWrappedCryptoKeyVersion": Rule(iam.VERSIONS_TRUSTED_IMPORT_EXPORT,
                                                    "parent", Shape.CRYPTO_KEY),
    "ExportTrustedKeyWrappedCryptoKeyVersion": Rule(iam.VERSIONS_TRUSTED_IMPORT_EXPORT,
                                                    "name", Shape.VERSION),
    "Encrypt": Rule(iam.USE_TO_ENCRYPT, "name", Shape.KEY_OR_VERSION),
    "Decrypt": Rule(iam.USE_TO_DECRYPT, "name", Shape.CRYPTO_KEY),
    "RawEncrypt": Rule(iam.USE_TO_ENCRYPT, "name", Shape.VERSION),
    "RawDecrypt": Rule(iam.USE_TO_DECRYPT, "name", Shape.VERSION),
    "AsymmetricSign": Rule(iam.USE_TO_SIGN, "name", Shape.VERSION),
    "AsymmetricDecrypt": Rule(iam.USE_TO_DECRYPT, "name", Shape.VERSION),
    "MacSign": Rule(iam.USE_TO_SIGN, "name", Shape.VERSION),
    "MacVerify": Rule(iam.USE_TO_VERIFY, "name", Shape.VERSION),
    "Decapsulate": Rule(iam.USE_TO_DECAPSULATE, "name", Shape.VERSION),
    "GetPublicKey": Rule(iam.VIEW_PUBLIC_KEY, "name", Shape.VERSION),
    "CreateImportJob": Rule(iam.IMPORT_JOBS_CREATE, "parent", Shape.KEY_RING),
    "GetImportJob": Rule(iam.IMPORT_JOBS_GET, "name", Shape.IMPORT_JOB),
    "ListImportJobs": Rule(iam.IMPORT_JOBS_LIST, "parent", Shape.KEY_RING),
    "GetRetiredResource": Rule(iam.RETIRED_RESOURCES_GET, "name", Shape.RETIRED_RESOURCE),
    "ListRetiredResources": Rule(iam.RETIRED_RESOURCES_LIST, "parent", Shape.LOCATION),
    "GenerateRandomBytes": Rule(iam.LOCATIONS_GENERATE_RANDOM_BYTES, "location",
                                Shape.LOCATION),
    # ---- google.cloud.location.Locations
    "ListLocations": Rule(iam.LOCATIONS_LIST, "name", Shape.PROJECT),
    "GetLocation": Rule(iam.LOCATIONS_GET, "name", Shape.LOCATION),
    # ---- google.iam.v1.IAMPolicy
    "GetIamPolicy": Rule("getIamPolicy", "resource", Shape.POLICY_RESOURCE),
    "SetIamPolicy": Rule("setIamPolicy", "resource", Shape.POLICY_RESOURCE),
    "TestIamPermissions": Rule(None, "resource", Shape.NONE),
    # ---- google.longrunning.Operations (not implemented: UNIMPLEMENTED)
    "ListOperations": Rule(None, "name", Shape.NONE),
    "GetOperation": Rule(None, "name", Shape.NONE),
    "DeleteOperation": Rule(None, "name", Shape.NONE),
    "CancelOperation": Rule(None, "name", Shape.NONE),
    "WaitOperation": Rule(None, "name", Shape.NONE),
    # ---- valv.sidecar.v1.KeyMaterial (sidecars only: DESIGN.md §5)
    "FetchVersion": Rule(MATERIAL_PERMISSION, "crypto_key", Shape.CRYPTO_KEY,
                         choose=_material_permission, sidecar_only=True),
    "Watch": Rule(None, "after_seq", Shape.NONE, sidecar_only=True),
    "ReportUsage": Rule(None, "counts", Shape.NONE, sidecar_only=True),
}


def sidecar_only(rpc: str) -> bool:
    """Whether ``rpc`` is for sidecar identities only (see the module's notes)."""
    rule = RULES.get(rpc)
    return rule is not None and rule.sidecar_only


@dataclass(frozen=True, slots=True)
class Check:
    """What one call needs: ``permission`` on the resource ``name`` (as the
    request spells it), evaluated with the root policy and the policies of
    ``iam.policy_chain(resource)``."""

    permission: str
    name: str
    resource: AnyName


def required(rpc: str, request: Any) -> Check | None:
    """The check ``request`` to ``rpc`` needs; None if it needs no permission.

    Raises PermissionDenied for an RPC without a rule, InvalidArgument for a
    resource name that does not parse.
    """
    rule = RULES.get(rpc)
    if rule is None:
        raise PermissionDenied(f"no permission is defined for {rpc}; refusing the call")
    if rule.permission is None:
        return None
    value = _field(request, rule.field)
    resource = _parse(value, rule.shape, rule.field)
    if rule.choose is not None:
        return Check(rule.choose(request), value, resource)
    permission = rule.permission_for(_kind(value, resource))
    assert permission is not None
    return Check(permission, value, resource)


def _kind(value: str, resource: AnyName) -> str:
    if isinstance(resource, CryptoKeyName):
        return "cryptoKeys"
    if "/importJobs/" in value:
        return "importJobs"
    return "keyRings"


def _field(request: Any, path: str) -> str:
    value: Any = request
    for part in path.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, str) else ""


def _parse(value: str, shape: Shape, field: str) -> AnyName:
    if shape is Shape.PROJECT:
        return parse_project(value, field)
    if shape is Shape.LOCATION:
        return parse_location(value, field)
    if shape is Shape.KEY_RING:
        return parse_key_ring(value, field)
    if shape is Shape.CRYPTO_KEY:
        return parse_crypto_key(value, field)
    if shape is Shape.VERSION:
        return parse_crypto_key_version(value, field)
    if shape is Shape.KEY_OR_VERSION:
        return parse_key_or_version(value, field)
    if shape is Shape.POLICY_RESOURCE:
        parts = value.split("/") if isinstance(value, str) else []
        if len(parts) == 8 and parts[6] == "importJobs":
            return _import_job_ring(value, field)
        return iam.parse_policy_resource(value, field)
    if shape is Shape.IMPORT_JOB:
        return _import_job_ring(value, field)
    if shape is Shape.RETIRED_RESOURCE:
        parts = value.split("/")
        if len(parts) == 6 and parts[4] == "retiredResources":
            location = parse_location("/".join(parts[:4]), field)
            check_id(parts[5], f"{field} retired resource id")
            return location
        raise InvalidArgument(
            f"{field} {value!r} is not a valid retired resource name: expected "
            "projects/{project}/locations/{location}/retiredResources/{retired_resource}")
    raise AssertionError(f"no parser for {shape}")


def _import_job_ring(value: str, field: str) -> KeyRingName:
    """An import job's policies are its KeyRing's (Valv has no import jobs yet)."""
    parts = value.split("/")
    if len(parts) == 8 and parts[6] == "importJobs":
        ring = parse_key_ring("/".join(parts[:6]), field)
        check_id(parts[7], f"{field} import job id")
        return ring
    raise InvalidArgument(
        f"{field} {value!r} is not a valid import job name: expected "
        "projects/{project}/locations/{location}/keyRings/{key_ring}/importJobs/{import_job}")
