"""IAM: roles, policies, where they are stored, and how they are evaluated.

Valv authorizes callers the way Cloud KMS does (see docs/security.md):

- A **policy** binds roles to members. Policies are set on KeyRings and
  CryptoKeys (SetIamPolicy) and inherit downwards: the root policy (the
  server's ``--root-policy-file``) applies to everything, a KeyRing's policy
  to the ring and every key in it, a CryptoKey's to the key and its versions.
  A permission is granted if any policy on the path grants it to the caller.
- A **role** is a named set of permissions: Cloud KMS's predefined roles and
  the basic roles, restricted to the permissions Valv checks (ROLES below).
  There are no custom roles and no conditions.
- **Members** are matched literally (``user:alice@example.com``), except
  ``domain:example.com``, which matches user and service-account emails in
  that domain, and ``allAuthenticatedUsers``, which matches every
  authenticated caller. Valv knows no group membership: a ``group:`` member
  matches only a caller whose own identity is that group.

Storage: one sealed ``valv.iam.v1.PolicyRecord`` per resource that has had a
policy set, at ``("iam", project, location, ring)`` or ``("iam", project,
location, ring, key)``. The etag is derived from the resource name, the
record's write counter and its bindings, so it changes on every write and a
stale read-modify-write is refused (ABORTED).

Evaluation is on the hot path (every Encrypt and Decrypt), so compiled
policies are cached for a short TTL. A policy set through this process
invalidates its entry when the write finishes; one set through another
central sharing the store reaches this one through the change log
(valv.core.changelog) within its poll interval, and within the TTL at worst.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from cachetools import TTLCache

from valv._proto.valv.iam import v1 as pb
from valv.core import changelog, records
from valv.core.clock import Clock, to_micros
from valv.core.errors import Aborted, DataLoss, InvalidArgument, NotFound
from valv.core.keystore import KeyStore
from valv.core.material import SIDECAR_PERMISSION
from valv.core.names import (
    CryptoKeyName,
    CryptoKeyVersionName,
    KeyRingName,
    LocationName,
    ProjectName,
    is_valid_id,
    parse_crypto_key,
    parse_key_ring,
)
from valv.core.storage.base import Transaction
from valv.core.storage.keys import describe, pack

# ---- permissions --------------------------------------------------------------
#
# The permissions Valv checks, named as Cloud KMS names them. Which RPC needs
# which permission is in valv.central.permissions.

KEY_RINGS_CREATE = "cloudkms.keyRings.create"
KEY_RINGS_GET = "cloudkms.keyRings.get"
KEY_RINGS_LIST = "cloudkms.keyRings.list"
KEY_RINGS_GET_IAM_POLICY = "cloudkms.keyRings.getIamPolicy"
KEY_RINGS_SET_IAM_POLICY = "cloudkms.keyRings.setIamPolicy"
CRYPTO_KEYS_CREATE = "cloudkms.cryptoKeys.create"
CRYPTO_KEYS_GET = "cloudkms.cryptoKeys.get"
CRYPTO_KEYS_LIST = "cloudkms.cryptoKeys.list"
CRYPTO_KEYS_UPDATE = "cloudkms.cryptoKeys.update"
CRYPTO_KEYS_DELETE = "cloudkms.cryptoKeys.delete"
CRYPTO_KEYS_GET_IAM_POLICY = "cloudkms.cryptoKeys.getIamPolicy"
CRYPTO_KEYS_SET_IAM_POLICY = "cloudkms.cryptoKeys.setIamPolicy"
VERSIONS_CREATE = "cloudkms.cryptoKeyVersions.create"
VERSIONS_GET = "cloudkms.cryptoKeyVersions.get"
VERSIONS_LIST = "cloudkms.cryptoKeyVersions.list"
VERSIONS_UPDATE = "cloudkms.cryptoKeyVersions.update"
VERSIONS_DESTROY = "cloudkms.cryptoKeyVersions.destroy"
VERSIONS_RESTORE = "cloudkms.cryptoKeyVersions.restore"
VERSIONS_DELETE = "cloudkms.cryptoKeyVersions.delete"
VERSIONS_TRUSTED_IMPORT_EXPORT = "cloudkms.cryptoKeyVersions.trustedImportExport"
USE_TO_ENCRYPT = "cloudkms.cryptoKeyVersions.useToEncrypt"
USE_TO_DECRYPT = "cloudkms.cryptoKeyVersions.useToDecrypt"
USE_TO_SIGN = "cloudkms.cryptoKeyVersions.useToSign"
USE_TO_VERIFY = "cloudkms.cryptoKeyVersions.useToVerify"
USE_TO_DECAPSULATE = "cloudkms.cryptoKeyVersions.useToDecapsulate"
VIEW_PUBLIC_KEY = "cloudkms.cryptoKeyVersions.viewPublicKey"
IMPORT_JOBS_CREATE = "cloudkms.importJobs.create"
IMPORT_JOBS_GET = "cloudkms.importJobs.get"
IMPORT_JOBS_LIST = "cloudkms.importJobs.list"
IMPORT_JOBS_USE_TO_IMPORT = "cloudkms.importJobs.useToImport"
IMPORT_JOBS_GET_IAM_POLICY = "cloudkms.importJobs.getIamPolicy"
IMPORT_JOBS_SET_IAM_POLICY = "cloudkms.importJobs.setIamPolicy"
LOCATIONS_GET = "cloudkms.locations.get"
LOCATIONS_LIST = "cloudkms.locations.list"
LOCATIONS_GENERATE_RANDOM_BYTES = "cloudkms.locations.generateRandomBytes"
RETIRED_RESOURCES_GET = "cloudkms.retiredResources.get"
RETIRED_RESOURCES_LIST = "cloudkms.retiredResources.list"

# Valv's own permission (not Cloud KMS's): may act as a sidecar, i.e. call
# central's private valv.sidecar.v1.KeyMaterial service, which hands out
# unwrapped KEK material (for keys the caller may also use), streams changes
# and takes usage reports. Granted only by roles/valv.sidecar in the root
# policy: a key user who is not a sidecar gets Encrypt/Decrypt, never a KEK.
SIDECAR_CONNECT = SIDECAR_PERMISSION
SIDECAR_ROLE = "roles/valv.sidecar"

# ---- roles --------------------------------------------------------------------
#
# Source: "Cloud Key Management Service roles and permissions",
# https://cloud.google.com/iam/docs/roles-permissions/cloudkms (and, for the
# basic roles, https://cloud.google.com/iam/docs/roles-overview#basic).
# Each role keeps only the permissions Valv knows (above); permissions of
# features Valv lacks (EKM, Autokey, tags, "ViaDelegation", and
# resourcemanager.projects.get) are left out.

_LOCATIONS = frozenset({LOCATIONS_GET, LOCATIONS_LIST})

_KMS_VIEWER = _LOCATIONS | {
    KEY_RINGS_GET, KEY_RINGS_LIST, CRYPTO_KEYS_GET, CRYPTO_KEYS_LIST, VERSIONS_GET,
    VERSIONS_LIST, IMPORT_JOBS_GET, IMPORT_JOBS_LIST, RETIRED_RESOURCES_GET,
    RETIRED_RESOURCES_LIST,
}

# Separation of duties: the admin manages keys and their policies but cannot
# use them (no useTo* permission), as in Cloud KMS.
_KMS_ADMIN = _KMS_VIEWER | {
    KEY_RINGS_CREATE, KEY_RINGS_GET_IAM_POLICY, KEY_RINGS_SET_IAM_POLICY,
    CRYPTO_KEYS_CREATE, CRYPTO_KEYS_UPDATE, CRYPTO_KEYS_DELETE, CRYPTO_KEYS_GET_IAM_POLICY,
    CRYPTO_KEYS_SET_IAM_POLICY, VERSIONS_CREATE, VERSIONS_UPDATE, VERSIONS_DESTROY,
    VERSIONS_RESTORE, VERSIONS_DELETE, VERSIONS_TRUSTED_IMPORT_EXPORT, IMPORT_JOBS_CREATE,
    IMPORT_JOBS_USE_TO_IMPORT, IMPORT_JOBS_GET_IAM_POLICY, IMPORT_JOBS_SET_IAM_POLICY,
}

_GET_IAM_POLICY = frozenset({KEY_RINGS_GET_IAM_POLICY, CRYPTO_KEYS_GET_IAM_POLICY,
                             IMPORT_JOBS_GET_IAM_POLICY})

# roles/editor: create and update, but neither destroy/restore, nor use, nor
# setIamPolicy.
_EDITOR = _KMS_VIEWER | _GET_IAM_POLICY | {
    KEY_RINGS_CREATE, CRYPTO_KEYS_CREATE, CRYPTO_KEYS_UPDATE, VERSIONS_CREATE,
    VERSIONS_UPDATE, IMPORT_JOBS_CREATE, IMPORT_JOBS_USE_TO_IMPORT,
    LOCATIONS_GENERATE_RANDOM_BYTES,
}

ALL_PERMISSIONS: frozenset[str] = frozenset(
    value for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, str) and value.startswith("cloudkms.")
)

ROLES: Mapping[str, frozenset[str]] = {
    "roles/cloudkms.admin": frozenset(_KMS_ADMIN),
    "roles/cloudkms.viewer": frozenset(_KMS_VIEWER),
    "roles/cloudkms.cryptoKeyEncrypterDecrypter":
        _LOCATIONS | {USE_TO_ENCRYPT, USE_TO_DECRYPT},
    "roles/cloudkms.cryptoKeyEncrypter": _LOCATIONS | {USE_TO_ENCRYPT},
    "roles/cloudkms.cryptoKeyDecrypter": _LOCATIONS | {USE_TO_DECRYPT},
    "roles/cloudkms.publicKeyViewer": _LOCATIONS | {VIEW_PUBLIC_KEY},
    "roles/cloudkms.signer": _LOCATIONS | {USE_TO_SIGN},
    "roles/cloudkms.signerVerifier": _LOCATIONS | {USE_TO_SIGN, USE_TO_VERIFY, VIEW_PUBLIC_KEY},
    "roles/cloudkms.verifier": _LOCATIONS | {USE_TO_VERIFY, VIEW_PUBLIC_KEY},
    "roles/cloudkms.importer": _LOCATIONS | {
        IMPORT_JOBS_CREATE, IMPORT_JOBS_GET, IMPORT_JOBS_LIST, IMPORT_JOBS_USE_TO_IMPORT},
    "roles/cloudkms.cryptoOperator": _LOCATIONS | {
        USE_TO_ENCRYPT, USE_TO_DECRYPT, USE_TO_SIGN, USE_TO_VERIFY, USE_TO_DECAPSULATE,
        VIEW_PUBLIC_KEY, LOCATIONS_GENERATE_RANDOM_BYTES},
    # Basic roles. Unlike cloudkms.admin, roles/owner can also use keys.
    "roles/viewer": frozenset(_KMS_VIEWER | _GET_IAM_POLICY),
    "roles/editor": frozenset(_EDITOR),
    "roles/owner": ALL_PERMISSIONS,
    # Valv's own; root policy only (ROOT_ONLY_ROLES). roles/owner does not
    # include it: being a sidecar is always granted on purpose.
    SIDECAR_ROLE: frozenset({SIDECAR_CONNECT}),
}

# Roles that mean something only deployment-wide: bound in the root policy
# file, refused in a KeyRing's or CryptoKey's policy.
ROOT_ONLY_ROLES = frozenset({SIDECAR_ROLE})

# ---- members ------------------------------------------------------------------

ALL_AUTHENTICATED_USERS = "allAuthenticatedUsers"
_IDENTITY_KINDS = ("user", "serviceAccount", "group")
# An identity: printable, no whitespace; emails and Kubernetes service-account
# names ("system:serviceaccount:ns:name") both fit.
_IDENTITY = re.compile(r"[\x21-\x7e]{1,512}")
_DOMAIN = re.compile(r"(?=.{1,253}$)([A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                     r"[A-Za-z]{2,63}")
# A plain email address (one "@", no ":" or "/"), the only kind of identity a
# domain: binding matches.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@" + _DOMAIN.pattern)


def check_member(member: str) -> str:
    """``member`` if it is a member Valv can match, else InvalidArgument naming it."""
    if member == ALL_AUTHENTICATED_USERS:
        return member
    if member == "allUsers":
        raise InvalidArgument(
            "member allUsers is not supported: Valv has no unauthenticated callers; "
            "use allAuthenticatedUsers to grant a role to every authenticated caller")
    kind, sep, value = member.partition(":")
    if sep and kind in _IDENTITY_KINDS and _IDENTITY.fullmatch(value):
        return member
    if sep and kind == "domain" and _DOMAIN.fullmatch(value):
        return "domain:" + value.lower()
    raise InvalidArgument(
        f"member {member!r} is invalid: use user:EMAIL, serviceAccount:EMAIL, group:EMAIL, "
        "domain:DOMAIN or allAuthenticatedUsers")


def member_keys(member: str) -> tuple[str, ...]:
    """The binding members that match a caller whose identity is ``member``."""
    keys = [member, ALL_AUTHENTICATED_USERS]
    kind, _, value = member.partition(":")
    # Only a plain email address belongs to a domain: a JWT subject or a SPIFFE
    # id that merely ends in "@corp.com" (e.g. a branch name) must not match.
    if kind in ("user", "serviceAccount") and _EMAIL.fullmatch(value):
        keys.append("domain:" + value.rpartition("@")[2].lower())
    return tuple(keys)


# ---- policies -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binding:
    role: str
    members: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Policy:
    """A resource's policy as the IAM API shows it (always version 1)."""

    bindings: tuple[Binding, ...] = ()
    etag: bytes = b""


