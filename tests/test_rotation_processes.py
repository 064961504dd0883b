"""Rotation and destruction seen from outside: real central processes, Google's client.

DESIGN.md §6: background work is transactional and idempotent, and any number
of centrals may run it against one store with each due event happening
exactly once. The in-process unit tests live in test_scheduler.py; here the
same promises are checked end to end, on the system clock and (for jumps of
days) on the file clock that ``--fake-clock-file`` gives real processes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import fdb.tuple
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess, wait_for
from valv.core import fsck, records
from valv.core.clock import to_micros
from valv.core.crypto.rootkey import RootKeyring, load_root_key_file
from valv.core.model import VersionState
from valv.core.names import CryptoKeyName, CryptoKeyVersionName, parse_crypto_key
from valv.core.storage.base import Transaction
from valv.core.storage.keys import range_of, unpack
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
VState = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
DAY = timedelta(days=1)
# The file clock's starting point: any fixed time far from the real one.
T0 = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
ROTATED = "rotated CryptoKey"
DESTROYED = "destroyed CryptoKeyVersion"
T = TypeVar("T")


# ---- shared helpers (test_crash_safety.py uses them too) ------------------------


class ClockFile:
    """The time every ``--fake-clock-file`` central reads; replaced atomically."""

    def __init__(self, path: Path, start: datetime = T0) -> None:
        self.path = path
        self.now = start
        self.set(start)

    def set(self, when: datetime) -> None:
        self.now = when
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(when.isoformat())
        os.replace(tmp, self.path)  # a reader never sees a half-written time

    def advance(self, delta: timedelta) -> datetime:
        self.set(self.now + delta)
        return self.now


def make_ring(kms: Client, project: str = "p") -> str:
    return str(kms.create_key_ring(
        request={"parent": f"projects/{project}/locations/global", "key_ring_id": "ring",
                 "key_ring": {}}, **CALL).name)


def make_key(kms: Client, ring: str, key_id: str, **crypto_key: Any) -> str:
    return str(kms.create_crypto_key(
        request={"parent": ring, "crypto_key_id": key_id,
                 "crypto_key": {"purpose": ENCRYPT_DECRYPT, **crypto_key}}, **CALL).name)


def version_id(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


def primaries(kms: Client, ring: str) -> dict[str, kms_v1.CryptoKey]:
    return {k.name: k for k in kms.list_crypto_keys(
        request={"parent": ring, "page_size": 1000}, **CALL)}


def version_states(kms: Client, key: str) -> list[tuple[int, VState]]:
    return [(version_id(v.name), v.state) for v in kms.list_crypto_key_versions(
        request={"parent": key, "page_size": 1000}, **CALL)]


def log_entries(*centrals: CentralProcess) -> list[dict[str, Any]]:
    """Every line the centrals wrote, each of which must be one JSON object."""
    entries = []
    for central in centrals:
        for line in central.logs().splitlines():
            if line.strip():
                entry = json.loads(line)  # a non-JSON line fails the test here
                assert isinstance(entry, dict), line
                entries.append(entry)
    return entries


def messages(entries: list[dict[str, Any]], msg: str) -> list[dict[str, Any]]:
    return [e for e in entries if e.get("msg") == msg]


def shared_store_args(data_dir: Path) -> tuple[str, ...]:
    """Flags for another central on the store and dev root key of ``data_dir``'s central."""
    return ("--store", f"sqlite://{(data_dir / 'valv.db').absolute()}",
            "--master-key-file", str(data_dir / "master.key"))


@dataclass
class StoredKey:
    """One CryptoKey as it is in storage, read directly (no central involved)."""

    primary: int
    next_version_id: int
    next_rotation_time: datetime | None
    versions: dict[int, VersionState] = field(default_factory=dict)
    destroy_times: dict[int, datetime | None] = field(default_factory=dict)
    # version id -> (rmk_id, wrapped KEK)
    materials: dict[int, tuple[str, bytes]] = field(default_factory=dict)


@dataclass
class Snapshot:
    keys: dict[str, StoredKey]
    due: set[bytes]
    problems: list[str]


def _scan(tr: Transaction, *prefix: str) -> list[tuple[bytes, bytes]]:
    begin, end = range_of(*prefix)
    return tr.get_range(begin, end)


