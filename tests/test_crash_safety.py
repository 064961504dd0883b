"""A crash at any moment leaves the store as it was or as it will be (DESIGN.md §6).

Real central processes die by SIGKILL, either at a named point in the middle of
a rotation or destruction transaction (``VALV_FAULT_POINT``, valv/core/faults.py)
or at whatever moment the test kills them. After each crash the store is
opened directly and checked with ``fsck``; a restarted central then finishes
the work, applying each due event exactly once.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc

from tests.helpers import CALL, CentralProcess, wait_for
from tests.test_rotation_processes import (
    DAY,
    DESTROYED,
    ROTATED,
    T0,
    ClockFile,
    Snapshot,
    VState,
    log_entries,
    make_key,
    make_ring,
    messages,
    primaries,
    raw_store_bytes,
    root_keyring,
    snapshot,
    version_id,
    version_states,
)
from valv.core import records
from valv.core.clock import to_micros
from valv.core.crypto.ciphertext import CiphertextCodec
from valv.core.model import VersionState
from valv.core.names import parse_crypto_key, parse_crypto_key_version
from valv.core.scheduler import Scheduler
from valv.core.storage.base import StorageError

EXIT_DEADLINE_S = 15.0


def _central(tmp_path: Path, clock: ClockFile, *, interval: str = "0.05",
             fault: str | None = None) -> CentralProcess:
    return CentralProcess(tmp_path / "c", "--scheduler-interval", interval,
                          "--fake-clock-file", str(clock.path),
                          env={"VALV_FAULT_POINT": fault} if fault else None)


def _wait_killed(central: CentralProcess) -> None:
    assert central.proc is not None
    proc = central.proc
    wait_for(lambda: proc.poll() is not None, deadline_s=EXIT_DEADLINE_S,
             what="central to kill itself at the fault point", interval_s=0.02)
    assert proc.returncode == -signal.SIGKILL, central.logs()


def _restart_without_fault(central: CentralProcess) -> None:
    central.env = {}
    central.start()


# ---- the fault points: a crash between the writes of one transaction ---------------


def test_a_crash_mid_rotation_changes_nothing_and_the_restart_rotates_once(
        tmp_path: Path) -> None:
    clock = ClockFile(tmp_path / "clock")
    central = _central(tmp_path, clock, fault="rotate.mid-transaction").start()
    try:
        kms = central.client()
        ring = make_ring(kms)
        keys = [make_key(kms, ring, f"k{i}", rotation_period=DAY,
                         next_rotation_time=T0 + DAY) for i in range(3)]
        ciphertext = kms.encrypt(request={"name": keys[0], "plaintext": b"dek"},
                                 **CALL).ciphertext
        clock.advance(DAY)  # every key is due: the first rotation kills the process
        _wait_killed(central)

        stored = snapshot(central.data_dir)
        assert stored.problems == []
        for key in keys:
            state = stored.keys[key]
            assert state.versions == {1: VersionState.ENABLED}, key
            assert set(state.materials) == {1}
            assert state.primary == 1 and state.next_version_id == 2
            assert state.next_rotation_time == T0 + DAY
            assert records.rotation_due_key(to_micros(T0 + DAY), parse_crypto_key(key)) \
                in stored.due
        assert messages(log_entries(central), ROTATED) == []

        _restart_without_fault(central)
        kms = central.client()
        wait_for(lambda: all(version_id(k.primary.name) == 2
                             for k in primaries(kms, ring).values()),
                 deadline_s=15, what="every key to rotate after the restart")
        for key in keys:
            assert version_states(kms, key) == [(1, VState.ENABLED), (2, VState.ENABLED)]
            assert kms.get_crypto_key(request={"name": key}, **CALL).next_rotation_time == \
                T0 + 2 * DAY
        # What was encrypted before the crash still decrypts.
        assert kms.decrypt(request={"name": keys[0], "ciphertext": ciphertext},
                           **CALL).plaintext == b"dek"
    finally:
        central.stop()
    after = snapshot(central.data_dir)
    assert after.problems == []
    assert all(after.keys[key].versions == {1: VersionState.ENABLED, 2: VersionState.ENABLED}
               for key in keys)
    rotated = sorted(e["crypto_key"] for e in messages(log_entries(central), ROTATED))
    assert rotated == keys  # once each


def test_a_crash_mid_destruction_keeps_the_material_and_the_restart_destroys_once(
        tmp_path: Path) -> None:
    clock = ClockFile(tmp_path / "clock")
    central = _central(tmp_path, clock, fault="destroy.mid-transaction").start()
    try:
        kms = central.client()
        ring = make_ring(kms)
        key = make_key(kms, ring, "k", destroy_scheduled_duration=DAY)
        v1 = f"{key}/cryptoKeyVersions/1"
        ciphertext = bytes(kms.encrypt(request={"name": key, "plaintext": b"dek"},
                                       **CALL).ciphertext)
        scheduled = kms.destroy_crypto_key_version(request={"name": v1}, **CALL)
        assert scheduled.destroy_time == T0 + DAY
        clock.advance(DAY)
        _wait_killed(central)

        stored = snapshot(central.data_dir)
        assert stored.problems == []
        state = stored.keys[key]
        assert state.versions == {1: VersionState.DESTROY_SCHEDULED}
        assert state.destroy_times == {1: T0 + DAY}
        assert records.destruction_due_key(to_micros(T0 + DAY),
                                           parse_crypto_key_version(v1)) in stored.due
        # The key material is all there: it still opens the ciphertext.
        rmk_id, wrapped = state.materials[1]
        with root_keyring(central.data_dir / "master.key").unwrap_kek(
                rmk_id, wrapped, version_name=v1,
                algorithm="GOOGLE_SYMMETRIC_ENCRYPTION") as kek:
            assert CiphertextCodec().decrypt(kek, key_name=key, version_id=1,
                                             ciphertext=ciphertext, aad=b"") == b"dek"
        assert messages(log_entries(central), DESTROYED) == []

        _restart_without_fault(central)
        kms = central.client()
        wait_for(lambda: kms.get_crypto_key_version(request={"name": v1}, **CALL).state
                 == VState.DESTROYED, deadline_s=15, what="version 1 to be destroyed")
        with pytest.raises(gexc.FailedPrecondition):
            kms.decrypt(request={"name": key, "ciphertext": ciphertext}, **CALL)
    finally:
        central.stop()
    after = snapshot(central.data_dir)
    assert after.problems == []
    assert after.keys[key].versions == {1: VersionState.DESTROYED}
    assert after.keys[key].materials == {}
    assert after.due == {records.rotation_due_key(to_micros(T0 + 30 * DAY),
                                                  parse_crypto_key(key))}
    [entry] = messages(log_entries(central), DESTROYED)
    assert entry["crypto_key_version"] == v1


# ---- kill -9 whenever -------------------------------------------------------------


def _rotation_count(stored: Snapshot) -> int:
    """How many keys have rotated; checks each key is whole, rotated or not."""
    rotated = 0
    for name, state in stored.keys.items():
        if state.primary == 1:
            assert state.versions == {1: VersionState.ENABLED}, name
            assert state.next_rotation_time == T0 + DAY, name
        else:
            assert state.primary == 2, name
            assert state.versions == {1: VersionState.ENABLED, 2: VersionState.ENABLED}, name
            assert state.next_rotation_time == T0 + 2 * DAY, name
            rotated += 1
        assert set(state.materials) == set(state.versions), name
    return rotated


def test_kill_9_at_random_moments_never_leaves_a_half_done_rotation(tmp_path: Path) -> None:
    n_keys, rounds = 200, 5
    rng = random.Random()  # kill moments, not secrets
    clock = ClockFile(tmp_path / "clock")
    central = _central(tmp_path, clock, interval="0.01")
    central.start()
    try:
        kms = central.client()
        ring = make_ring(kms)
        keys = [make_key(kms, ring, f"k{i:03d}", rotation_period=DAY, next_rotation_time=T0 + DAY)
                for i in range(n_keys)]
    finally:
        central.stop()
    clock.advance(DAY)  # all due at once

    rotated = 0
    killed_mid_work = 0
    for _ in range(rounds):
        logged_before = len(central.logs().splitlines())
        # Kill after a random number (>= 1) of this process's rotations show in its log.
        target = rng.randint(1, 8)

        def progressed(logged_before: int = logged_before, target: int = target) -> bool:
            new_lines = central.logs().splitlines()[logged_before:]
            return sum(ROTATED in line for line in new_lines) >= target

        central.start()
        wait_for(progressed, deadline_s=15, what="a rotation in this round",
                 interval_s=0.002)
        central.stop(signal.SIGKILL)
        assert central.proc is not None and central.proc.returncode == -signal.SIGKILL

        stored = snapshot(central.data_dir)
        assert stored.problems == []
        now_rotated = _rotation_count(stored)
        assert now_rotated > rotated
        rotated = now_rotated
        killed_mid_work += rotated < n_keys
    # The kills were mid-way through the due work, not after it.
    assert killed_mid_work >= 3, rotated

    central.start()
    try:
        kms = central.client()
        wait_for(lambda: all(version_id(k.primary.name) == 2
                             for k in primaries(kms, ring).values()),
                 deadline_s=30, what="every key to rotate", interval_s=0.05)
    finally:
        central.stop()
    stored = snapshot(central.data_dir)
    assert stored.problems == []
    assert sorted(stored.keys) == keys
    assert _rotation_count(stored) == n_keys
    assert stored.due == {records.rotation_due_key(to_micros(T0 + 2 * DAY),
                                                   parse_crypto_key(key)) for key in keys}
    # A process killed between commit and log line leaves a rotation unlogged,
    # but no rotation is ever logged twice.
    logged = [e["crypto_key"] for e in messages(log_entries(central), ROTATED)]
    assert len(logged) == len(set(logged))
    assert set(logged) <= set(keys)


# ---- a crash between destroying and erasing -----------------------------------------

# The scheduler's destroy transaction, then the process dies before the erase
# (checkpoint) that follows it: no close, so nothing else checkpoints either.
_DESTROY_THEN_DIE = """
import asyncio, os, sys
from valv.core import records
from valv.core.clock import FileClock
from valv.core.crypto.rootkey import RootKeyring, load_root_key_file
from valv.core.keystore import KeyStore
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

