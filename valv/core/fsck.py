"""A consistency check of the whole keyspace.

Checks the invariants every transaction must keep, so tests (and operators,
through ``valv fsck``) can tell that a crash, a bug or an edit left nothing
half-done:

- every CryptoKey's primary points at an existing version, and its
  next_version_id is above every version it has;
- every version belongs to an existing key and has key material, unless it
  is DESTROYED, in which case its material is gone;
- no key material without its version;
- the rotation and destruction indexes hold exactly one entry per record
  that is due, at the record's due time, and nothing else;
- the per-parent counters behind List's total_size match the records;
- the change log holds exactly the seqs from its head's first_seq to its
  last_seq, each entry under its own seq;
- every record unseals and decodes.

It reads the keyspace in one read-only transaction, so it sees one instant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from valv.core import records
from valv.core.clock import to_micros
from valv.core.model import VersionState
from valv.core.names import CryptoKeyName, CryptoKeyVersionName, KeyRingName, LocationName
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import describe, range_of, unpack

_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class Problem:
    record: str
    issue: str

    def __str__(self) -> str:
        return f"{self.record}: {self.issue}"


def _scan(tr: Transaction, *prefix: str) -> Iterator[tuple[bytes, bytes]]:
    begin, end = range_of(*prefix)
    while True:
        chunk = tr.get_range(begin, end, limit=_CHUNK)
        yield from chunk
        if len(chunk) < _CHUNK:
            return
        begin = chunk[-1][0] + b"\x00"


def check_body(tr: Transaction) -> list[Problem]:
    problems: list[Problem] = []

    def problem(key: bytes, issue: str) -> None:
        problems.append(Problem(describe(key), issue))

    keys: dict[CryptoKeyName, records.CryptoKeyState] = {}
    for key, value in _scan(tr, "ck"):
        try:
            key_name = CryptoKeyName(*unpack(key)[1:])
            keys[key_name] = records.decode_crypto_key(key_name, key, value)
        except Exception as exc:
            problem(key, f"does not decode: {exc}")

    versions: dict[CryptoKeyVersionName, VersionState] = {}
    expected_due: set[bytes] = set()
    for key, value in _scan(tr, "cv"):
        try:
            version_name = CryptoKeyVersionName(*unpack(key)[1:])
            version = records.decode_version(version_name, key, value)
        except Exception as exc:
            problem(key, f"does not decode: {exc}")
            continue
        versions[version_name] = version.state
        parent = keys.get(version_name.parent)
        if parent is None:
            problem(key, "version of a CryptoKey that does not exist")
        elif version_name.version >= parent.next_version_id:
            problem(key, f"version id is not below the key's next_version_id "
                         f"{parent.next_version_id}")
        if version.state == VersionState.DESTROY_SCHEDULED:
            if version.destroy_time is None:
                problem(key, "DESTROY_SCHEDULED without a destroy_time")
            else:
                expected_due.add(records.destruction_due_key(to_micros(version.destroy_time),
                                                             version_name))

    materials: set[CryptoKeyVersionName] = set()
    for key, value in _scan(tr, "km"):
        material_name = CryptoKeyVersionName(*unpack(key)[1:])
        materials.add(material_name)
        try:
            records.decode_material(key, value)
        except Exception as exc:
            problem(key, f"does not decode: {exc}")
        state = versions.get(material_name)
        if state is None:
            problem(key, "key material without a version record")
        elif state == VersionState.DESTROYED:
            problem(key, "key material of a DESTROYED version was not erased")
    for version_name, state in versions.items():
        if state != VersionState.DESTROYED and version_name not in materials:
            problem(records.version_key(version_name),
                    f"{state.name} version without key material")

    for key_name, state_record in keys.items():
        key_key = records.crypto_key_key(key_name)
        primary = state_record.primary_version_id
        if primary and key_name.version(primary) not in versions:
            problem(key_key, f"primary version {primary} does not exist")
        due = state_record.key.next_rotation_time
        if due is not None:
            expected_due.add(records.rotation_due_key(to_micros(due), key_name))

    # The child counters behind List's total_size.
    rings_per_location: dict[tuple[str, str], int] = {}
    for key, _ in _scan(tr, "kr"):
        _, project, location, _ring = unpack(key)
        rings_per_location[(project, location)] = rings_per_location.get((project, location), 0) + 1
    keys_per_ring: dict[tuple[str, str, str], int] = {}
    for key_name in keys:
        where = (key_name.project, key_name.location, key_name.key_ring)
        keys_per_ring[where] = keys_per_ring.get(where, 0) + 1
    counted: dict[bytes, int] = {}
    for (project, location), n in rings_per_location.items():
        counted[records.key_ring_count_key(LocationName(project, location))] = n
    for (project, location, ring), n in keys_per_ring.items():
        counted[records.crypto_key_count_key(KeyRingName(project, location, ring))] = n
    stored: dict[bytes, int] = {}
    for key, value in _scan(tr, "n"):
        try:
            stored[key] = records.decode_count(key, value)
        except Exception as exc:
            problem(key, f"does not decode: {exc}")
    for key in sorted(set(counted) | set(stored)):
        if counted.get(key, 0) != stored.get(key, 0):
            problem(key, f"count is {stored.get(key, 0)} but there are {counted.get(key, 0)}")

    found_due = {key for kind in (records.ROTATE, records.DESTROY)
                 for key, _ in _scan(tr, "ix", "due", kind)}
    for key in sorted(expected_due - found_due):
        problem(key, "missing due index entry")
    for key in sorted(found_due - expected_due):
        problem(key, "orphaned due index entry")
    _check_change_log(tr, problem)
    return problems


def _check_change_log(tr: Transaction, problem: Callable[[bytes, str], None]) -> None:
    try:
        last_seq, first_seq = records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))
    except Exception as exc:
        problem(records.CHANGE_HEAD_KEY, f"does not decode: {exc}")
        return
    expected = first_seq
    for key, value in _scan(tr, "log"):
        seq = records.seq_of_change_key(key)
        try:
            record = records.decode_change(key, value)
        except Exception as exc:
            problem(key, f"does not decode: {exc}")
        else:
            if record.seq != seq:
                problem(key, f"change log entry says seq {record.seq}")
        if seq < first_seq or seq > last_seq:
            problem(key, f"change log entry outside the head's range {first_seq}..{last_seq}")
            continue
        if seq != expected:
            problem(key, f"change log gap: seqs {expected}..{seq - 1} are missing")
        expected = seq + 1
    if expected <= last_seq:
        problem(records.CHANGE_HEAD_KEY,
                f"change log gap: seqs {expected}..{last_seq} are missing")


async def check(store: Store) -> list[Problem]:
    """Every consistency problem in ``store`` (a sealed store), empty if none."""
    return await store.run(check_body, read_only=True)