@dataclass(frozen=True, slots=True)
class BindingInput:
    """One binding of a SetIamPolicy request (or of the root policy file)."""

    role: str
    members: Sequence[str]
    has_condition: bool = False


MAX_MEMBERS = 1500  # Cloud IAM's limit on members in one policy
MAX_POLICY_BYTES = 64 * 1024


def check_policy(bindings: Iterable[BindingInput], *, version: int = 1,
                 has_audit_configs: bool = False, root: bool = False) -> tuple[Binding, ...]:
    """Validate and normalize a policy's bindings (``root``: the root policy's).

    Bindings with the same role are merged, duplicate members dropped and
    bindings without members removed; first-seen order is kept.
    """
    if has_audit_configs:
        raise InvalidArgument("audit_configs are not supported on Cloud KMS resources")
    bindings = list(bindings)
    for binding in bindings:
        if binding.has_condition:
            raise InvalidArgument(
                "conditions are not supported: Valv does not implement IAM conditions; "
                f"remove the condition from the binding of {binding.role!r}")
    if version == 3:
        raise InvalidArgument(
            "policy version 3 is for conditions, and conditions are not supported; "
            "use version 1")
    if version not in (0, 1):
        raise InvalidArgument(f"policy version {version} is invalid; use version 1")
    merged: dict[str, dict[str, None]] = {}
    for binding in bindings:
        if binding.role not in ROLES:
            raise InvalidArgument(
                f"role {binding.role!r} is not supported; Valv supports "
                + ", ".join(sorted(ROLES)))
        if binding.role in ROOT_ONLY_ROLES and not root and binding.members:
            raise InvalidArgument(
                f"role {binding.role!r} can only be granted in the root policy "
                "(central's --root-policy-file), not on a KeyRing or CryptoKey")
        if binding.role == SIDECAR_ROLE:
            broad = [m for m in binding.members
                     if m == ALL_AUTHENTICATED_USERS or m.startswith("domain:")]
            if broad:
                raise InvalidArgument(
                    f"role {SIDECAR_ROLE!r} hands out unwrapped keys: grant it to the "
                    f"identities your sidecars run as, one by one, not to {broad[0]!r}")
        members = merged.setdefault(binding.role, {})
        for member in binding.members:
            members[check_member(member)] = None
    result = tuple(Binding(role, tuple(members)) for role, members in merged.items() if members)
    if sum(len(b.members) for b in result) > MAX_MEMBERS:
        raise InvalidArgument(f"a policy may have at most {MAX_MEMBERS} members")
    if len(_encode(result, 0, 0)) > MAX_POLICY_BYTES:
        raise InvalidArgument(f"the policy is larger than {MAX_POLICY_BYTES // 1024} KiB")
    return result