async def main():
    db, master, clock = sys.argv[1:]
    ring = RootKeyring([load_root_key_file(master)])
    keystore = KeyStore(SealedStore(SqliteStore(db), Sealer(ring)), ring, FileClock(clock))
    [entry] = await keystore.due_entries(records.DESTROY, 10)
    assert (await keystore.apply_due(entry)).version is not None
    os._exit(0)

asyncio.run(main())
"""


def test_material_destroyed_just_before_a_crash_is_erased_after_the_restart(
        tmp_path: Path) -> None:
    clock = ClockFile(tmp_path / "clock")
    central = _central(tmp_path, clock).start()
    db = central.data_dir / "valv.db"
    try:
        kms = central.client()
        key = make_key(kms, make_ring(kms), "k", destroy_scheduled_duration=DAY)
        v1 = f"{key}/cryptoKeyVersions/1"
        kms.destroy_crypto_key_version(request={"name": v1}, **CALL)
    finally:
        central.stop()
    packed = records.material_key(parse_crypto_key_version(v1))
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        sealed = bytes(conn.execute("SELECT v FROM kv WHERE k = ?", (packed,)).fetchone()[0])
    assert sealed in raw_store_bytes(db)

    clock.advance(DAY)
    subprocess.run([sys.executable, "-c", _DESTROY_THEN_DIE, str(db),
                    str(central.data_dir / "master.key"), str(clock.path)],
                   check=True, timeout=30)
    # Left behind: the old page still holds the material (opening the store
    # here would checkpoint it away on close, so only the raw bytes are read).
    assert sealed in raw_store_bytes(db)

    central.start()  # nothing else is ever destroyed: the erase must not wait for that
    try:
        wait_for(lambda: sealed not in raw_store_bytes(db), deadline_s=10,
                 what="the destroyed material to be erased from the database and its WAL")
        assert central.client().get_crypto_key_version(
            request={"name": v1}, **CALL).state == VState.DESTROYED
    finally:
        central.stop()
    assert messages(log_entries(central), DESTROYED) == []  # it was destroyed once, before
    stored = snapshot(central.data_dir)
    assert stored.problems == []
    assert stored.keys[key].versions == {1: VersionState.DESTROYED}
    assert stored.keys[key].materials == {}


class _EraseFails:
    """A keystore with nothing due whose erase fails until told otherwise."""

    def __init__(self) -> None:
        self.erases = 0
        self.failing = True

    async def due_entries(self, kind: str, limit: int) -> list[bytes]:
        return []

    async def erase_freed_space(self) -> None:
        self.erases += 1
        if self.failing:
            raise StorageError("checkpoint incomplete: another connection is using the WAL")


async def test_a_failed_erase_is_retried_at_the_next_tick() -> None:
    keystore = _EraseFails()
    scheduler = Scheduler(keystore, interval_s=1)  # type: ignore[arg-type]
    await scheduler.tick()  # the first tick erases (a crash may have left bytes behind)
    assert keystore.erases == 1
    keystore.failing = False
    await scheduler.tick()  # it failed: tried again
    assert keystore.erases == 2
    await scheduler.tick()  # done: nothing more to erase
    assert keystore.erases == 2
