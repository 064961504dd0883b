"""Logs ordered by versionstamps, as on FoundationDB, run here on SQLite emulating them
(SqliteStore(versionstamps=True): a counter, exact because SQLite serializes writers).

With versionstamps the change log, the audit log and the write journal stage their
entries without touching a shared head, and sequencers give them seqs (and the audit
log its hash chain) in commit order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.keystore_fixtures import open_keystore
from valv.core import changelog
from valv.core.audit import AuditEntry, AuditLog, RecordKind
from valv.core.clock import FakeClock
from valv.core.storage import keys
from valv.core.storage.base import ReadOnlyTransactionError, StorageError, Transaction
from valv.core.storage.sqlite import SqliteStore


async def test_sqlite_emulated_versionstamps_sort_in_commit_order(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "valv.db", versionstamps=True)
    prefix = keys.pack("log-x")
    try:
        assert store.supports_versionstamps

        def write(tr: Transaction, tag: bytes) -> None:
            assert tr.supports_versionstamps
            tr.set_versionstamped(prefix, tag + b"-a")
            tr.set_versionstamped(prefix, tag + b"-b")

        for tag in (b"1", b"2", b"3"):
            await store.run(lambda tr, tag=tag: write(tr, tag))
        rows = await store.run(lambda tr: tr.get_range(prefix + b"\x00", prefix + b"\xff"),
                               read_only=True)
        assert [v for _, v in rows] == [b"1-a", b"1-b", b"2-a", b"2-b", b"3-a", b"3-b"]
        stamps = [keys.stamp_of(k, prefix) for k, _ in rows]
        assert stamps[0][0] == stamps[1][0] and [n for _, n in stamps[:2]] == [0, 1]
        assert stamps[1][0] < stamps[2][0]
        # They unpack as fdb.tuple versionstamps, without libfdb_c.
        assert type(keys.unpack(rows[0][0])[1]).__name__ == "Versionstamp"
        with pytest.raises(ReadOnlyTransactionError):
            await store.run(lambda tr: tr.set_versionstamped(prefix, b"x"), read_only=True)
    finally:
        await store.close()


async def test_stores_without_versionstamps_refuse_them(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    try:
        assert not store.supports_versionstamps
        with pytest.raises(StorageError, match="no versionstamped keys"):
            await store.run(lambda tr: tr.set_versionstamped(keys.pack("x"), b"v"))
    finally:
        await store.close()


def entry(n: int) -> AuditEntry:
    return AuditEntry(kind=RecordKind.ADMIN_ACTIVITY, principal="user:a@example.com",
                      auth_method="token", rpc=f"Rpc{n}", resource="projects/p")


async def test_staged_audit_records_are_chained_in_commit_order(tmp_path: Path) -> None:
    clock = FakeClock()
    db = tmp_path / "db"
    async with open_keystore(db, clock, versionstamps=True) as (_, a_store), \
            open_keystore(db, clock, versionstamps=True) as (_, b_store):
        a, b = AuditLog(a_store, clock), AuditLog(b_store, clock)
        await a.open()
        await b.open()
        await a.write([entry(0), entry(1)])
        await b.write([entry(2)])
        await a.write([entry(3), entry(4), entry(5)])
        head = await a.head()
        assert head is not None and head.seq == 0  # nothing linked yet: no head contention
        # Two centrals chaining at once: every record linked exactly once.
        linked = await asyncio.gather(a.chain(), b.chain())
        assert sum(linked) == 6
        assert await a.chain() == 0
        report = await a.verify()
        assert report.ok, report.problems
        assert report.checked == 6
        records = [item.record async for item in a.items()]
        assert [r.rpc for r in records if r is not None] == [f"Rpc{n}" for n in range(6)]
        assert [r.seq for r in records if r is not None] == list(range(1, 7))


async def test_a_central_on_a_versionstamped_store_sequences_before_it_reads(
        tmp_path: Path) -> None:
    """The change follower runs every sequencer before each poll: changes, audit
    records and journal entries are all numbered, and nothing is left staged."""
    from valv.core.storage import journal

    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock, versionstamps=True) as (ks, store):
        log = AuditLog(store, clock)
        await log.open()
        await ks.create_key_ring("projects/p/locations/global", "r")
        await log.write([entry(0)])
        follower = changelog.ChangeFollower(store, clock, [], sequencers=[log.chain])
        await follower.start()
        await follower.poll()
        assert await changelog.head(store) == 1
        head = await log.head()
        assert head is not None and head.seq == 1
        assert await journal.head(store) > 0

        def staged(tr: Transaction) -> list[bytes]:
            prefixes = (changelog.STAGE_PREFIX, journal.STAGE_PREFIX,
                        keys.pack("audit-stage"))
            return [k for p in prefixes for k, _ in tr.get_range(p + b"\x00", p + b"\xff")]

        assert await store.inner.run(staged, read_only=True) == []


async def test_sequencing_takes_a_bounded_number_of_staged_bytes_per_transaction(
        tmp_path: Path) -> None:
    """Write-journal entries of big transactions are numbered a few at a time, so the
    sequencing transaction (which rewrites what it reads) stays far under 10 MB."""
    from valv.core.storage import journal

    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock, versionstamps=True) as (_, store):
        big_key = b"k" * 9_000

        def write(tr: Transaction, n: int) -> None:
            for i in range(100):  # 100 ranges of two ~9 kB keys: ~1.8 MB of journal
                tr.set(keys.pack("big", n, i, big_key), b"v")

        for n in range(4):
            await store.run(lambda tr, n=n: write(tr, n))
        first = await store.run(lambda tr: journal.sequence_body(tr))
        assert 1 <= first < 4
        assert first + await journal.sequence(store) == 4
        # The four, and the entries of the sequencing transactions themselves.
        assert await journal.head(store) >= 4