def load_root_policy(path: Path) -> Policy:
    """The root policy from its JSON file, or InvalidArgument saying what is wrong.

    The file holds a Policy in its JSON form::

        {"bindings": [{"role": "roles/cloudkms.admin", "members": ["user:alice"]}]}
    """
    where = f"root policy file {str(path)!r}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidArgument(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{where}: not valid JSON: {exc}") from None
    try:
        return Policy(_root_bindings(data))
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None


def _root_bindings(data: Any) -> tuple[Binding, ...]:
    if not isinstance(data, dict):
        raise InvalidArgument('expected a JSON object like {"bindings": [...]}')
    unknown = set(data) - {"bindings", "version", "etag"}
    if "auditConfigs" in unknown or "audit_configs" in unknown:
        raise InvalidArgument("audit_configs are not supported")
    if unknown:
        raise InvalidArgument(f"unknown field(s): {', '.join(sorted(unknown))}")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidArgument("version must be an integer")
    raw = data.get("bindings", [])
    if not isinstance(raw, list):
        raise InvalidArgument("bindings must be a list")
    bindings: list[BindingInput] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidArgument(f"bindings[{i}] must be an object with role and members")
        extra = set(item) - {"role", "members", "condition"}
        if extra:
            raise InvalidArgument(f"bindings[{i}]: unknown field(s): {', '.join(sorted(extra))}")
        role, members = item.get("role"), item.get("members", [])
        if not isinstance(role, str):
            raise InvalidArgument(f"bindings[{i}].role must be a string")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise InvalidArgument(f"bindings[{i}].members must be a list of strings")
        bindings.append(BindingInput(role, members, has_condition=item.get("condition")
                                     is not None))
    return check_policy(bindings, version=version, root=True)


