"""The keystore: Cloud KMS semantics over the transactional store.

This is the domain service that central (and, for its forwarding path, the
sidecar) adapts to the wire. It knows nothing of gRPC: inputs are plain
values, outputs are domain objects, failures are ``valv.core.errors``.

Every state change happens inside one storage transaction. Transaction bodies
are synchronous and may be retried by the store, so they only touch the
transaction they are given (plus pure computation such as wrapping a KEK).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from valv.core import changelog, envelope, records
from valv.core.calls import CallContext, current_call
from valv.core.clock import Clock, to_micros
from valv.core.crypto import ciphertext as ciphertext_format
from valv.core.crypto.errors import KeyUnwrapError, UnknownRootKeyError
from valv.core.crypto.kek import generate_kek
from valv.core.crypto.rootkey import RootKeyring
from valv.core.envelope import DecryptResult, EncryptResult
from valv.core.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unimplemented,
)
from valv.core.faults import fault_point
from valv.core.listing import Filter, Order, PageTokens, check_page_size, parse_order_by
from valv.core.model import (
    Algorithm,
    CryptoKey,
    CryptoKeyVersion,
    KeyRing,
    ProtectionLevel,
    Purpose,
    VersionState,
    enum_name,
)
from valv.core.names import (
    CryptoKeyName,
    CryptoKeyVersionName,
    KeyRingName,
    LocationName,
    check_id,
    parse_crypto_key,
    parse_crypto_key_version,
    parse_key_ring,
    parse_location,
    parse_project,
)
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import unpack
from valv.core.usecache import UsableVersion, UseCache

T = TypeVar("T")

MIN_ROTATION_PERIOD = timedelta(hours=24)
MAX_ROTATION_PERIOD = timedelta(days=36_500)  # 100 years, as Cloud KMS
MAX_DESTROY_SCHEDULED_DURATION = timedelta(days=120)
MAX_RANDOM_BYTES = 1024
_SCAN_CHUNK = 256

_LABEL_KEY = re.compile(r"[\w-]{1,63}")
_LABEL_VALUE = re.compile(r"[\w-]{0,63}")
MAX_LABELS = 64


class ChangeHook(Protocol):
    """Called inside a change's transaction, after the change: ``call`` made it (None:
    the scheduler or other server work), ``outcome`` is what the change returned (e.g.
    a DueOutcome). Raising aborts the change."""

    def __call__(self, tr: Transaction, call: CallContext | None,
                 outcome: object = None) -> None: ...


@dataclass(frozen=True, slots=True)
class KeystoreSettings:
    locations: tuple[str, ...] = ("global",)
    # None disables default rotation (DESIGN.md §1: Valv rotates by default).
    default_rotation_period: timedelta | None = timedelta(days=30)
    default_destroy_scheduled_duration: timedelta = timedelta(days=30)
    min_destroy_scheduled_duration: timedelta = timedelta(days=1)
    # How long Encrypt/Decrypt may reuse a key's state and unwrapped KEK (see
    # valv.core.usecache); zero reads storage on every call.
    use_cache_ttl: timedelta = timedelta(seconds=1)


@dataclass(slots=True)
class NewCryptoKey:
    """What CreateCryptoKey asks for; unset fields are 0/None."""

    purpose: int
    template_algorithm: int = 0
    template_protection_level: int = 0
    rotation_period: timedelta | None = None
    next_rotation_time: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    import_only: bool = False
    destroy_scheduled_duration: timedelta | None = None


@dataclass(slots=True)
class CryptoKeyUpdate:
    """UpdateCryptoKey: the update_mask paths and the values they refer to."""

    paths: list[str]
    rotation_period: timedelta | None = None
    next_rotation_time: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    template_algorithm: int = 0
    template_protection_level: int = 0


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
    total_size: int


@dataclass(frozen=True, slots=True)
class DueOutcome:
    """What applying one due index entry did."""

    name: CryptoKeyName | CryptoKeyVersionName
    # The version created (rotation) or destroyed; None when nothing was applied.
    version: CryptoKeyVersion | None
    detail: str
    next_rotation_time: datetime | None = None




_UPDATABLE_KEY_PATHS = frozenset(
    {"rotation_period", "next_rotation_time", "labels", "version_template.algorithm",
     "version_template"}
)
_IMMUTABLE_KEY_PATHS = frozenset(
    {"name", "primary", "purpose", "create_time", "import_only", "destroy_scheduled_duration",
     "version_template.protection_level", "crypto_key_backend",
     "key_access_justifications_policy"}
)
_VERSION_STATE_NAMES = frozenset(s.name for s in VersionState if s != VersionState.UNSPECIFIED)


class KeyStore:
    def __init__(self, store: Store, root_keys: RootKeyring, clock: Clock,
                 settings: KeystoreSettings | None = None,
                 codec: ciphertext_format.CiphertextCodec | None = None) -> None:
        self._store = store
        self._root_keys = root_keys
        self._clock = clock
        self.settings = settings or KeystoreSettings()
        self._codec = codec or ciphertext_format.CiphertextCodec()
        with root_keys.page_token_key() as mac_key:
            # PageTokens keeps an immutable copy for the process's lifetime.
            self._page_tokens = PageTokens(bytes(mac_key))
        # Called inside every change's transaction, after the change, with the
        # call that made it (None for the scheduler): how audit records are
        # written atomically with what they record.
        self.change_hook: ChangeHook | None = None
        # Called on the event loop once a change's transaction has finished
        # (committed or not): central wakes its change-log follower with it, so
        # the change reaches its listeners and Watch streams at once.
        self.after_change: Callable[[], None] | None = None
        self._use_cache = UseCache(self.settings.use_cache_ttl.total_seconds())

    # ---- locations ---------------------------------------------------------

    def list_locations(self, project: str) -> list[LocationName]:
        parsed = parse_project(project)
        return [LocationName(parsed.project, loc) for loc in self.settings.locations]

    def get_location(self, name: str) -> LocationName:
        location = parse_location(name)
        self._check_location(location)
        return location

    def _check_location(self, location: LocationName) -> None:
        if location.location not in self.settings.locations:
            raise NotFound(
                f"location {location} is not served here; configured locations: "
                + ", ".join(self.settings.locations)
            )

    # ---- key rings -----------------------------------------------------------

    async def create_key_ring(self, parent: str, key_ring_id: str) -> KeyRing:
        location = parse_location(parent, "parent")
        check_id(key_ring_id, "key_ring_id")
        self._check_location(location)
        ring = KeyRing(location.key_ring(key_ring_id), self._clock.now())

        def body(tr: Transaction) -> KeyRing:
            key = records.key_ring_key(ring.name)
            if tr.get(key) is not None:
                raise AlreadyExists(f"KeyRing {ring.name} already exists")
            tr.set(key, records.encode_key_ring(ring))
            _increment(tr, records.key_ring_count_key(location))
            tr.set(records.ctime_index_key("kr", (location.project, location.location),
                                           to_micros(ring.create_time), key_ring_id), key)
            return ring

        return await self._change(None, body, lambda _: [(changelog.KEY_RING, str(ring.name))])

    async def get_key_ring(self, name: str) -> KeyRing:
        ring_name = parse_key_ring(name)
        return await self._store.run(lambda tr: self._load_key_ring(tr, ring_name),
                                     read_only=True)

    def _load_key_ring(self, tr: Transaction, name: KeyRingName) -> KeyRing:
        key = records.key_ring_key(name)
        value = tr.get(key)
        if value is None:
            raise NotFound(f"KeyRing {name} not found")
        return records.decode_key_ring(name, key, value)

    async def list_key_rings(self, parent: str, *, page_size: int = 0, page_token: str = "",
                             filter_text: str = "", order_by: str = "") -> Page[KeyRing]:
        location = parse_location(parent, "parent")
        self._check_location(location)
        fields: dict[str, Callable[[Any], Any]] = {"name": lambda r: str(r.name)}

        def decode(tr: Transaction, key: bytes, value: bytes) -> KeyRing:
            _, p, loc, ring = unpack(key)
            return records.decode_key_ring(KeyRingName(p, loc, ring), key, value)

        return await self._list(
            parent=str(location), page_size=page_size, page_token=page_token,
            filter_text=filter_text, order_by=order_by, fields=fields, enums={},
            primary_range=records.key_rings_range(location),
            index_range=records.ctime_index_range("kr", (location.project, location.location)),
            decode=decode,
            count=lambda tr: records.decode_count(
                records.key_ring_count_key(location),
                tr.get(records.key_ring_count_key(location))),
        )

    # ---- crypto keys -------------------------------------------------------------

    async def create_crypto_key(self, parent: str, crypto_key_id: str, spec: NewCryptoKey, *,
                                skip_initial_version_creation: bool = False) -> CryptoKey:
        ring_name = parse_key_ring(parent, "parent")
        check_id(crypto_key_id, "crypto_key_id")
        name = ring_name.crypto_key(crypto_key_id)
        now = self._clock.now()
        crypto_key = self._validate_new_key(name, spec, now)

        def body(tr: Transaction) -> CryptoKey:
            self._load_key_ring(tr, ring_name)
            key = records.crypto_key_key(name)
            if tr.get(key) is not None:
                raise AlreadyExists(f"CryptoKey {name} already exists")
            state = records.CryptoKeyState(crypto_key, primary_version_id=0, next_version_id=1)
            if not skip_initial_version_creation:
                version = self._add_version(tr, state, now)
                state.primary_version_id = version.name.version
            self._write_key(tr, state, before=None)
            _increment(tr, records.crypto_key_count_key(ring_name))
            tr.set(records.ctime_index_key(
                "ck", (name.project, name.location, name.key_ring), to_micros(now),
                crypto_key_id), key)
            return self._resolve(tr, state)

        return await self._change(name, body, _key_changed(name))

    def _validate_new_key(self, name: CryptoKeyName, spec: NewCryptoKey,
                          now: datetime) -> CryptoKey:
        purpose = spec.purpose
        if purpose not in Purpose.__members__.values():
            raise InvalidArgument(f"crypto_key.purpose {purpose} is not a CryptoKeyPurpose")
        if purpose == Purpose.UNSPECIFIED:
            raise InvalidArgument(
                "crypto_key.purpose is required; Valv supports ENCRYPT_DECRYPT"
            )
        if purpose != Purpose.ENCRYPT_DECRYPT:
            raise Unimplemented(
                f"CryptoKey purpose {enum_name(Purpose, purpose)} is not implemented yet; "
                "Valv supports ENCRYPT_DECRYPT"
            )
        algorithm = self._check_algorithm(spec.template_algorithm)
        protection = self._check_protection_level(spec.template_protection_level)
        if spec.import_only:
            raise Unimplemented("import_only keys are not implemented yet (no import jobs)")
        _check_labels(spec.labels)
        rotation_period = spec.rotation_period
        next_rotation_time = spec.next_rotation_time
        if rotation_period is None:
            # The one deliberate difference from Cloud KMS (DESIGN.md §1): keys
            # rotate by default.
            rotation_period = self.settings.default_rotation_period
            if next_rotation_time is None and rotation_period is not None:
                next_rotation_time = now + rotation_period
        else:
            _check_rotation_period(rotation_period)
            if next_rotation_time is None:
                raise InvalidArgument(
                    "crypto_key.next_rotation_time must be set when rotation_period is set "
                    "(as in Cloud KMS); or omit both to get the server's default rotation"
                )
        destroy_duration = spec.destroy_scheduled_duration
        if destroy_duration is None:
            destroy_duration = self.settings.default_destroy_scheduled_duration
        else:
            self._check_destroy_duration(destroy_duration)
        return CryptoKey(
            name=name, purpose=purpose, create_time=now, template_algorithm=algorithm,
            template_protection_level=protection, destroy_scheduled_duration=destroy_duration,
            rotation_period=rotation_period, next_rotation_time=next_rotation_time,
            labels=dict(spec.labels), import_only=False,
        )

    @staticmethod
    def _check_algorithm(algorithm: int) -> int:
        if algorithm in (Algorithm.UNSPECIFIED, Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION):
            return int(Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION)
        if algorithm == Algorithm.EXTERNAL_SYMMETRIC_ENCRYPTION:
            raise Unimplemented("EXTERNAL_SYMMETRIC_ENCRYPTION (Cloud EKM) is not implemented")
        raise InvalidArgument(
            f"version_template.algorithm {_algorithm_name(algorithm)} is not compatible with "
            "purpose ENCRYPT_DECRYPT; use GOOGLE_SYMMETRIC_ENCRYPTION"
        )

    @staticmethod
    def _check_protection_level(level: int) -> int:
        if level not in ProtectionLevel.__members__.values():
            raise InvalidArgument(f"protection_level {level} is not a ProtectionLevel")
        if level in (ProtectionLevel.UNSPECIFIED, ProtectionLevel.SOFTWARE):
            return int(ProtectionLevel.SOFTWARE)
        raise Unimplemented(
            f"protection level {enum_name(ProtectionLevel, level)} is not implemented yet; "
            "Valv supports SOFTWARE"
        )

    def _check_destroy_duration(self, duration: timedelta) -> None:
        low = self.settings.min_destroy_scheduled_duration
        if duration < low or duration > MAX_DESTROY_SCHEDULED_DURATION:
            raise InvalidArgument(
                f"destroy_scheduled_duration must be between {_human(low)} and "
                f"{_human(MAX_DESTROY_SCHEDULED_DURATION)} (got {_human(duration)})"
            )

    def _add_version(self, tr: Transaction, state: records.CryptoKeyState,
                     now: datetime) -> CryptoKeyVersion:
        """Create the next version of ``state.key`` with fresh key material."""
        key = state.key
        if state.next_version_id > 0xFFFF_FFFF:
            raise FailedPrecondition(f"CryptoKey {key.name} has used every version id")
        name = key.name.version(state.next_version_id)
        state.next_version_id += 1
        version = CryptoKeyVersion(
            name=name, state=VersionState.ENABLED, algorithm=key.template_algorithm,
            protection_level=key.template_protection_level, create_time=now,
            generate_time=now,
        )
        with generate_kek() as kek:
            rmk_id, wrapped = self._root_keys.wrap_kek(
                kek, version_name=str(name), algorithm=_algorithm_name(version.algorithm))
        self._write_version(tr, version, before=None)
        tr.set(records.material_key(name), records.encode_material(rmk_id, wrapped))
        return version

    @staticmethod
    def _write_key(tr: Transaction, state: records.CryptoKeyState,
                   before: CryptoKey | None) -> None:
        """Write a CryptoKey record and, in the same transaction, its rotation index entry."""
        key = state.key
        tr.set(records.crypto_key_key(key.name), records.encode_crypto_key(state))
        old_due = _rotation_due(before)
        new_due = _rotation_due(key)
        if old_due != new_due:
            if old_due is not None:
                tr.clear(records.rotation_due_key(to_micros(old_due), key.name))
            if new_due is not None:
                tr.set(records.rotation_due_key(to_micros(new_due), key.name), b"")

    @staticmethod
    def _write_version(tr: Transaction, version: CryptoKeyVersion,
                       before: CryptoKeyVersion | None) -> None:
        """Write a version record and, in the same transaction, its destruction index entry."""
        tr.set(records.version_key(version.name), records.encode_version(version))
        old_due = _destruction_due(before)
        new_due = _destruction_due(version)
        if old_due != new_due:
            if old_due is not None:
                tr.clear(records.destruction_due_key(to_micros(old_due), version.name))
            if new_due is not None:
                tr.set(records.destruction_due_key(to_micros(new_due), version.name), b"")

    def _load_key_state(self, tr: Transaction, name: CryptoKeyName) -> records.CryptoKeyState:
        key = records.crypto_key_key(name)
        value = tr.get(key)
        if value is None:
            raise NotFound(f"CryptoKey {name} not found")
        return records.decode_crypto_key(name, key, value)

    def _load_version(self, tr: Transaction, name: CryptoKeyVersionName) -> CryptoKeyVersion:
        key = records.version_key(name)
        value = tr.get(key)
        if value is None:
            raise NotFound(f"CryptoKeyVersion {name} not found")
        return records.decode_version(name, key, value)

    def _resolve(self, tr: Transaction, state: records.CryptoKeyState) -> CryptoKey:
        """The CryptoKey with its primary version filled in."""
        if state.primary_version_id == 0:
            return state.key
        primary = self._load_version(tr, state.key.name.version(state.primary_version_id))
        return replace(state.key, primary=primary)

    async def get_crypto_key(self, name: str) -> CryptoKey:
        key_name = parse_crypto_key(name)

        def body(tr: Transaction) -> CryptoKey:
            return self._resolve(tr, self._load_key_state(tr, key_name))

        return await self._store.run(body, read_only=True)

    async def list_crypto_keys(self, parent: str, *, page_size: int = 0, page_token: str = "",
                               filter_text: str = "", order_by: str = "") -> Page[CryptoKey]:
        ring_name = parse_key_ring(parent, "parent")
        fields: dict[str, Callable[[Any], Any]] = {
            "name": lambda k: str(k.name),
            "purpose": lambda k: enum_name(Purpose, k.purpose),
            "labels": lambda k: k.labels,
            "primary.state": lambda k: k.primary.state.name if k.primary else None,
            "version_template.algorithm": lambda k: _algorithm_name(k.template_algorithm),
            "version_template.protection_level":
                lambda k: enum_name(ProtectionLevel, k.template_protection_level),
        }
        enums = {
            "purpose": frozenset(p.name for p in Purpose),
            "primary.state": _VERSION_STATE_NAMES,
            "version_template.protection_level": frozenset(p.name for p in ProtectionLevel),
        }

        # Reading each key's primary version costs a read per key: only worth it
        # while filtering when the filter looks at it; otherwise only for the page.
        filter_needs_primary = "primary" in filter_text
        primary_ids: dict[CryptoKeyName, int] = {}

        def decode(tr: Transaction, key: bytes, value: bytes) -> CryptoKey:
            _, p, loc, ring, crypto_key = unpack(key)
            state = records.decode_crypto_key(CryptoKeyName(p, loc, ring, crypto_key), key, value)
            if filter_needs_primary:
                return self._resolve(tr, state)
            primary_ids[state.key.name] = state.primary_version_id
            return state.key

        def finish(tr: Transaction, key: CryptoKey) -> CryptoKey:
            primary_id = primary_ids.get(key.name, 0)
            if filter_needs_primary or not primary_id:
                return key
            return replace(key, primary=self._load_version(tr, key.name.version(primary_id)))

        return await self._list(
            parent=str(ring_name), page_size=page_size, page_token=page_token,
            filter_text=filter_text, order_by=order_by, fields=fields, enums=enums,
            primary_range=records.crypto_keys_range(ring_name),
            index_range=records.ctime_index_range(
                "ck", (ring_name.project, ring_name.location, ring_name.key_ring)),
            decode=decode, finish=finish,
            count=lambda tr: self._count_crypto_keys(tr, ring_name),
        )

    def _count_crypto_keys(self, tr: Transaction, ring_name: KeyRingName) -> int:
        self._load_key_ring(tr, ring_name)
        key = records.crypto_key_count_key(ring_name)
        return records.decode_count(key, tr.get(key))

    async def update_crypto_key(self, name: str, update: CryptoKeyUpdate) -> CryptoKey:
        key_name = parse_crypto_key(name, "crypto_key.name")
        paths = _check_mask(update.paths, _UPDATABLE_KEY_PATHS, _IMMUTABLE_KEY_PATHS,
                            "CryptoKey")
        if "rotation_period" in paths and update.rotation_period is not None:
            _check_rotation_period(update.rotation_period)
        if "labels" in paths:
            _check_labels(update.labels)
        if {"version_template.algorithm", "version_template"} & paths:
            algorithm = self._check_algorithm(update.template_algorithm)
        # The whole "version_template" path may carry a protection_level, which is
        # immutable: the transaction rejects a different one with INVALID_ARGUMENT.

        def body(tr: Transaction) -> CryptoKey:
            state = self._load_key_state(tr, key_name)
            key = state.key
            changes: dict[str, Any] = {}
            if "rotation_period" in paths:
                changes["rotation_period"] = update.rotation_period
            if "next_rotation_time" in paths:
                changes["next_rotation_time"] = update.next_rotation_time
            if "labels" in paths:
                changes["labels"] = dict(update.labels)
            if {"version_template.algorithm", "version_template"} & paths:
                changes["template_algorithm"] = algorithm
            if ("version_template" in paths and
                    update.template_protection_level not in (0, key.template_protection_level)):
                raise InvalidArgument(
                    "version_template.protection_level cannot be changed (the key is "
                    f"{enum_name(ProtectionLevel, key.template_protection_level)})")
            state.key = replace(key, **changes)
            if state.key.rotation_period is not None and state.key.next_rotation_time is None:
                # As Cloud KMS: a period without a next time would silently never rotate.
                raise InvalidArgument(
                    "next_rotation_time must be set when rotation_period is set: include "
                    "next_rotation_time in update_mask, or clear both to disable rotation"
                )
            self._write_key(tr, state, before=key)
            return self._resolve(tr, state)

        return await self._change(key_name, body, _key_changed(key_name))

    # ---- versions ----------------------------------------------------------------

    async def create_crypto_key_version(self, parent: str) -> CryptoKeyVersion:
        key_name = parse_crypto_key(parent, "parent")
        now = self._clock.now()

        def body(tr: Transaction) -> CryptoKeyVersion:
            state = self._load_key_state(tr, key_name)
            version = self._add_version(tr, state, now)
            self._write_key(tr, state, before=state.key)
            return version

        return await self._change(key_name, body, _version_changed)

    async def get_crypto_key_version(self, name: str) -> CryptoKeyVersion:
        version_name = parse_crypto_key_version(name)

        def body(tr: Transaction) -> CryptoKeyVersion:
            self._load_key_state(tr, version_name.parent)
            return self._load_version(tr, version_name)

        return await self._store.run(body, read_only=True)

    async def list_crypto_key_versions(
            self, parent: str, *, page_size: int = 0, page_token: str = "",
            filter_text: str = "", order_by: str = "") -> Page[CryptoKeyVersion]:
        key_name = parse_crypto_key(parent, "parent")
        fields: dict[str, Callable[[Any], Any]] = {
            "name": lambda v: str(v.name),
            "state": lambda v: v.state.name,
            "algorithm": lambda v: _algorithm_name(v.algorithm),
            "protection_level": lambda v: enum_name(ProtectionLevel, v.protection_level),
        }
        enums = {"state": _VERSION_STATE_NAMES,
                 "protection_level": frozenset(p.name for p in ProtectionLevel)}

        def decode(tr: Transaction, key: bytes, value: bytes) -> CryptoKeyVersion:
            _, p, loc, ring, crypto_key, version = unpack(key)
            return records.decode_version(
                CryptoKeyVersionName(p, loc, ring, crypto_key, version), key, value)

        # Versions are created in id order, so the id range is also create order.
        begin, end = records.versions_range(key_name)
        return await self._list(
            parent=str(key_name), page_size=page_size, page_token=page_token,
            filter_text=filter_text, order_by=order_by, fields=fields, enums=enums,
            primary_range=(begin, end), index_range=None, decode=decode,
            # Versions are never deleted, so the count is the last id handed out.
            count=lambda tr: self._load_key_state(tr, key_name).next_version_id - 1,
        )

    async def update_crypto_key_version(self, name: str, paths: Iterable[str],
                                        state: int) -> CryptoKeyVersion:
        version_name = parse_crypto_key_version(name, "crypto_key_version.name")
        mask = _check_mask(list(paths), frozenset({"state"}),
                           frozenset({"name", "protection_level", "algorithm", "create_time",
                                      "generate_time", "destroy_time", "destroy_event_time",
                                      "attestation", "import_job", "import_time"}),
                           "CryptoKeyVersion")
        if "state" not in mask:
            raise InvalidArgument("update_mask must contain 'state'")
        if state not in (VersionState.ENABLED, VersionState.DISABLED):
            raise InvalidArgument(
                f"crypto_key_version.state {enum_name(VersionState, state)} cannot be set "
                "directly; only ENABLED and DISABLED can (use DestroyCryptoKeyVersion or "
                "RestoreCryptoKeyVersion for the others)"
            )
        target = VersionState(state)

        def body(tr: Transaction) -> CryptoKeyVersion:
            self._load_key_state(tr, version_name.parent)
            version = self._load_version(tr, version_name)
            if version.state not in (VersionState.ENABLED, VersionState.DISABLED):
                raise FailedPrecondition(
                    f"CryptoKeyVersion {version_name} is {version.state.name}; only ENABLED "
                    "and DISABLED versions can change state with UpdateCryptoKeyVersion"
                )
            updated = replace(version, state=target)
            self._write_version(tr, updated, before=version)
            return updated

        return await self._change(version_name.parent, body, _version_changed)

    async def update_primary_version(self, name: str, version_id: str) -> CryptoKey:
        key_name = parse_crypto_key(name)
        if not version_id:
            raise InvalidArgument("crypto_key_version_id is required")
        version_name = parse_crypto_key_version(f"{key_name}/cryptoKeyVersions/{version_id}",
                                                "crypto_key_version_id")

        def body(tr: Transaction) -> CryptoKey:
            state = self._load_key_state(tr, key_name)
            version = self._load_version(tr, version_name)
            if version.state != VersionState.ENABLED:
                raise FailedPrecondition(
                    f"CryptoKeyVersion {version_name} is {version.state.name}; only an "
                    "ENABLED version can be made primary"
                )
            state.primary_version_id = version_name.version
            self._write_key(tr, state, before=state.key)
            return replace(state.key, primary=version)

        return await self._change(key_name, body, _key_changed(key_name))

    async def destroy_crypto_key_version(self, name: str) -> CryptoKeyVersion:
        version_name = parse_crypto_key_version(name)
        now = self._clock.now()

        def body(tr: Transaction) -> CryptoKeyVersion:
            state = self._load_key_state(tr, version_name.parent)
            version = self._load_version(tr, version_name)
            if version.state not in (VersionState.ENABLED, VersionState.DISABLED):
                raise FailedPrecondition(
                    f"CryptoKeyVersion {version_name} is {version.state.name}; only ENABLED "
                    "or DISABLED versions can be scheduled for destruction"
                )
            updated = replace(version, state=VersionState.DESTROY_SCHEDULED,
                              destroy_time=now + state.key.destroy_scheduled_duration)
            self._write_version(tr, updated, before=version)
            return updated

        return await self._change(version_name.parent, body, _version_changed)

    async def restore_crypto_key_version(self, name: str) -> CryptoKeyVersion:
        version_name = parse_crypto_key_version(name)

        def body(tr: Transaction) -> CryptoKeyVersion:
            self._load_key_state(tr, version_name.parent)
            version = self._load_version(tr, version_name)
            if version.state != VersionState.DESTROY_SCHEDULED:
                raise FailedPrecondition(
                    f"CryptoKeyVersion {version_name} is {version.state.name}; only a "
                    "DESTROY_SCHEDULED version can be restored"
                )
            updated = replace(version, state=VersionState.DISABLED, destroy_time=None)
            self._write_version(tr, updated, before=version)
            return updated

        return await self._change(version_name.parent, body, _version_changed)

    # ---- lifecycle: automatic rotation and destruction ----------------------------

    async def due_entries(self, kind: str, limit: int) -> list[bytes]:
        """Index entries of ``kind`` (records.ROTATE/DESTROY) due now, oldest first.

        Costs O(due entries): the index is ordered by due time.
        """
        begin, end = records.due_range(kind, to_micros(self._clock.now()))

        def body(tr: Transaction) -> list[bytes]:
            return [key for key, _ in tr.get_range(begin, end, limit=limit)]

        return await self._store.run(body, read_only=True)

    async def apply_due(self, entry: bytes) -> DueOutcome:
        """Claim and apply one due entry, exactly once, in one transaction.

        The entry is the claim: it is read, the event applied and the entry
        removed (or moved to the next due time) in the same serializable
        transaction. Any number of schedulers may race for the same entry; the
        losers find it gone and do nothing.
        """
        name = records.name_from_due_key(entry)
        if isinstance(name, CryptoKeyVersionName):
            outcome = await self._change(name.parent,
                                         lambda tr: self._destroy_due(tr, entry, name),
                                         _due_changed)
            if outcome.version is not None:
                self._codec.cache.evict_version(str(name.parent), name.version)
            return outcome
        return await self._change(name, lambda tr: self._rotate_due(tr, entry, name),
                                  _due_changed)

    def _rotate_due(self, tr: Transaction, entry: bytes, name: CryptoKeyName) -> DueOutcome:
        if tr.get(entry) is None:
            return DueOutcome(name, None, "already applied by another scheduler")
        now = self._clock.now()
        due_us = records.due_time_of(entry)
        try:
            state = self._load_key_state(tr, name)
        except NotFound:
            tr.clear(entry)
            return DueOutcome(name, None, "removed an index entry for a missing key")
        key = state.key
        if key.next_rotation_time is None or to_micros(key.next_rotation_time) != due_us:
            tr.clear(entry)
            return DueOutcome(name, None, "removed a stale index entry")
        if key.next_rotation_time > now:
            return DueOutcome(name, None, "not due yet")
        version = self._add_version(tr, state, now)
        fault_point("rotate.mid-transaction")
        state.primary_version_id = version.name.version
        next_time: datetime | None = None
        if key.rotation_period is not None:
            # The first next + k*period after now: a central that was down for
            # several periods rotates once, it does not burst.
            periods = (now - key.next_rotation_time) // key.rotation_period + 1
            next_time = key.next_rotation_time + periods * key.rotation_period
        state.key = replace(key, next_rotation_time=next_time)
        self._write_key(tr, state, before=key)
        return DueOutcome(name, version, "rotated", next_time)

    def _destroy_due(self, tr: Transaction, entry: bytes,
                     name: CryptoKeyVersionName) -> DueOutcome:
        if tr.get(entry) is None:
            return DueOutcome(name, None, "already applied by another scheduler")
        now = self._clock.now()
        due_us = records.due_time_of(entry)
        try:
            version = self._load_version(tr, name)
        except NotFound:
            tr.clear(entry)
            return DueOutcome(name, None, "removed an index entry for a missing version")
        if (version.state != VersionState.DESTROY_SCHEDULED or version.destroy_time is None
                or to_micros(version.destroy_time) != due_us):
            tr.clear(entry)
            return DueOutcome(name, None, "removed a stale index entry")
        if version.destroy_time > now:
            return DueOutcome(name, None, "not due yet")
        # The key material itself goes: destroyed means gone, not flagged.
        tr.clear(records.material_key(name))
        fault_point("destroy.mid-transaction")
        destroyed = replace(version, state=VersionState.DESTROYED, destroy_time=None,
                            destroy_event_time=now)
        self._write_version(tr, destroyed, before=version)
        return DueOutcome(name, destroyed, "destroyed")

    async def erase_freed_space(self) -> None:
        """Ask storage to overwrite what destroyed versions left behind."""
        await self._store.erase_freed_space()

    # ---- cryptography ------------------------------------------------------------

    async def encrypt(self, name: str, plaintext: bytes, aad: bytes, *,
                      plaintext_crc32c: int | None = None,
                      aad_crc32c: int | None = None) -> EncryptResult:
        call = envelope.check_encrypt(name, plaintext, aad, plaintext_crc32c=plaintext_crc32c,
                                      aad_crc32c=aad_crc32c)
        usable = await self._usable_version(call.key_name, call.version_id, purpose="encrypt")
        _note_used_version(usable.version.name)
        try:
            return envelope.encrypt_with(self._codec, usable.kek, call,
                                         usable.version.name.version)
        finally:
            self._release(usable)

    async def decrypt(self, name: str, ciphertext: bytes, aad: bytes, *,
                      ciphertext_crc32c: int | None = None,
                      aad_crc32c: int | None = None) -> DecryptResult:
        call = envelope.check_decrypt(name, ciphertext, aad,
                                      ciphertext_crc32c=ciphertext_crc32c,
                                      aad_crc32c=aad_crc32c)
        usable = await self._usable_version(call.key_name, call.version_id, purpose="decrypt")
        _note_used_version(usable.version.name)
        try:
            return envelope.decrypt_with(self._codec, usable.kek, call,
                                         primary_version_id=usable.primary_version_id)
        finally:
            self._release(usable)

    async def _usable_version(self, key_name: CryptoKeyName, version_id: int | None, *,
                              purpose: str) -> UsableVersion:
        """An ENABLED version of ``key_name`` with its KEK: ``version_id``, or the primary.

        Served from the use cache when it has a fresh entry; otherwise read from
        storage in one transaction and unwrapped.
        """
        cache_key = str(key_name)
        cached = self._use_cache.get(cache_key, version_id or 0)
        if cached is not None:
            return cached
        ticket = self._use_cache.begin_load()

        def body(tr: Transaction) -> tuple[CryptoKeyVersion, int, str, bytes]:
            state = self._load_key_state(tr, key_name)
            if version_id is None:
                if state.primary_version_id == 0:
                    raise FailedPrecondition(
                        f"CryptoKey {key_name} has no primary version; create one or set one "
                        "with UpdateCryptoKeyPrimaryVersion"
                    )
                version_name = key_name.version(state.primary_version_id)
            else:
                version_name = key_name.version(version_id)
            try:
                version = self._load_version(tr, version_name)
            except NotFound:
                if purpose == "decrypt":  # the id came from the (untrusted) ciphertext
                    raise envelope.decryption_failed(key_name) from None
                raise
            if version.state != VersionState.ENABLED:
                if purpose == "decrypt":
                    raise FailedPrecondition(
                        f"The ciphertext was made with CryptoKeyVersion {version_name}, which "
                        f"is {version.state.name}; it must be ENABLED to decrypt"
                    )
                what = "primary version" if version_id is None else "version"
                raise FailedPrecondition(
                    f"The {what} {version_name} is {version.state.name}; encryption needs "
                    "an ENABLED version"
                )
            rmk_id, wrapped = self._load_material(tr, version_name)
            return version, state.primary_version_id, rmk_id, wrapped

        version, primary_id, rmk_id, wrapped = await self._store.run(body, read_only=True)
        usable = UsableVersion(version, self._unwrap(version, rmk_id, wrapped), primary_id)
        self._use_cache.put(cache_key, ticket, usable, as_primary=version_id is None)
        return usable

    def _release(self, usable: UsableVersion) -> None:
        """Done with a KEK: wipe it now unless the use cache keeps it (TTL-bounded)."""
        if not self._use_cache.enabled:
            usable.kek.zeroize()

    async def _change(self, key_name: CryptoKeyName | None,
                      body: Callable[[Transaction], T],
                      changed: Callable[[T], Iterable[tuple[str, str]]]) -> T:
        """Run a transaction that changes ``key_name``, then drop its cached use state.

        ``changed`` names what the change did, as (kind, resource) pairs for the
        change log (valv.core.changelog), from the body's result; each pair is
        appended in the same transaction, so a committed change always has its
        entries and a failed one never does.

        The invalidation is tied to the transaction finishing, not to this
        coroutine: if the caller is cancelled (deadline, disconnect) the
        transaction may still commit in its worker thread, and the cache must
        not keep serving the old state after it does. It also runs after a
        failure, when the commit outcome may be unknown.
        """
        hook, call = self.change_hook, current_call.get()
        change, now_us = body, to_micros(self._clock.now())

        def logged(tr: Transaction) -> T:
            result = change(tr)
            for kind, resource in changed(result):
                changelog.append(tr, now_us, kind, resource)
            if hook is not None:
                hook(tr, call, result)  # e.g. the audit record, in the change's own transaction
            return result

        operation = asyncio.ensure_future(self._store.run(logged))
        cache_key = str(key_name) if key_name is not None else None

        def finished(done: asyncio.Future[T]) -> None:
            if cache_key is not None:
                self._use_cache.invalidate(cache_key)
            if not done.cancelled():
                done.exception()  # retrieved: a cancelled caller can't, and asyncio would warn
            if self.after_change is not None:
                self.after_change()

        operation.add_done_callback(finished)
        return await asyncio.shield(operation)

    # ---- the change log's listener (valv.core.changelog.ChangeFollower) ----------

    def changed(self, change: changelog.Change) -> None:
        """A change (possibly through another central): drop the key's cached use state."""
        if change.kind == changelog.CRYPTO_KEY:
            self._use_cache.invalidate(change.resource)
        elif change.kind == changelog.VERSION:
            self._use_cache.invalidate(change.resource.rsplit("/cryptoKeyVersions/", 1)[0])

    def reset(self) -> None:
        """Changes were missed: drop every cached use state."""
        self._use_cache.clear()

    def _load_material(self, tr: Transaction,
                       name: CryptoKeyVersionName) -> tuple[str, bytes]:
        key = records.material_key(name)
        value = tr.get(key)
        if value is None:
            raise DataLoss(f"the key material of {name} is missing from storage")
        return records.decode_material(key, value)

    def _unwrap(self, version: CryptoKeyVersion, rmk_id: str, wrapped: bytes) -> Any:
        try:
            return self._root_keys.unwrap_kek(
                rmk_id, wrapped, version_name=str(version.name),
                algorithm=_algorithm_name(version.algorithm))
        except UnknownRootKeyError as exc:
            raise FailedPrecondition(str(exc)) from None
        except KeyUnwrapError:
            raise DataLoss(
                f"the wrapped key material of {version.name} failed verification: it was "
                "modified or moved at the storage level"
            ) from None

    def generate_random_bytes(self, location: str, length_bytes: int,
                              protection_level: int) -> bytes:
        loc = parse_location(location, "location")
        self._check_location(loc)
        if not 1 <= length_bytes <= MAX_RANDOM_BYTES:
            raise InvalidArgument(
                f"length_bytes must be between 1 and {MAX_RANDOM_BYTES} (got {length_bytes})"
            )
        if protection_level not in (ProtectionLevel.UNSPECIFIED, ProtectionLevel.SOFTWARE,
                                    ProtectionLevel.HSM):
            raise InvalidArgument(
                f"protection_level {enum_name(ProtectionLevel, protection_level)} is not "
                "supported for GenerateRandomBytes; use HSM or SOFTWARE"
            )
        return os.urandom(length_bytes)

    # ---- listing -----------------------------------------------------------------

    async def _list(self, *, parent: str, page_size: int, page_token: str, filter_text: str,
                    order_by: str, fields: Mapping[str, Callable[[Any], Any]],
                    enums: Mapping[str, frozenset[str]], primary_range: tuple[bytes, bytes],
                    index_range: tuple[bytes, bytes] | None,
                    decode: Callable[[Transaction, bytes, bytes], T],
                    count: Callable[[Transaction], int],
                    finish: Callable[[Transaction, T], T] | None = None) -> Page[T]:
        """One page of a List call.

        ``count`` checks that the parent exists and returns how many children
        it has, without reading them (counters kept by the creating
        transactions), so an unfiltered page costs O(page). A filtered List
        must read the whole collection to report total_size. ``finish``
        completes the items of the page (work not needed for filtering).
        """
        limit = check_page_size(page_size)
        order = parse_order_by(order_by)
        flt = Filter(filter_text, fields, enums) if filter_text.strip() else None
        position = (self._page_tokens.resume_position(
            page_token, parent=parent, filter_text=filter_text, order_by=order_by)
            if page_token else None)
        use_index = order.field == "create_time" and index_range is not None
        scan_range = index_range if use_index and index_range else primary_range

        def body(tr: Transaction) -> Page[T]:
            total = count(tr)
            if flt is not None:
                total = 0
                for key, value in _scan(tr, scan_range, order, None):
                    item = self._list_item(tr, key, value, use_index, decode)
                    if item is not None and flt.matches(item):
                        total += 1
            items: list[T] = []
            last_position: bytes | None = None
            more = False
            for key, value in _scan(tr, scan_range, order, position):
                item = self._list_item(tr, key, value, use_index, decode)
                if item is None or (flt is not None and not flt.matches(item)):
                    continue
                if len(items) == limit:
                    more = True
                    break
                items.append(item)
                last_position = key
            if finish is not None:
                items = [finish(tr, item) for item in items]
            token = ""
            if more and last_position is not None:
                token = self._page_tokens.issue(parent=parent, filter_text=filter_text,
                                                order_by=order_by, position=last_position)
            return Page(items=items, next_page_token=token, total_size=total)

        return await self._store.run(body, read_only=True)

    @staticmethod
    def _list_item(tr: Transaction, key: bytes, value: bytes, via_index: bool,
                   decode: Callable[[Transaction, bytes, bytes], T]) -> T | None:
        if via_index:
            record_key = value
            record = tr.get(record_key)
            if record is None:  # index entry for a record that no longer exists
                return None
            return decode(tr, record_key, record)
        return decode(tr, key, value)


