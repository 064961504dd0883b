"""The write journal and consistent dumps, in process on real SQLite files.

The consistency test keeps writers going during a dump that reads a few pairs
per transaction, with an invariant every committed state keeps (all keys of a
group hold the same generation; a total stays constant). A dump that mixed
two instants breaks it."""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.storage_conformance import StaticSealKeys
from valv.core.backup import restore as restore_mod
from valv.core.backup.dump import KEYSPACE, BackupError, DumpProgress, dump
from valv.core.backup.format import BackupReader, BackupWriter
from valv.core.backup.restore import RestoreError, RestorePlan, Source, restore
from valv.core.storage import journal
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import pack
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

SEALER = Sealer(StaticSealKeys(("0123456789abcdef", bytes(range(32)))))


class Clock:
    def __init__(self) -> None:
        self.us = 1_000_000

    def __call__(self) -> int:
        return self.us


def open_journaled(path: Path, clock: Clock | None = None, *,
                   versionstamps: bool = False) -> SealedStore:
    """``versionstamps``: SQLite emulating them, so journal entries are staged and
    sequenced as on FoundationDB."""
    return journal.journaled_store(SqliteStore(path, versionstamps=versionstamps), SEALER,
                                   clock or Clock())


async def everything(store: Store) -> dict[bytes, bytes]:
    pairs = await store.run(lambda tr: tr.get_range(*KEYSPACE), read_only=True)
    return dict(pairs)


async def test_each_write_transaction_journals_its_ranges(tmp_path: Path) -> None:
    store = open_journaled(tmp_path / "valv.db")
    try:
        def write(tr: Transaction) -> None:
            tr.set(pack("a", 1), b"x")
            tr.clear(pack("b"))
            tr.clear_range(*pack_range("c"))

        await store.run(write)
        await store.run(lambda tr: tr.get(pack("a", 1)), read_only=True)  # no entry
        await store.run(lambda tr: None)  # wrote nothing: no entry
        batch = await store.run(lambda tr: journal.read_since_body(tr, 0), read_only=True)
        assert [e.seq for e in batch.entries] == [1] and batch.head == 1 and not batch.gap
        assert set(batch.entries[0].ranges) == {
            journal.single_key_range(pack("a", 1)), journal.single_key_range(pack("b")),
            pack_range("c"),
            # The entry itself and the head: the journal is replayed like the rest.
            journal.entry_range(1),
            journal.single_key_range(journal.HEAD_KEY)}
        # The journal's own records are sealed like the rest.
        raw = await everything(store.inner)
        assert all(value[0] == 1 for value in raw.values())
    finally:
        await store.close()


def pack_range(*prefix: str) -> tuple[bytes, bytes]:
    from valv.core.storage.keys import range_of

    return range_of(*prefix)


async def test_a_transaction_with_many_writes_is_journaled_exactly_in_parts(
        tmp_path: Path) -> None:
    store = open_journaled(tmp_path / "valv.db")
    written = [pack("k", i, "x" * 40) for i in range(3000)]
    try:
        def write(tr: Transaction) -> None:
            for key in written:
                tr.set(key, b"v")

        await store.run(write)
        await store.run(lambda tr: tr.set(pack("after"), b"v"))
        parts = await store.inner.run(
            lambda tr: tr.get_range(*journal.entry_range(1)), read_only=True)
        assert len(parts) > 1  # each part stays far under the value limit
        assert all(len(value) < 70_000 for _, value in parts)
        for limit in (1, 2, 1000):  # a read never splits an entry
            batch = await store.run(lambda tr, n=limit: journal.read_since_body(tr, 0, n),
                                    read_only=True)
            first = batch.entries[0]
            assert first.seq == 1
            assert {journal.single_key_range(k) for k in written} <= set(first.ranges)
            assert len(first.ranges) == len(written) + 2
    finally:
        await store.close()


async def test_trim_and_gap(tmp_path: Path) -> None:
    clock = Clock()
    store = open_journaled(tmp_path / "valv.db", clock)
    try:
        for i in range(5):
            await store.run(lambda tr, i=i: tr.set(pack("k", i), b"v"))
            clock.us += 1_000_000
        retention_us = journal.RETENTION.total_seconds() * 1e6
        clock.us += int(retention_us) - 2_500_000  # the first three are now too old
        assert await journal.trim(store, clock.us) == 3
        batch = await store.run(lambda tr: journal.read_since_body(tr, 0), read_only=True)
        # The trim is journaled too (entry 6), so a backup replays it.
        batch = await store.run(lambda tr: journal.read_since_body(tr, 0), read_only=True)
        assert batch.gap and [e.seq for e in batch.entries] == [4, 5, 6]
        assert journal.entry_range(1) in batch.entries[2].ranges
        batch = await store.run(lambda tr: journal.read_since_body(tr, 3), read_only=True)
        assert not batch.gap and [e.seq for e in batch.entries] == [4, 5, 6]
    finally:
        await store.close()