# ---- resources and storage ----------------------------------------------------

PolicyResource: TypeAlias = KeyRingName | CryptoKeyName
AnyName: TypeAlias = (ProjectName | LocationName | KeyRingName | CryptoKeyName
                      | CryptoKeyVersionName)


def parse_policy_resource(name: str, field: str = "resource") -> PolicyResource:
    """The KeyRing or CryptoKey an IAM policy request names.

    An import job (which Valv doesn't have yet) is NOT_FOUND; any other name is
    INVALID_ARGUMENT.
    """
    if isinstance(name, str):
        parts = name.split("/")
        if len(parts) == 6:
            return parse_key_ring(name, field)
        if len(parts) == 8 and parts[6] == "cryptoKeys":
            return parse_crypto_key(name, field)
        if (len(parts) == 8 and parts[6] == "importJobs" and is_valid_id(parts[7])
                and parts[4] == "keyRings"):
            ring = parse_key_ring("/".join(parts[:6]), field)
            raise NotFound(f"ImportJob {ring}/importJobs/{parts[7]} not found")
    raise InvalidArgument(
        f"{field} {name!r} is not a KeyRing or CryptoKey name: IAM policies are set on "
        "projects/{project}/locations/{location}/keyRings/{key_ring} and "
        ".../cryptoKeys/{crypto_key}")