def _scan(tr: Transaction, key_range: tuple[bytes, bytes], order: Order,
          after: bytes | None) -> Iterable[tuple[bytes, bytes]]:
    """Every pair in ``key_range`` in ``order``, resuming after ``after``, in chunks."""
    begin, end = key_range
    if after is not None:
        if order.descending:
            end = min(end, after)
        else:
            begin = max(begin, after + b"\x00")
    while begin < end:
        chunk = tr.get_range(begin, end, limit=_SCAN_CHUNK, reverse=order.descending)
        yield from chunk
        if len(chunk) < _SCAN_CHUNK:
            return
        if order.descending:
            end = chunk[-1][0]
        else:
            begin = chunk[-1][0] + b"\x00"


def _key_changed(name: CryptoKeyName) -> Callable[[object], list[tuple[str, str]]]:
    return lambda _: [(changelog.CRYPTO_KEY, str(name))]


def _version_changed(version: CryptoKeyVersion) -> list[tuple[str, str]]:
    return [(changelog.VERSION, str(version.name))]


def _due_changed(outcome: DueOutcome) -> list[tuple[str, str]]:
    """A rotation changes the key and adds a version; a destruction changes the version."""
    if outcome.version is None:
        return []  # nothing changed (already applied, not due, a stale entry removed)
    if isinstance(outcome.name, CryptoKeyName):
        return [(changelog.VERSION, str(outcome.version.name)),
                (changelog.CRYPTO_KEY, str(outcome.name))]
    return [(changelog.VERSION, str(outcome.version.name))]