def _snapshot_body(tr: Transaction) -> tuple[dict[str, StoredKey], set[bytes]]:
    keys: dict[str, StoredKey] = {}
    for k, v in _scan(tr, "ck"):
        name = CryptoKeyName(*unpack(k)[1:])
        state = records.decode_crypto_key(name, k, v)
        keys[str(name)] = StoredKey(state.primary_version_id, state.next_version_id,
                                    state.key.next_rotation_time)
    for k, v in _scan(tr, "cv"):
        version_name = CryptoKeyVersionName(*unpack(k)[1:])
        version = records.decode_version(version_name, k, v)
        stored = keys[str(version_name.parent)]
        stored.versions[version_name.version] = version.state
        stored.destroy_times[version_name.version] = version.destroy_time
    for k, v in _scan(tr, "km"):
        version_name = CryptoKeyVersionName(*unpack(k)[1:])
        keys[str(version_name.parent)].materials[version_name.version] = \
            records.decode_material(k, v)
    due = {k for k, _ in _scan(tr, "ix", "due")}
    return keys, due


def root_keyring(master_key: Path) -> RootKeyring:
    return RootKeyring([load_root_key_file(master_key)])


def open_sealed(db: Path, master_key: Path,
                use: Callable[[SealedStore], Any]) -> Any:
    """Run ``use(store)`` (a coroutine function) on the sealed store in ``db``."""
    async def run() -> Any:
        store = SealedStore(SqliteStore(db), Sealer(root_keyring(master_key)))
        try:
            return await use(store)
        finally:
            await store.close()

    return asyncio.run(run())


def snapshot(data_dir: Path) -> Snapshot:
    """fsck and the whole keyspace of the (stopped or killed) central in ``data_dir``."""
    async def use(store: SealedStore) -> Snapshot:
        problems = [str(p) for p in await fsck.check(store)]
        keys, due = await store.run(_snapshot_body, read_only=True)
        return Snapshot(keys, due, problems)

    result: Snapshot = open_sealed(data_dir / "valv.db", data_dir / "master.key", use)
    return result


def key_bytes_in_clear(data_dir: Path, keys: dict[str, StoredKey]) -> list[bytes]:
    """Every form in which a KEK of ``keys`` could leak: wrapped, raw, hex, base64."""
    ring = root_keyring(data_dir / "master.key")
    forms: list[bytes] = []
    for name, stored in keys.items():
        for version, (rmk_id, wrapped) in stored.materials.items():
            with ring.unwrap_kek(rmk_id, wrapped, version_name=f"{name}/cryptoKeyVersions/"
                                 f"{version}", algorithm="GOOGLE_SYMMETRIC_ENCRYPTION") as kek:
                raw = bytes(kek)
            forms += [raw, raw.hex().encode(), base64.b64encode(raw), wrapped,
                      base64.b64encode(wrapped), wrapped.hex().encode()]
    return forms


# ---- system clock -----------------------------------------------------------------


def test_a_key_rotates_on_its_next_rotation_time(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", "--scheduler-interval", "0.2").start()
    try:
        kms = central.client()
        ring = make_ring(kms)
        due = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
        key = make_key(kms, ring, "k", rotation_period=DAY, next_rotation_time=due)
        created = kms.get_crypto_key(request={"name": key}, **CALL)
        assert version_id(created.primary.name) == 1
        assert created.next_rotation_time == due

        def rotated() -> kms_v1.CryptoKey | None:
            got = kms.get_crypto_key(request={"name": key}, **CALL)
            return got if version_id(got.primary.name) != 1 else None

        got = wait_for(rotated, deadline_s=15, what="the key to rotate", interval_s=0.05)
        assert datetime.now(UTC) >= due
        assert version_id(got.primary.name) == 2
        assert got.primary.state == VState.ENABLED
        assert got.next_rotation_time == due + DAY
        assert got.rotation_period == DAY
        assert version_states(kms, key) == [(1, VState.ENABLED), (2, VState.ENABLED)]
        # What a user sees: new ciphertexts come from the new primary.
        encrypted = kms.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)
        assert version_id(encrypted.name) == 2
    finally:
        central.stop()
    rotations = messages(log_entries(central), ROTATED)
    assert [(e["crypto_key"], e["new_primary"]) for e in rotations] == [
        (key, f"{key}/cryptoKeyVersions/2")]