def policy_chain(name: AnyName) -> tuple[PolicyResource, ...]:
    """The resources whose policies apply to ``name``, below the root policy."""
    if isinstance(name, CryptoKeyVersionName):
        name = name.parent
    if isinstance(name, CryptoKeyName):
        return (name.parent, name)
    if isinstance(name, KeyRingName):
        return (name,)
    return ()


def policy_key(resource: PolicyResource) -> bytes:
    if isinstance(resource, CryptoKeyName):
        return pack("iam", resource.project, resource.location, resource.key_ring,
                    resource.crypto_key)
    return pack("iam", resource.project, resource.location, resource.key_ring)


SCHEMA_VERSION = 1
_ETAG_VERSION = b"\x01"


def _encode(bindings: tuple[Binding, ...], generation: int, update_us: int) -> bytes:
    return bytes(pb.PolicyRecord(
        schema_version=SCHEMA_VERSION, generation=generation, update_time_us=update_us,
        bindings=[pb.BindingRecord(role=b.role, members=list(b.members)) for b in bindings]))


def _decode(key: bytes, value: bytes) -> tuple[tuple[Binding, ...], int]:
    try:
        record = pb.PolicyRecord.parse(value)
    except Exception as exc:  # betterproto raises assorted errors on bad bytes
        raise DataLoss(f"record {describe(key)} could not be decoded: {exc}") from None
    if record.schema_version > SCHEMA_VERSION:
        raise DataLoss(
            f"record {describe(key)} has schema version {record.schema_version}, newer than "
            f"this Valv understands ({SCHEMA_VERSION}); upgrade Valv")
    bindings = tuple(Binding(b.role, tuple(b.members)) for b in record.bindings)
    return bindings, int(record.generation)


def compute_etag(resource: PolicyResource, generation: int,
                 bindings: tuple[Binding, ...]) -> bytes:
    """Opaque; changes whenever the policy is written (``generation`` counts writes)."""
    digest = hashlib.sha256()
    digest.update(b"valv/iam/etag/v1\x00" + str(resource).encode() + b"\x00")
    digest.update(generation.to_bytes(8, "big"))
    for binding in bindings:
        digest.update(b"\x00r" + binding.role.encode())
        for member in binding.members:
            digest.update(b"\x00m" + member.encode())
    return _ETAG_VERSION + digest.digest()[:11]