GROUPS = 6
PER_GROUP = 12
ACCOUNTS = 20
TOTAL = 1000 * ACCOUNTS


async def seed(store: SealedStore) -> None:
    def body(tr: Transaction) -> None:
        for group in range(GROUPS):
            for member in range(PER_GROUP):
                tr.set(pack("g", group, member), b"0")
        for account in range(ACCOUNTS):
            tr.set(pack("acct", account), b"1000")

    await store.run(body)


def random_write(rng: random.Random) -> Callable[[Transaction], None]:
    """A transaction body that keeps the invariants: bump a group, or move money."""
    if rng.random() < 0.5:
        group = rng.randrange(GROUPS)

        def bump(tr: Transaction) -> None:
            generation = int(tr.get(pack("g", group, 0)) or b"0") + 1
            for member in range(PER_GROUP):
                tr.set(pack("g", group, member), str(generation).encode())
            # Clear and rewrite a range too, as the keystore's indexes do.
            tr.clear_range(*pack_range("tmp", str(group)))
            tr.set(pack("tmp", str(group), generation), b"x")

        return bump
    a, b = rng.sample(range(ACCOUNTS), 2)
    amount = rng.randrange(1, 50)

    def transfer(tr: Transaction) -> None:
        tr.set(pack("acct", a), str(int(tr.get(pack("acct", a)) or 0) - amount).encode())
        tr.set(pack("acct", b), str(int(tr.get(pack("acct", b)) or 0) + amount).encode())

    return transfer


async def writer(store: SealedStore, stop: asyncio.Event, seed_: int,
                 committed: list[int]) -> int:
    """Random transactions, each keeping the invariants; how many committed."""
    rng = random.Random(seed_)
    done = 0
    while not stop.is_set():
        await store.run(random_write(rng))
        done += 1
        committed[0] += 1
        await asyncio.sleep(0)
    return done


def another_process_writes(path: Path, rng: random.Random, versionstamps: bool,
                           times: int = 3) -> Callable[[DumpProgress], None]:
    """A progress callback that, the first ``times`` times it is called during the
    scan, commits one write through a store of its own on the same file (as another
    central would) before the dump goes on: so writes land between the dump's
    transactions however threads are scheduled. Bounded, because each write adds a
    key ahead of the scan's cursor: one per chunk would keep a one-pair scan going
    for ever."""
    remaining = [times]

    def write(state: DumpProgress) -> None:
        if state.replayed or state.done or remaining[0] == 0:
            return  # the scan is over: more writes now would only make the replay chase them
        remaining[0] -= 1

        async def once() -> None:
            other = open_journaled(path, versionstamps=versionstamps)
            try:
                await other.run(random_write(rng))
            finally:
                await other.close()

        thread = threading.Thread(target=lambda: asyncio.run(once()))
        thread.start()
        thread.join()

    return write


async def check_invariants(store: SealedStore) -> None:
    def body(tr: Transaction) -> None:
        for group in range(GROUPS):
            values = {tr.get(pack("g", group, m)) for m in range(PER_GROUP)}
            assert len(values) == 1, f"group {group} mixes generations {values}"
            (generation,) = values
            assert generation is not None
            tmp = [k for k, _ in tr.get_range(*pack_range("tmp", str(group)))]
            assert tmp == ([] if generation == b"0" else
                           [pack("tmp", str(group), int(generation))]), tmp
        total = sum(int(tr.get(pack("acct", a)) or 0) for a in range(ACCOUNTS))
        assert total == TOTAL

    await store.run(body, read_only=True)


@pytest.mark.parametrize("versionstamps", [False, True], ids=["seqs", "staged"])
@pytest.mark.parametrize("chunk", [1, 7, 500])
async def test_a_dump_during_writes_restores_one_instant(tmp_path: Path, chunk: int,
                                                         versionstamps: bool) -> None:
    source = open_journaled(tmp_path / "source.db", versionstamps=versionstamps)
    target = SqliteStore(tmp_path / "target.db", versionstamps=versionstamps)
    try:
        await seed(source)
        stop = asyncio.Event()
        committed = [0]
        writers = [asyncio.create_task(writer(source, stop, seed_, committed))
                   for seed_ in range(3)]
        async with asyncio.timeout(10):  # the writers are going
            while committed[0] < 10:
                await asyncio.sleep(0.001)
        out = io.BytesIO()
        result = await dump(source, BackupWriter(out), chunk=chunk, progress=(
            another_process_writes(tmp_path / "source.db", random.Random(chunk), versionstamps)))
        stop.set()
        await asyncio.gather(*writers)
        # Writes landed between the dump's transactions, and were replayed.
        assert result.manifest["clears"] > 0

        path = tmp_path / "b.vbk"
        path.write_bytes(out.getvalue())
        plan = RestorePlan([Source(str(path), restore_mod.check_file(str(path)))])
        await restore(target, plan)
        restored = journal.journaled_store(target, SEALER, Clock())
        await check_invariants(restored)
        if versionstamps:  # staged entries were sequenced while the writers ran
            assert await journal.head(source) > 0
        # Its journal head is the seq the dump says it is consistent at.
        assert await journal.head(restored) == result.journal_seq
    finally:
        await source.close()
        await target.close()