def test_a_version_is_destroyed_at_its_destroy_time(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", "--min-destroy-duration", "1",
                             "--scheduler-interval", "0.2").start()
    try:
        kms = central.client()
        ring = make_ring(kms)
        key = make_key(kms, ring, "k", destroy_scheduled_duration=timedelta(seconds=1))
        v1 = f"{key}/cryptoKeyVersions/1"
        ciphertext = kms.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL).ciphertext
        scheduled = kms.destroy_crypto_key_version(request={"name": v1}, **CALL)
        assert scheduled.state == VState.DESTROY_SCHEDULED
        assert scheduled.destroy_time is not None

        def destroyed() -> kms_v1.CryptoKeyVersion | None:
            got = kms.get_crypto_key_version(request={"name": v1}, **CALL)
            return got if got.state == VState.DESTROYED else None

        got = wait_for(destroyed, deadline_s=15, what="version 1 to be destroyed",
                       interval_s=0.05)
        assert got.destroy_event_time is not None
        assert got.destroy_event_time >= scheduled.destroy_time
        with pytest.raises(gexc.FailedPrecondition):
            kms.decrypt(request={"name": key, "ciphertext": ciphertext}, **CALL)
        # Destroyed is not deleted: the version is still listed, for the record.
        assert version_states(kms, key) == [(1, VState.DESTROYED)]
        with pytest.raises(gexc.FailedPrecondition):
            kms.restore_crypto_key_version(request={"name": v1}, **CALL)

        for too_short in (timedelta(milliseconds=500), timedelta(0)):
            with pytest.raises(gexc.InvalidArgument, match="destroy_scheduled_duration"):
                make_key(kms, ring, "short", destroy_scheduled_duration=too_short)
        with pytest.raises(gexc.InvalidArgument, match="destroy_scheduled_duration"):
            make_key(kms, ring, "long", destroy_scheduled_duration=timedelta(days=121))
    finally:
        central.stop()
    [entry] = messages(log_entries(central), DESTROYED)
    assert entry["crypto_key_version"] == v1


def raw_store_bytes(db: Path) -> bytes:
    """The database file and its WAL, as bytes on disk."""
    out = b""
    for path in (db, Path(f"{db}-wal")):
        if path.exists():
            out += path.read_bytes()
    return out