def _check_exists(tr: Transaction, resource: PolicyResource) -> None:
    if isinstance(resource, CryptoKeyName):
        if tr.get(records.crypto_key_key(resource)) is None:
            raise NotFound(f"CryptoKey {resource} not found")
    elif tr.get(records.key_ring_key(resource)) is None:
        raise NotFound(f"KeyRing {resource} not found")


def _read(tr: Transaction, resource: PolicyResource) -> tuple[tuple[Binding, ...], int]:
    key = policy_key(resource)
    value = tr.get(key)
    return ((), 0) if value is None else _decode(key, value)


# ---- evaluation ---------------------------------------------------------------


class CompiledPolicy:
    """A policy as evaluation needs it: for each member, the permissions granted."""

    __slots__ = ("grants",)

    def __init__(self, bindings: Iterable[Binding]) -> None:
        grants: dict[str, set[str]] = {}
        for binding in bindings:
            permissions = ROLES.get(binding.role, frozenset())
            for member in binding.members:
                grants.setdefault(member, set()).update(permissions)
        self.grants: dict[str, frozenset[str]] = {m: frozenset(p) for m, p in grants.items()}

    def permissions_of(self, keys: Iterable[str]) -> frozenset[str]:
        granted: frozenset[str] = frozenset()
        for key in keys:
            granted = granted | self.grants.get(key, _NOTHING)
        return granted

    def grants_permission(self, keys: Iterable[str], permission: str) -> bool:
        grants = self.grants
        return any(permission in grants.get(key, _NOTHING) for key in keys)


_NOTHING: frozenset[str] = frozenset()


_NO_POLICY = CompiledPolicy(())


