"""How the keystore's domain objects are laid out in storage.

Keyspace (tuples packed with fdb.tuple; see valv.core.storage.keys):

    ("kr", project, location, ring)                        KeyRingRecord
    ("ck", project, location, ring, key)                   CryptoKeyRecord
    ("cv", project, location, ring, key, version:int)      CryptoKeyVersionRecord
    ("km", project, location, ring, key, version:int)      KeyMaterialRecord
    ("ix", "ctime", kind, *parent, create_us:int, id)     create-time order index
    ("n", "kr", project, location)                        CountRecord: KeyRings there
    ("n", "ck", project, location, ring)                  CountRecord: CryptoKeys there
    ("ix", "due", "rotate", due_us:int, p, l, ring, key)  CryptoKey due for rotation
    ("ix", "due", "destroy", due_us:int, p, l, ring, key, version:int)
                                                           version due for destruction
    ("log", seq:int)                                      ChangeRecord: the change log
    ("log-head",)                                         ChangeLogHead: last and first seq

Index entries are written in the same transaction as the record they point
to (see KeyStore._write_key / _write_version), so they can't drift. So is the
change log entry of every change (KeyStore._change, valv.core.changelog):
seqs are gap-free from the head's first_seq to its last_seq.

Every record is a protobuf message (valv.storage.v1) with a schema version.
Values are sealed by the storage layer, so nothing here is secret-aware.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from valv._proto.valv.storage import v1 as pb
from valv.core.clock import from_micros, to_micros
from valv.core.errors import DataLoss
from valv.core.model import CryptoKey, CryptoKeyVersion, KeyRing, VersionState
from valv.core.names import CryptoKeyName, CryptoKeyVersionName, KeyRingName, LocationName
from valv.core.storage.keys import describe, pack, range_of, unpack

SCHEMA_VERSION = 1

# ---- keys -------------------------------------------------------------------


def key_ring_key(name: KeyRingName) -> bytes:
    return pack("kr", name.project, name.location, name.key_ring)


def key_rings_range(parent: LocationName) -> tuple[bytes, bytes]:
    return range_of("kr", parent.project, parent.location)


def crypto_key_key(name: CryptoKeyName) -> bytes:
    return pack("ck", name.project, name.location, name.key_ring, name.crypto_key)


def crypto_keys_range(parent: KeyRingName) -> tuple[bytes, bytes]:
    return range_of("ck", parent.project, parent.location, parent.key_ring)


def version_key(name: CryptoKeyVersionName) -> bytes:
    return pack("cv", name.project, name.location, name.key_ring, name.crypto_key, name.version)


def versions_range(parent: CryptoKeyName) -> tuple[bytes, bytes]:
    return range_of("cv", parent.project, parent.location, parent.key_ring, parent.crypto_key)


def material_key(name: CryptoKeyVersionName) -> bytes:
    return pack("km", name.project, name.location, name.key_ring, name.crypto_key, name.version)


def ctime_index_key(kind: str, parent: tuple[str, ...], create_us: int, child: str | int) -> bytes:
    return pack("ix", "ctime", kind, *parent, create_us, child)


def ctime_index_range(kind: str, parent: tuple[str, ...]) -> tuple[bytes, bytes]:
    return range_of("ix", "ctime", kind, *parent)


def key_ring_count_key(parent: LocationName) -> bytes:
    return pack("n", "kr", parent.project, parent.location)


def crypto_key_count_key(parent: KeyRingName) -> bytes:
    return pack("n", "ck", parent.project, parent.location, parent.key_ring)


ROTATE = "rotate"
DESTROY = "destroy"


def rotation_due_key(due_us: int, name: CryptoKeyName) -> bytes:
    return pack("ix", "due", ROTATE, due_us, name.project, name.location, name.key_ring,
                name.crypto_key)


def destruction_due_key(due_us: int, name: CryptoKeyVersionName) -> bytes:
    return pack("ix", "due", DESTROY, due_us, name.project, name.location, name.key_ring,
                name.crypto_key, name.version)


def due_range(kind: str, until_us: int) -> tuple[bytes, bytes]:
    """Index entries of ``kind`` due at or before ``until_us``."""
    begin, _ = range_of("ix", "due", kind)
    return begin, pack("ix", "due", kind, until_us + 1)


def all_due_range(kind: str) -> tuple[bytes, bytes]:
    return range_of("ix", "due", kind)


def due_time_of(key: bytes) -> int:
    """The due time (microseconds) of a due index entry."""
    return int(unpack(key)[3])


def name_from_due_key(key: bytes) -> CryptoKeyName | CryptoKeyVersionName:
    """The CryptoKey (rotation) or CryptoKeyVersion (destruction) a due entry is for."""
    parts = unpack(key)
    if parts[2] == ROTATE:
        return CryptoKeyName(*parts[4:8])
    return CryptoKeyVersionName(*parts[4:9])


def change_key(seq: int) -> bytes:
    return pack("log", seq)


def changes_range(first_seq: int, end_seq: int | None = None) -> tuple[bytes, bytes]:
    """Change log entries from ``first_seq`` up to (not including) ``end_seq``."""
    _, end = range_of("log")
    return pack("log", first_seq), end if end_seq is None else pack("log", end_seq)


def all_changes_range() -> tuple[bytes, bytes]:
    return range_of("log")


CHANGE_HEAD_KEY = pack("log-head")
CHANGE_EPOCH_KEY = pack("log-epoch")


def seq_of_change_key(key: bytes) -> int:
    return int(unpack(key)[1])


# ---- values -----------------------------------------------------------------


def _parse(cls: type[Any], key: bytes, value: bytes) -> Any:
    try:
        record = cls.parse(value)
    except Exception as exc:  # betterproto raises assorted errors on bad bytes
        raise DataLoss(f"record {describe(key)} could not be decoded: {exc}") from None
    if record.schema_version > SCHEMA_VERSION:
        raise DataLoss(
            f"record {describe(key)} has schema version {record.schema_version}, newer than "
            f"this Valv understands ({SCHEMA_VERSION}); upgrade Valv"
        )
    return record


def encode_key_ring(ring: KeyRing) -> bytes:
    return bytes(pb.KeyRingRecord(schema_version=SCHEMA_VERSION,
                                  create_time_us=to_micros(ring.create_time)))


def decode_key_ring(name: KeyRingName, key: bytes, value: bytes) -> KeyRing:
    record = _parse(pb.KeyRingRecord, key, value)
    return KeyRing(name=name, create_time=from_micros(record.create_time_us))


def encode_version(version: CryptoKeyVersion) -> bytes:
    return bytes(
        pb.CryptoKeyVersionRecord(
            schema_version=SCHEMA_VERSION,
            create_time_us=to_micros(version.create_time),
            state=int(version.state),
            algorithm=version.algorithm,
            protection_level=version.protection_level,
            generate_time_us=_opt_micros(version.generate_time),
            destroy_time_us=_opt_micros(version.destroy_time),
            destroy_event_time_us=_opt_micros(version.destroy_event_time),
        )
    )


def decode_version(name: CryptoKeyVersionName, key: bytes, value: bytes) -> CryptoKeyVersion:
    record = _parse(pb.CryptoKeyVersionRecord, key, value)
    try:
        state = VersionState(record.state)
    except ValueError:
        raise DataLoss(f"record {describe(key)} has unknown state {record.state}") from None
    return CryptoKeyVersion(
        name=name,
        state=state,
        algorithm=record.algorithm,
        protection_level=record.protection_level,
        create_time=from_micros(record.create_time_us),
        generate_time=_opt_time(record.generate_time_us),
        destroy_time=_opt_time(record.destroy_time_us),
        destroy_event_time=_opt_time(record.destroy_event_time_us),
    )


class CryptoKeyState:
    """A CryptoKey as stored: the domain object plus server bookkeeping."""

    __slots__ = ("key", "next_version_id", "primary_version_id")

    def __init__(self, key: CryptoKey, primary_version_id: int, next_version_id: int) -> None:
        self.key = key
        self.primary_version_id = primary_version_id
        self.next_version_id = next_version_id


def encode_crypto_key(state: CryptoKeyState) -> bytes:
    key = state.key
    return bytes(
        pb.CryptoKeyRecord(
            schema_version=SCHEMA_VERSION,
            create_time_us=to_micros(key.create_time),
            purpose=key.purpose,
            primary_version_id=state.primary_version_id,
            next_version_id=state.next_version_id,
            rotation_period_us=0 if key.rotation_period is None
            else _duration_micros(key.rotation_period),
            next_rotation_time_us=_opt_micros(key.next_rotation_time),
            template_algorithm=key.template_algorithm,
            template_protection_level=key.template_protection_level,
            destroy_scheduled_duration_us=_duration_micros(key.destroy_scheduled_duration),
            labels=dict(key.labels),
            import_only=key.import_only,
        )
    )


def decode_crypto_key(name: CryptoKeyName, key: bytes, value: bytes) -> CryptoKeyState:
    record = _parse(pb.CryptoKeyRecord, key, value)
    crypto_key = CryptoKey(
        name=name,
        purpose=record.purpose,
        create_time=from_micros(record.create_time_us),
        template_algorithm=record.template_algorithm,
        template_protection_level=record.template_protection_level,
        destroy_scheduled_duration=timedelta(microseconds=record.destroy_scheduled_duration_us),
        rotation_period=timedelta(microseconds=record.rotation_period_us)
        if record.rotation_period_us else None,
        next_rotation_time=_opt_time(record.next_rotation_time_us),
        labels=dict(record.labels),
        import_only=record.import_only,
    )
    return CryptoKeyState(crypto_key, record.primary_version_id, record.next_version_id)


def encode_count(count: int) -> bytes:
    return bytes(pb.CountRecord(schema_version=SCHEMA_VERSION, count=count))


def decode_count(key: bytes, value: bytes | None) -> int:
    if value is None:
        return 0
    return int(_parse(pb.CountRecord, key, value).count)


def encode_material(rmk_id: str, wrapped_key: bytes) -> bytes:
    return bytes(pb.KeyMaterialRecord(schema_version=SCHEMA_VERSION, rmk_id=rmk_id,
                                      wrapped_key=wrapped_key))


def decode_material(key: bytes, value: bytes) -> tuple[str, bytes]:
    record = _parse(pb.KeyMaterialRecord, key, value)
    return record.rmk_id, record.wrapped_key


def encode_change(seq: int, time_us: int, kind: str, resource: str) -> bytes:
    return bytes(pb.ChangeRecord(schema_version=SCHEMA_VERSION, seq=seq, time_us=time_us,
                                 kind=kind, resource=resource))


def decode_change(key: bytes, value: bytes) -> Any:
    return _parse(pb.ChangeRecord, key, value)


def encode_change_head(last_seq: int, first_seq: int) -> bytes:
    return bytes(pb.ChangeLogHead(schema_version=SCHEMA_VERSION, last_seq=last_seq,
                                  first_seq=first_seq))


def decode_change_head(value: bytes | None) -> tuple[int, int]:
    """(last_seq, first_seq) of the change log; (0, 1) when it is empty and new."""
    if value is None:
        return 0, 1
    head = _parse(pb.ChangeLogHead, CHANGE_HEAD_KEY, value)
    return int(head.last_seq), int(head.first_seq)


def encode_change_epoch(epoch: bytes) -> bytes:
    return bytes(pb.ChangeLogEpoch(schema_version=SCHEMA_VERSION, epoch=epoch))


def decode_change_epoch(value: bytes | None) -> bytes:
    """The change log's epoch; b"" when the store has none (yet)."""
    if value is None:
        return b""
    return bytes(_parse(pb.ChangeLogEpoch, CHANGE_EPOCH_KEY, value).epoch)


def _duration_micros(delta: timedelta) -> int:
    # Durations are kept in microseconds, the precision betterproto2 gives us.
    return delta // timedelta(microseconds=1)


def _opt_micros(when: datetime | None) -> int | None:
    return None if when is None else to_micros(when)


def _opt_time(micros: int | None) -> datetime | None:
    return None if micros is None else from_micros(micros)