def test_destruction_erases_the_wrapped_kek_from_the_file_and_the_wal(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", "--min-destroy-duration", "1",
                             "--scheduler-interval", "0.2").start()
    db = central.data_dir / "valv.db"
    try:
        kms = central.client()
        ring = make_ring(kms, "erase")
        key = make_key(kms, ring, "k", destroy_scheduled_duration=timedelta(seconds=1))
        keep = make_key(kms, ring, "keep")
        kms.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)

        def sealed_material(key_id: str) -> bytes:
            packed = fdb.tuple.pack(("km", "erase", "global", "ring", key_id, 1))
            with closing(sqlite3.connect(db, isolation_level=None)) as conn:
                row = conn.execute("SELECT v FROM kv WHERE k = ?", (packed,)).fetchone()
            assert row is not None
            return bytes(row[0])

        doomed, kept = sealed_material("k"), sealed_material("keep")
        assert len(doomed) >= 48
        pieces = (doomed, doomed[len(doomed) // 2:len(doomed) // 2 + 16])
        raw = raw_store_bytes(db)
        assert all(piece in raw for piece in pieces)  # the grep finds it while it exists

        kms.destroy_crypto_key_version(request={"name": f"{key}/cryptoKeyVersions/1"}, **CALL)
        wait_for(lambda: kms.get_crypto_key_version(
            request={"name": f"{key}/cryptoKeyVersions/1"}, **CALL).state == VState.DESTROYED,
            deadline_s=15, what="version 1 to be destroyed", interval_s=0.05)
        # Erased while serving (the scheduler checkpoints after destroying), not
        # only when the process exits.
        wait_for(lambda: not any(piece in raw_store_bytes(db) for piece in pieces),
                 deadline_s=10, what="the wrapped KEK to leave the database and its WAL")
        assert kms.get_crypto_key(request={"name": keep}, **CALL).primary.state == \
            VState.ENABLED
    finally:
        central.stop()
    raw = raw_store_bytes(db)
    for piece in pieces:
        assert piece not in raw
    assert kept in raw  # the other key's material is untouched (and the grep still works)


# ---- three centrals on one store, on the file clock ---------------------------------


def test_three_centrals_rotate_each_key_exactly_once_per_period(tmp_path: Path) -> None:
    clock = ClockFile(tmp_path / "clock")
    common = ("--scheduler-interval", "0.05", "--fake-clock-file", str(clock.path))
    first = CentralProcess(tmp_path / "c0", *common).start()  # creates the store and dev key
    centrals = [first] + [
        CentralProcess(tmp_path / f"c{i}", *common, *shared_store_args(first.data_dir))
        for i in (1, 2)]
    try:
        for central in centrals[1:]:
            central.start()
        clients = [central.client() for central in centrals]
        ring = make_ring(clients[0])
        keys = [make_key(clients[i % 3], ring, f"k{i:02d}", rotation_period=DAY,
                         next_rotation_time=T0 + DAY)
                for i in range(30)]
        for created in primaries(clients[0], ring).values():
            assert created.create_time == T0 and created.next_rotation_time == T0 + DAY

        # (clock, primary version every key must reach, next_rotation_time after it)
        steps = [(T0 + n * DAY, n + 1, T0 + (n + 1) * DAY) for n in range(1, 6)]
        # Down for 2.5 periods: one rotation, not a burst; the schedule stays on its grid.
        steps.append((T0 + 8 * DAY + DAY / 2, 7, T0 + 9 * DAY))
        expected_next: dict[int, datetime] = {}
        for step, (now, primary, next_time) in enumerate(steps):
            clock.set(now)
            expected_next[primary] = next_time
            kms = clients[step % 3]

            def all_rotated(kms: Client = kms, primary: int = primary
                            ) -> dict[str, kms_v1.CryptoKey] | None:
                got = primaries(kms, ring)
                ids = Counter(version_id(k.primary.name) for k in got.values())
                assert set(ids) <= {primary - 1, primary}, ids  # never ahead
                return got if ids == {primary: len(keys)} else None

            got = wait_for(all_rotated, deadline_s=20, what=f"every key to reach v{primary}",
                           interval_s=0.02)
            for got_key in got.values():
                assert got_key.next_rotation_time == next_time, got_key.name

        for i, key in enumerate(keys):
            assert version_states(clients[i % 3], key) == [
                (n, VState.ENABLED) for n in range(1, 8)], key
    finally:
        for central in reversed(centrals):
            central.stop()

    stored = snapshot(first.data_dir)
    assert stored.problems == []
    assert sorted(stored.keys) == keys
    for key in keys:
        assert stored.keys[key].primary == 7 and stored.keys[key].next_version_id == 8
        assert stored.keys[key].next_rotation_time == T0 + 9 * DAY
    assert stored.due == {records.rotation_due_key(to_micros(T0 + 9 * DAY),
                                                   parse_crypto_key(key)) for key in keys}

    # The logs of the three together: one line per (key, rotation), whoever did it.
    entries = log_entries(*centrals)
    rotations = messages(entries, ROTATED)
    per_event = Counter((e["crypto_key"], e["new_primary"]) for e in rotations)
    assert per_event == Counter({(key, f"{key}/cryptoKeyVersions/{n}"): 1
                                 for key in keys for n in range(2, 8)})
    for entry in rotations:
        assert set(entry) == {"time", "level", "logger", "msg", "crypto_key", "new_primary",
                              "next_rotation_time"}
        assert entry["level"] == "info" and entry["logger"] == "valv.scheduler"
        assert entry["next_rotation_time"] == \
            expected_next[version_id(entry["new_primary"])].isoformat()

    # No key bytes in any log, in any encoding.
    for entry in entries:
        for name in entry:
            assert not any(word in name.lower() for word in ("wrapped", "material", "kek")), \
                entry
    text = "\n".join(c.logs() for c in centrals).encode()
    for secret in key_bytes_in_clear(first.data_dir, stored.keys):
        assert secret not in text


# ---- configuration ------------------------------------------------------------------------


def test_central_help_documents_the_scheduler_settings() -> None:
    result = subprocess.run([sys.executable, "-m", "valv", "central", "--help"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "COLUMNS": "200"}, check=True)
    for text in ("--scheduler-interval", "VALV_SCHEDULER_INTERVAL", "--min-destroy-duration",
                 "VALV_MIN_DESTROY_DURATION"):
        assert text in result.stdout