class PolicyCache:
    """Compiled policies by resource name, for a short TTL.

    As valv.core.usecache: a load that raced with an invalidation of the same
    resource is never cached (``begin_load`` hands out a ticket; ``put``
    drops a result older than the resource's last invalidation).
    """

    def __init__(self, ttl_s: float, maxsize: int = 10_000,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.enabled = ttl_s > 0
        self._lock = threading.Lock()
        self._entries: TTLCache[str, CompiledPolicy] = TTLCache(maxsize, max(ttl_s, 1e-9),
                                                                timer=timer)
        self._max_invalidations = maxsize
        self._counter = 0
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        self._forgotten = 0

    def get(self, resource: str) -> CompiledPolicy | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._entries.get(resource)

    def begin_load(self) -> int:
        with self._lock:
            return self._counter

    def put(self, resource: str, ticket: int, policy: CompiledPolicy) -> None:
        if not self.enabled:
            return
        with self._lock:
            if ticket < self._forgotten or self._invalidated.get(resource, -1) > ticket:
                return  # possibly older than a change to this policy
            self._entries[resource] = policy

    def invalidate(self, resource: str) -> None:
        with self._lock:
            self._counter += 1
            self._invalidated[resource] = self._counter
            self._invalidated.move_to_end(resource)
            while len(self._invalidated) > self._max_invalidations:
                _, dropped = self._invalidated.popitem(last=False)
                self._forgotten = max(self._forgotten, dropped)
            self._entries.pop(resource, None)

    def clear(self) -> None:
        """Drop every entry, and refuse loads that began before now."""
        with self._lock:
            self._counter += 1
            self._forgotten = self._counter
            self._entries.clear()


class IamPolicies:
    """Policies of KeyRings and CryptoKeys: the IAM mixin's storage, and evaluation."""

    def __init__(self, keystore: KeyStore, clock: Clock, *, root: Policy | None = None,
                 cache_ttl_s: float = 1.0) -> None:
        self._keystore = keystore
        # Reads go straight to the store; writes go through KeyStore._change,
        # the one path for changes (it runs the audit hook in the same
        # transaction).
        self._store = keystore._store
        self._clock = clock
        self.root = root or Policy()
        self._root = CompiledPolicy(self.root.bindings)
        self._cache = PolicyCache(cache_ttl_s)

    # ---- the IAMPolicy mixin ---------------------------------------------------

    async def get_policy(self, name: str) -> Policy:
        resource = parse_policy_resource(name)

        def body(tr: Transaction) -> Policy:
            _check_exists(tr, resource)
            bindings, generation = _read(tr, resource)
            return Policy(bindings, compute_etag(resource, generation, bindings))

        return await self._store.run(body, read_only=True)

    async def set_policy(self, name: str, bindings: Iterable[BindingInput], *, etag: bytes,
                         version: int = 1, has_audit_configs: bool = False,
                         update_mask: Sequence[str] = ()) -> Policy:
        """SetIamPolicy. ``update_mask`` may name "bindings" and "etag" (default: both).

        A non-empty ``etag`` (when "etag" is in the mask) must match the current
        policy's, else ABORTED; an empty one writes unconditionally.
        """
        resource = parse_policy_resource(name)
        paths = set(update_mask) or {"bindings", "etag"}
        unknown = paths - {"bindings", "etag"}
        if unknown:
            raise InvalidArgument(
                f"update_mask path(s) {', '.join(sorted(unknown))} are not supported; "
                "use bindings and/or etag")
        new_bindings = check_policy(bindings, version=version,
                                    has_audit_configs=has_audit_configs)
        check_etag = "etag" in paths and bool(etag)
        now_us = to_micros(self._clock.now())

        def body(tr: Transaction) -> Policy:
            _check_exists(tr, resource)
            current, generation = _read(tr, resource)
            if check_etag and etag != compute_etag(resource, generation, current):
                raise Aborted(
                    f"the policy of {resource} changed since it was read (etag mismatch); "
                    "read it again with GetIamPolicy, reapply your change and retry")
            written = new_bindings if "bindings" in paths else current
            tr.set(policy_key(resource), _encode(written, generation + 1, now_us))
            return Policy(written, compute_etag(resource, generation + 1, written))

        # Drop the cached policy once the transaction has finished, even if
        # this call is cancelled meanwhile (it may still commit).
        operation = asyncio.ensure_future(self._keystore._change(
            None, body, lambda _: [(changelog.IAM, str(resource))]))
        operation.add_done_callback(lambda _: self._cache.invalidate(str(resource)))
        return await asyncio.shield(operation)

    # ---- the change log's listener (valv.core.changelog.ChangeFollower) ----------

    def changed(self, change: changelog.Change) -> None:
        """A policy set (possibly through another central): drop its cached copy."""
        if change.kind == changelog.IAM:
            self._cache.invalidate(change.resource)

    def reset(self) -> None:
        """Changes were missed: drop every cached policy."""
        self._cache.clear()

    # ---- evaluation ------------------------------------------------------------

    async def permissions(self, member: str, name: AnyName) -> frozenset[str]:
        """Every permission ``member`` has on ``name``: the root policy's and those
        of the KeyRing and CryptoKey above it (whether or not they exist)."""
        keys = member_keys(member)
        granted = self._root.permissions_of(keys)
        for policy in await self._compiled(policy_chain(name)):
            granted = granted | policy.permissions_of(keys)
        return granted

    def root_allows(self, member: str, permission: str) -> bool:
        """Whether the root policy alone grants ``permission`` to ``member``."""
        return self._root.grants_permission(member_keys(member), permission)

    async def allowed(self, member: str, name: AnyName, permission: str) -> bool:
        keys = member_keys(member)
        if self._root.grants_permission(keys, permission):
            return True
        chain = policy_chain(name)
        if not chain:
            return False
        return any(policy.grants_permission(keys, permission)
                   for policy in await self._compiled(chain))

    async def _compiled(self, chain: tuple[PolicyResource, ...]) -> list[CompiledPolicy]:
        found: dict[PolicyResource, CompiledPolicy] = {}
        missing: list[PolicyResource] = []
        for resource in chain:
            cached = self._cache.get(str(resource))
            if cached is None:
                missing.append(resource)
            else:
                found[resource] = cached
        if missing:
            ticket = self._cache.begin_load()

            def body(tr: Transaction) -> list[tuple[Binding, ...]]:
                return [_read(tr, resource)[0] for resource in missing]

            loaded = await self._store.run(body, read_only=True)
            for resource, bindings in zip(missing, loaded, strict=True):
                compiled = CompiledPolicy(bindings) if bindings else _NO_POLICY
                self._cache.put(str(resource), ticket, compiled)
                found[resource] = compiled
        return [found[resource] for resource in chain]