async def test_restore_resumes_after_a_crash_and_refuses_a_non_empty_target(
        tmp_path: Path) -> None:
    source = open_journaled(tmp_path / "source.db")
    target = SqliteStore(tmp_path / "target.db")
    try:
        await seed(source)
        out = io.BytesIO()
        await dump(source, BackupWriter(out))
        path = tmp_path / "b.vbk"
        path.write_bytes(out.getvalue())
        plan = RestorePlan([Source(str(path), restore_mod.check_file(str(path)))])

        class Crash(Exception):
            pass

        def crash_after_two(state: restore_mod.RestoreProgress) -> None:
            if state.batches == 2:
                raise Crash

        with pytest.raises(Crash):
            await restore(target, plan, batch_frames=10, progress=crash_after_two)
        partial = await everything(target)
        assert restore_mod.RESTORE_MARKER_KEY in partial
        # Nothing opens a half-restored store to use it (central, backup, fsck, rmk).
        with pytest.raises(RestoreError, match=r"unfinished.*run the same `valv restore` again"):
            await restore_mod.refuse_if_unfinished(target)
        state = await restore(target, plan, batch_frames=10)
        assert state.resumed_from == (0, 20)
        assert await everything(target) == await everything(source.inner)

        # A finished restore leaves a normal, non-empty store: refused without --force.
        with pytest.raises(RestoreError, match="not empty"):
            await restore(target, plan)
        await target.run(lambda tr: tr.set(pack("extra"), b"x"))
        await restore(target, plan, force=True)
        assert await everything(target) == await everything(source.inner)
    finally:
        await source.close()
        await target.close()


async def test_a_dump_whose_journal_was_trimmed_under_it_fails(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "valv.db"
    store = open_journaled(path, clock)
    try:
        await seed(store)

        async def another_central() -> None:
            # Writes, two hours pass, more writes, and the journal is trimmed.
            other = open_journaled(path, clock)
            try:
                await other.run(lambda tr: tr.set(pack("late"), b"x"))
                clock.us += int(journal.RETENTION.total_seconds() * 1e6) + 1
                await other.run(lambda tr: tr.set(pack("later"), b"x"))
                assert await journal.trim(other, clock.us) >= 2
            finally:
                await other.close()

        def after_first_chunk(state: object) -> None:
            # Once, while the scan is under way; done before the dump goes on.
            if not trimmed:
                trimmed.append(True)
                thread = threading.Thread(target=lambda: asyncio.run(another_central()))
                thread.start()
                thread.join()

        trimmed: list[bool] = []
        with pytest.raises(BackupError, match="trimmed"):
            await dump(store, BackupWriter(io.BytesIO()), chunk=2, progress=after_first_chunk)
        assert trimmed
    finally:
        await store.close()


def test_reader_frames_are_the_restore_order(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = BackupWriter(out)
    writer.header({"kind": "full", "source": "sqlite", "schema_version": 1})
    writer.pair(b"a", b"1")
    writer.clear(b"a", b"b")
    writer.pair(b"a", b"2")
    writer.finish({"journal_seq": 0})
    frames = list(BackupReader(io.BytesIO(out.getvalue())).frames())
    assert [type(f).__name__ for f in frames] == ["Pair", "Clear", "Pair"]


async def test_staged_entries_get_gap_free_seqs_in_commit_order(tmp_path: Path) -> None:
    path = tmp_path / "valv.db"
    a = open_journaled(path, versionstamps=True)
    b = open_journaled(path, versionstamps=True)
    try:
        for i in range(6):
            await (a if i % 2 else b).run(lambda tr, i=i: tr.set(pack("k", i), b"v"))
        assert await journal.head(a) == 0  # all staged: no writer touched the head
        staged = await a.run(journal.staged_ranges_body, read_only=True)
        assert journal.single_key_range(pack("k", 0)) in staged
        # Two sequencers at once (two processes' worth of stores on one file).
        moved = await asyncio.gather(journal.sequence(a), journal.sequence(b))
        assert sum(moved) == 6
        batch = await a.run(lambda tr: journal.read_since_body(tr, 0), read_only=True)
        seqs = [e.seq for e in batch.entries]
        assert seqs == list(range(1, len(seqs) + 1))  # gap-free
        # Commit order kept: the k writes come out as 0, 1, 2... (sequencer entries
        # in between list the journal's own keys only).
        written = [r for e in batch.entries for r in e.ranges
                   if r[0].startswith(pack("k")[:-1])]
        assert written == [journal.single_key_range(pack("k", i)) for i in range(6)]
        assert await a.run(journal.staged_ranges_body, read_only=True) == []
        assert await journal.sequence(a) == 0  # nothing left, nothing written
    finally:
        await a.close()
        await b.close()