def _note_used_version(name: CryptoKeyVersionName) -> None:
    """Tell the call (for its data-access audit record) which version it used."""
    call = current_call.get()
    if call is not None:
        call.used_version = str(name)


def _increment(tr: Transaction, counter: bytes) -> None:
    tr.set(counter, records.encode_count(records.decode_count(counter, tr.get(counter)) + 1))


def _rotation_due(key: CryptoKey | None) -> datetime | None:
    """When ``key`` is next due for automatic rotation, if ever."""
    return None if key is None else key.next_rotation_time


def _destruction_due(version: CryptoKeyVersion | None) -> datetime | None:
    """When ``version``'s key material is due to be destroyed, if ever."""
    if version is None or version.state != VersionState.DESTROY_SCHEDULED:
        return None
    return version.destroy_time


def _check_rotation_period(period: timedelta) -> None:
    if period < MIN_ROTATION_PERIOD or period > MAX_ROTATION_PERIOD:
        raise InvalidArgument(
            f"rotation_period must be between 24 hours and 100 years (got {_human(period)})"
        )


def _check_labels(labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"a resource can have at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if (not _LABEL_KEY.fullmatch(key) or not key[0].isalpha() or not key[0].islower()
                or key != key.lower()):
            raise InvalidArgument(
                f"label key {key!r} is invalid: 1-63 characters, starting with a lowercase "
                "letter, using lowercase letters, digits, '_' and '-'"
            )
        if not _LABEL_VALUE.fullmatch(value) or value != value.lower():
            raise InvalidArgument(
                f"label value {value!r} for key {key!r} is invalid: at most 63 lowercase "
                "letters, digits, '_' and '-'"
            )


def _check_mask(paths: list[str], updatable: frozenset[str], immutable: frozenset[str],
                kind: str) -> set[str]:
    if not paths:
        raise InvalidArgument(
            f"update_mask is required: name the {kind} fields to update, e.g. "
            + ", ".join(sorted(updatable))
        )
    for path in paths:
        if path in immutable:
            raise InvalidArgument(f"{kind} field {path!r} cannot be updated")
        if path not in updatable:
            raise InvalidArgument(
                f"update_mask path {path!r} is not a {kind} field that can be updated; "
                "updatable fields: " + ", ".join(sorted(updatable))
            )
    return set(paths)


def _algorithm_name(algorithm: int) -> str:
    return enum_name(Algorithm, algorithm)


def _human(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds % 86_400 == 0:
        return f"{int(seconds // 86_400)} days"
    return f"{seconds:g} seconds"


__all__ = [
    "MAX_DESTROY_SCHEDULED_DURATION",
    "MAX_ROTATION_PERIOD",
    "MIN_ROTATION_PERIOD",
    "CryptoKeyUpdate",
    "DecryptResult",
    "DueOutcome",
    "EncryptResult",
    "KeyStore",
    "KeystoreSettings",
    "NewCryptoKey",
    "Page",
]
