"""The change log: written with each change, followed by every central."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.protobuf import field_mask_pb2

from tests.helpers import CALL, CentralProcess, wait_for
from tests.keystore_fixtures import open_keystore
from valv.core import changelog, fsck, records
from valv.core.clock import FakeClock
from valv.core.errors import FailedPrecondition
from valv.core.iam import BindingInput, IamPolicies
from valv.core.keystore import KeyStore, NewCryptoKey
from valv.core.model import VersionState
from valv.core.scheduler import Scheduler
from valv.core.storage import journal
from valv.core.storage.base import Transaction

LOCATION = "projects/p/locations/global"
RING = f"{LOCATION}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
V1 = f"{KEY}/cryptoKeyVersions/1"


async def _setup(ks: KeyStore) -> None:
    await ks.create_key_ring(LOCATION, "r")
    await ks.create_crypto_key(RING, "k", NewCryptoKey(purpose=1))


async def _all(ks: KeyStore) -> list[tuple[int, str, str]]:
    batch = await changelog.read_since(ks._store, 0)
    return [(c.seq, c.kind, c.resource) for c in batch.changes]


@pytest.mark.parametrize("versionstamps", [False, True], ids=["seqs", "staged"])
async def test_each_change_appends_its_entry(tmp_path: Path, versionstamps: bool) -> None:
    """Staged (FoundationDB's way, SQLite emulating versionstamps): the same log once
    sequenced, and nothing visible before."""
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock,
                             versionstamps=versionstamps) as (ks, store):
        await _setup(ks)
        await ks.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)
        await ks.create_crypto_key_version(KEY)
        await ks.update_crypto_key_version(f"{KEY}/cryptoKeyVersions/2", ["state"],
                                           VersionState.ENABLED)
        await ks.update_primary_version(KEY, "2")
        await ks.destroy_crypto_key_version(V1)
        await ks.restore_crypto_key_version(V1)
        await IamPolicies(ks, clock).set_policy(
            KEY, [BindingInput("roles/cloudkms.viewer", ["user:a@example.com"])], etag=b"")
        if versionstamps:
            assert await _all(ks) == [] and await changelog.head(store) == 0
            assert await changelog.sequence(store) == 9
            assert await changelog.sequence(store) == 0
        assert await _all(ks) == [
            (1, "key_ring", RING),
            (2, "crypto_key", KEY),
            (3, "version", V1),
            (4, "version", f"{KEY}/cryptoKeyVersions/2"),
            (5, "version", f"{KEY}/cryptoKeyVersions/2"),
            (6, "crypto_key", KEY),
            (7, "version", V1),
            (8, "version", V1),
            (9, "iam", KEY),
        ]
        assert await changelog.head(store) == 9
        assert await fsck.check(store) == []


async def test_a_change_that_fails_leaves_no_entry(tmp_path: Path) -> None:
    async with open_keystore(tmp_path / "db", FakeClock()) as (ks, store):
        await _setup(ks)

        def refuse(tr: Transaction, call: object, outcome: object = None) -> None:
            raise RuntimeError("audit refused")

        ks.change_hook = refuse
        with pytest.raises(RuntimeError):
            await ks.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)
        with pytest.raises(FailedPrecondition):  # the body itself refuses
            await ks.restore_crypto_key_version(V1)
        assert await changelog.head(store) == 2
        assert [seq for seq, _, _ in await _all(ks)] == [1, 2]
        assert await fsck.check(store) == []


async def test_scheduler_changes_are_logged(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)  # default rotation: 30 days
        clock.advance(timedelta(days=31))
        report = await Scheduler(ks).tick()
        assert len(report.rotated) == 1
        assert (await _all(ks))[-2:] == [(3, "version", f"{KEY}/cryptoKeyVersions/2"),
                                         (4, "crypto_key", KEY)]
        assert await fsck.check(store) == []


async def test_a_follower_brings_a_change_through_another_central(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock, use_cache_ttl=timedelta(seconds=60)) as (a, _), \
            open_keystore(db, clock, use_cache_ttl=timedelta(seconds=60)) as (b, b_store):
        await _setup(a)
        follower = changelog.ChangeFollower(b_store, clock, [b])
        await follower.start()
        await b.encrypt(KEY, b"dek", b"")  # b caches the key for 60 s
        await a.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)
        await b.encrypt(KEY, b"dek", b"")  # still cached: no follower poll yet
        assert await follower.poll() == 1
        with pytest.raises(FailedPrecondition):
            await b.encrypt(KEY, b"dek", b"")


async def test_the_follower_drops_cached_policies(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock) as (a, _), open_keystore(db, clock) as (b, b_store):
        await _setup(a)
        iam_a, iam_b = IamPolicies(a, clock, cache_ttl_s=60), IamPolicies(b, clock, cache_ttl_s=60)
        follower = changelog.ChangeFollower(b_store, clock, [b, iam_b])
        await follower.start()
        key_name = (await b.get_crypto_key(KEY)).name
        perm = "cloudkms.cryptoKeys.get"
        assert not await iam_b.allowed("user:a@example.com", key_name, perm)  # now cached
        await iam_a.set_policy(
            KEY, [BindingInput("roles/cloudkms.viewer", ["user:a@example.com"])], etag=b"")
        assert not await iam_b.allowed("user:a@example.com", key_name, perm)
        await follower.poll()
        assert await iam_b.allowed("user:a@example.com", key_name, perm)


async def test_seqs_have_no_gaps_under_concurrent_changes(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock) as (a, store), open_keystore(db, clock) as (b, _):
        await _setup(a)
        await asyncio.gather(*(ks.create_crypto_key_version(KEY)
                               for _ in range(10) for ks in (a, b)))
        entries = await _all(a)
        assert [seq for seq, _, _ in entries] == list(range(1, 23))
        assert sorted(r for _, kind, r in entries if kind == "version") == sorted(
            f"{KEY}/cryptoKeyVersions/{n}" for n in range(2, 22))
        assert await fsck.check(store) == []


async def test_trimming_and_gap_reporting(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)  # seqs 1, 2
        clock.advance(timedelta(hours=2))
        await ks.create_crypto_key_version(KEY)  # seq 3, recent
        assert await changelog.trim(store, clock, batch=1) == 2
        assert await fsck.check(store) == []
        assert [seq for seq, _, _ in await _all(ks)] == [3]
        behind = await changelog.read_since(store, 0)
        assert behind.gap and [c.seq for c in behind.changes] == [3]
        assert behind.last_seq == 3
        current = await changelog.read_since(store, 2)
        assert not current.gap and [c.seq for c in current.changes] == [3]
        assert await changelog.read_since(store, 3) == changelog.ChangeBatch([], 3, False)
        ahead = await changelog.read_since(store, 9)  # e.g. a store restored from backup
        assert ahead.gap and ahead.last_seq == 3
        # Appends continue after the trimmed seqs.
        await ks.create_crypto_key_version(KEY)
        assert await changelog.head(store) == 4
        assert await fsck.check(store) == []


async def test_followers_trim_the_write_journal_too(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)
        old = await journal.head(store)
        clock.advance(timedelta(hours=2))
        await ks.create_crypto_key_version(KEY)
        follower = changelog.ChangeFollower(store, clock, [ks], trim_interval_s=3600)
        await follower.start()
        stop = asyncio.Event()
        running = asyncio.create_task(follower.run(stop))  # trims on its first round

        async def journal_trimmed() -> bool:
            batch = await store.run(lambda tr: journal.read_since_body(tr, 0), read_only=True)
            return batch.gap and batch.entries[0].seq > old  # the old entries are gone

        try:
            async with asyncio.timeout(10):
                while not await journal_trimmed():
                    await asyncio.sleep(0.01)
        finally:
            stop.set()
            await running


async def test_staged_changes_through_two_centrals_reach_each_others_followers(
        tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock, versionstamps=True,
                             use_cache_ttl=timedelta(seconds=60)) as (a, a_store), \
            open_keystore(db, clock, versionstamps=True,
                          use_cache_ttl=timedelta(seconds=60)) as (b, b_store):
        await _setup(a)
        follower = changelog.ChangeFollower(b_store, clock, [b])
        await follower.start()
        await b.encrypt(KEY, b"dek", b"")  # cached in b for 60 s
        await a.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)
        # b's follower sequences what a staged, then applies it: b refuses at once.
        assert await follower.poll() >= 1
        with pytest.raises(FailedPrecondition):
            await b.encrypt(KEY, b"dek", b"")
        assert [kind for _, kind, _ in await _all(a)] == ["key_ring", "crypto_key", "version"]
        assert await fsck.check(a_store) == []


async def test_a_follower_that_missed_entries_drops_everything(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock, use_cache_ttl=timedelta(seconds=60)) as (a, store), \
            open_keystore(db, clock, use_cache_ttl=timedelta(seconds=60)) as (b, b_store):
        await _setup(a)
        follower = changelog.ChangeFollower(b_store, clock, [b])
        await follower.start()
        await b.encrypt(KEY, b"dek", b"")
        await a.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)
        clock.advance(timedelta(hours=2))
        await a.create_key_ring(LOCATION, "other")
        await changelog.trim(store, clock)  # the disable's entry is gone
        await follower.poll()
        assert follower.seen == 4
        with pytest.raises(FailedPrecondition):
            await b.encrypt(KEY, b"dek", b"")


async def test_fsck_finds_a_gap(tmp_path: Path) -> None:
    async with open_keystore(tmp_path / "db", FakeClock()) as (ks, store):
        await _setup(ks)
        await store.run(lambda tr: tr.clear(records.change_key(1)))
        problems = [str(p) for p in await fsck.check(store)]
        assert len(problems) == 1 and "gap" in problems[0]


# ---- real processes -----------------------------------------------------------


def test_a_disable_through_another_central_arrives_long_before_the_ttl(tmp_path: Path) -> None:
    data = tmp_path / "shared"
    first = CentralProcess(data, "--key-cache-ttl", "60s").start()
    second = CentralProcess(tmp_path / "second", "--key-cache-ttl", "60s", "--store",
                            f"sqlite://{data / 'valv.db'}", "--master-key-file",
                            str(data / "master.key")).start()
    try:
        a, b = first.client(), second.client()
        ring = a.create_key_ring(request={"parent": LOCATION, "key_ring_id": "r",
                                          "key_ring": {}}, **CALL)
        key = a.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                           "crypto_key": {"purpose": "ENCRYPT_DECRYPT"}},
                                  **CALL).name
        b.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)  # b caches it for 60 s
        a.update_crypto_key_version(
            request={"crypto_key_version": {"name": f"{key}/cryptoKeyVersions/1",
                                            "state": "DISABLED"},
                     "update_mask": field_mask_pb2.FieldMask(paths=["state"])}, **CALL)

        def b_refuses() -> bool:
            try:
                b.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)
            except exceptions.FailedPrecondition:
                return True
            return False

        wait_for(b_refuses, deadline_s=5, what="the other central to see the disable")
    finally:
        second.stop()
        first.stop()
