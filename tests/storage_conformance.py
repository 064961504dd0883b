"""The conformance suite every storage backend must pass (DESIGN.md §4).

Not collected on its own (no ``test_`` prefix). A backend's test module
subclasses ``StoreConformance`` in a class whose name starts with ``Test`` and
overrides the ``store_opener`` fixture::

    class TestSqliteStore(StoreConformance):
        @pytest.fixture
        def store_opener(self, tmp_path):
            async def open_() -> Store:
                return SqliteStore(tmp_path / "valv.db")
            return open_

``store_opener`` returns an async callable. Each call opens a store on the
same underlying data (so reopening after ``close()`` shows what was
committed), which starts out empty and belongs to this test alone: tests may
clear its whole keyspace. A future FoundationDB backend runs this same suite
from ``tests/test_storage_fdb.py``, skipped unless ``VALV_FDB_CLUSTER_FILE``
is set.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valv.core.storage import keys
from valv.core.storage.base import (
    MAX_KEY_BYTES,
    MAX_TRANSACTION_BYTES,
    MAX_VALUE_BYTES,
    LimitExceededError,
    ReadOnlyTransactionError,
    StorageError,
    Store,
    Transaction,
)

StoreOpener = Callable[[], Awaitable[Store]]

EVERYTHING = (b"", b"\xff")


async def put(store: Store, *pairs: tuple[bytes, bytes]) -> None:
    def body(tx: Transaction) -> None:
        for k, v in pairs:
            tx.set(k, v)

    await store.run(body)


async def get(store: Store, key: bytes) -> bytes | None:
    return await store.run(lambda tx: tx.get(key), read_only=True)


async def scan(
    store: Store, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
) -> list[tuple[bytes, bytes]]:
    return await store.run(
        lambda tx: tx.get_range(begin, end, limit=limit, reverse=reverse), read_only=True
    )


async def all_pairs(store: Store) -> list[tuple[bytes, bytes]]:
    return await scan(store, *EVERYTHING)


def max_value_bytes(store: Store) -> int:
    """The largest value ``store`` accepts (a sealing wrapper needs some room)."""
    limit: int = getattr(store, "max_value_bytes", MAX_VALUE_BYTES)
    return limit


class StaticSealKeys:
    """A minimal SealKeyProvider for tests: fixed keys, the last one newest."""

    def __init__(self, *pairs: tuple[str, bytes]) -> None:
        self._keys = dict(pairs)
        self._newest = pairs[-1][0]

    def __contains__(self, rmk_id: object) -> bool:
        return rmk_id in self._keys

    def newest_seal_key(self) -> tuple[str, bytes]:
        return self._newest, self._keys[self._newest]

    def seal_key_for(self, rmk_id: str) -> bytes:
        return self._keys[rmk_id]


def raw_bytes(path: Path) -> bytes:
    """A file-backed store's file plus its -wal and -shm files, concatenated."""
    out = b""
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(path) + suffix)
        if p.exists():
            out += p.read_bytes()
    return out


class StoreConformance:
    """Behaviour every ``Store`` must have. Subclass it; override ``store_opener``."""

    @pytest.fixture
    def store_opener(self) -> StoreOpener:
        raise NotImplementedError("a conformance subclass must override the store_opener fixture")

    @pytest.fixture
    async def store(self, store_opener: StoreOpener) -> AsyncIterator[Store]:
        store = await store_opener()
        try:
            yield store
        finally:
            await store.close()

    # -- single keys -------------------------------------------------------

    async def test_url_is_a_string(self, store: Store) -> None:
        assert isinstance(store.url, str) and store.url

    async def test_get_missing_is_none(self, store: Store) -> None:
        assert await get(store, keys.pack("missing")) is None

    async def test_set_get_overwrite(self, store: Store) -> None:
        k = keys.pack("ck", "p", "l", "r", "k")
        await put(store, (k, b"one"))
        assert await get(store, k) == b"one"
        await put(store, (k, b"two"))
        assert await get(store, k) == b"two"

    async def test_empty_and_binary_values(self, store: Store) -> None:
        empty, binary = keys.pack("v", 0), keys.pack("v", 1)
        every_byte = bytes(range(256)) * 4
        await put(store, (empty, b""), (binary, every_byte))
        assert await get(store, empty) == b""
        assert await get(store, binary) == every_byte

    async def test_raw_byte_keys(self, store: Store) -> None:
        ks = [b"\x00", b"\x00\x00", b"a", b"a\x00", b"\xfe\xff"]
        await put(store, *[(k, k + b"!") for k in ks])
        assert await all_pairs(store) == [(k, k + b"!") for k in sorted(ks)]

    async def test_clear(self, store: Store) -> None:
        a, b = keys.pack("a"), keys.pack("b")
        await put(store, (a, b"1"), (b, b"2"))
        await store.run(lambda tx: tx.clear(a))
        assert await get(store, a) is None
        assert await get(store, b) == b"2"
        await store.run(lambda tx: tx.clear(keys.pack("never-set")))  # no-op
        assert await all_pairs(store) == [(b, b"2")]

    async def test_run_returns_the_body_result(self, store: Store) -> None:
        assert await store.run(lambda tx: ("result", 42)) == ("result", 42)
        assert await store.run(lambda tx: 7, read_only=True) == 7

    async def test_reads_see_own_writes(self, store: Store) -> None:
        a, b, c = keys.pack("x", 1), keys.pack("x", 2), keys.pack("x", 3)
        await put(store, (a, b"old-a"), (c, b"old-c"))

        def body(tx: Transaction) -> list[Any]:
            tx.set(a, b"new-a")
            tx.set(b, b"new-b")
            tx.clear(c)
            return [tx.get(a), tx.get(b), tx.get(c), tx.get_range(*keys.range_of("x"))]

        got = await store.run(body)
        assert got == [b"new-a", b"new-b", None, [(a, b"new-a"), (b, b"new-b")]]

    # -- ranges ------------------------------------------------------------

    async def test_get_range_is_in_key_order(self, store: Store) -> None:
        tuples = [
            ("cv", "p", "l", "r", "k", 1),
            ("cv", "p", "l", "r", "k", 2),
            ("cv", "p", "l", "r", "k", 9),
            ("cv", "p", "l", "r", "k", 10),
            ("cv", "p", "l", "r", "k", 100),
            ("cv", "p", "l", "r", "k2", 1),
            ("cv", "p", "l", "r", "k", -1),
            ("cv", "p", "l", "r", "k", 0),
        ]
        shuffled = tuples[:]
        random.Random(7).shuffle(shuffled)
        await put(store, *[(keys.pack(*t), repr(t).encode()) for t in shuffled])
        got = await scan(store, *keys.range_of("cv", "p", "l", "r"))
        assert [keys.unpack(k) for k, _ in got] == sorted(tuples)
        assert [k for k, _ in got] == sorted(keys.pack(*t) for t in tuples)
        assert all(v == repr(keys.unpack(k)).encode() for k, v in got)

    async def test_get_range_limit_and_reverse(self, store: Store) -> None:
        ks = [keys.pack("n", i) for i in range(10)]
        await put(store, *[(k, b"%d" % i) for i, k in enumerate(ks)])
        begin, end = keys.range_of("n")
        assert [k for k, _ in await scan(store, begin, end)] == ks
        assert [k for k, _ in await scan(store, begin, end, limit=3)] == ks[:3]
        assert [k for k, _ in await scan(store, begin, end, reverse=True)] == ks[::-1]
        assert [k for k, _ in await scan(store, begin, end, limit=3, reverse=True)] == [
            ks[9],
            ks[8],
            ks[7],
        ]
        assert len(await scan(store, begin, end, limit=100)) == 10
        assert await scan(store, begin, end, limit=1, reverse=True) == [(ks[9], b"9")]

    async def test_a_snapshot_range_read_sees_what_get_range_sees(self, store: Store) -> None:
        """Same pairs, limit included, and the transaction's own writes: it differs
        only in the read conflicts it leaves (tested on FoundationDB)."""
        ks = [keys.pack("snap", i) for i in range(6)]
        await put(store, *[(k, b"%d" % i) for i, k in enumerate(ks[:4])])
        begin, end = keys.range_of("snap")

        def body(tx: Transaction) -> tuple[list[tuple[bytes, bytes]], ...]:
            tx.set(ks[4], b"mine")
            tx.clear(ks[0])
            return (tx.get_range(begin, end), tx.get_range_snapshot(begin, end),
                    tx.get_range(begin, end, limit=2), tx.get_range_snapshot(begin, end,
                                                                             limit=2))

        plain, snapshot, plain_two, snapshot_two = await store.run(body)
        assert snapshot == plain == [(ks[1], b"1"), (ks[2], b"2"), (ks[3], b"3"),
                                     (ks[4], b"mine")]
        assert snapshot_two == plain_two == plain[:2]

    async def test_get_range_bounds_are_half_open(self, store: Store) -> None:
        ks = [keys.pack("h", i) for i in range(5)]
        await put(store, *[(k, b"v") for k in ks])
        assert [k for k, _ in await scan(store, ks[1], ks[3])] == ks[1:3]
        assert [k for k, _ in await scan(store, ks[1], ks[3], reverse=True)] == [ks[2], ks[1]]
        # A begin that is not a stored key.
        assert [k for k, _ in await scan(store, ks[1] + b"\x00", ks[4])] == ks[2:4]

    async def test_empty_ranges(self, store: Store) -> None:
        k = keys.pack("e", 1)
        await put(store, (k, b"v"))
        assert await scan(store, k, k) == []
        assert await scan(store, k, k, reverse=True) == []
        assert await scan(store, *keys.range_of("nothing", "here")) == []
        assert await scan(store, *keys.range_of("nothing"), limit=5, reverse=True) == []
        # Strictly under the prefix: the prefix key itself is not in its range.
        assert await scan(store, *keys.range_of("e", 1)) == []

    async def test_prefix_ranges_respect_tuple_boundaries(self, store: Store) -> None:
        inside = [keys.pack("kr", "proj", "l", "a"), keys.pack("kr", "proj", "l", "b")]
        outside = [
            keys.pack("kr", "proj"),  # the prefix itself
            keys.pack("kr", "project", "l", "a"),  # a longer string, not a child
            keys.pack("kr", "pro", "l", "a"),
            keys.pack("ck", "proj", "l", "a", "k"),
        ]
        await put(store, *[(k, b"v") for k in inside + outside])
        assert [k for k, _ in await scan(store, *keys.range_of("kr", "proj"))] == inside
        assert [k for k, _ in await scan(store, *keys.range_of("kr", "proj", "l"))] == inside

    async def test_clear_range_bounds(self, store: Store) -> None:
        ks = [keys.pack("c", i) for i in range(6)]
        await put(store, *[(k, b"v") for k in ks])
        await store.run(lambda tx: tx.clear_range(ks[1], ks[4]))
        assert [k for k, _ in await all_pairs(store)] == [ks[0], ks[4], ks[5]]
        await store.run(lambda tx: tx.clear_range(ks[5], ks[5]))  # empty: no-op
        assert [k for k, _ in await all_pairs(store)] == [ks[0], ks[4], ks[5]]

    async def test_clear_range_of_prefix_keeps_siblings(self, store: Store) -> None:
        doomed = [keys.pack("km", "p", "l", "r", "k", v) for v in (1, 2, 3)]
        kept = [
            keys.pack("km", "p", "l", "r", "k"),
            keys.pack("km", "p", "l", "r", "k2", 1),
            keys.pack("km", "p", "l", "r", "j", 1),
        ]
        await put(store, *[(k, b"v") for k in doomed + kept])
        await store.run(lambda tx: tx.clear_range(*keys.range_of("km", "p", "l", "r", "k")))
        assert [k for k, _ in await all_pairs(store)] == sorted(kept)

    # -- transactions ------------------------------------------------------

    async def test_a_body_that_raises_commits_nothing(self, store: Store) -> None:
        a, b = keys.pack("atom", "a"), keys.pack("atom", "b")
        await put(store, (a, b"before"))

        class Boom(Exception):
            pass

        boom = Boom()

        def body(tx: Transaction) -> None:
            tx.set(a, b"after")
            tx.set(b, b"new")
            tx.clear_range(*EVERYTHING)
            raise boom

        with pytest.raises(Boom) as info:
            await store.run(body)
        assert info.value is boom
        assert await all_pairs(store) == [(a, b"before")]

    async def test_concurrent_increments_are_serializable(self, store: Store) -> None:
        counter = keys.pack("meta", "counter")
        tasks = 50

        def increment(tx: Transaction) -> None:
            current = tx.get(counter)
            tx.set(counter, str(int(current or b"0") + 1).encode())

        await asyncio.gather(*(store.run(increment) for _ in range(tasks)))
        assert await get(store, counter) == str(tasks).encode()

    async def test_concurrent_transfers_keep_the_total_and_readers_see_snapshots(
        self, store: Store
    ) -> None:
        accounts = [keys.pack("acct", i) for i in range(4)]
        await put(store, *[(k, b"100") for k in accounts])

        def transfer(src: int, dst: int) -> Callable[[Transaction], None]:
            def body(tx: Transaction) -> None:
                a = int(tx.get(accounts[src]) or b"0")
                b = int(tx.get(accounts[dst]) or b"0")
                tx.set(accounts[src], str(a - 7).encode())
                tx.set(accounts[dst], str(b + 7).encode())

            return body

        def total(tx: Transaction) -> int:
            return sum(int(v) for _, v in tx.get_range(*keys.range_of("acct")))

        rng = random.Random(1)
        jobs: list[Awaitable[Any]] = []
        for _ in range(30):
            src, dst = rng.sample(range(4), 2)
            jobs.append(store.run(transfer(src, dst)))
            jobs.append(store.run(total, read_only=True))
        results = await asyncio.gather(*jobs)
        assert [r for r in results if r is not None] == [400] * 30
        assert await store.run(total, read_only=True) == 400

    async def test_read_only_transactions_reject_writes(self, store: Store) -> None:
        k = keys.pack("ro")
        await put(store, (k, b"v"))
        writes: list[Callable[[Transaction], None]] = [
            lambda tx: tx.set(k, b"w"),
            lambda tx: tx.set(keys.pack("ro", "new"), b"w"),
            lambda tx: tx.clear(k),
            lambda tx: tx.clear_range(*EVERYTHING),
        ]
        for write in writes:
            with pytest.raises(ReadOnlyTransactionError):
                await store.run(write, read_only=True)
        assert await all_pairs(store) == [(k, b"v")]

    async def test_transaction_is_unusable_after_its_body(self, store: Store) -> None:
        leaked: list[Transaction] = []
        await store.run(leaked.append)
        with pytest.raises(StorageError):
            leaked[0].get(keys.pack("late"))
        with pytest.raises(StorageError):
            leaked[0].set(keys.pack("late"), b"v")
        assert await all_pairs(store) == []

    async def test_run_after_close_fails(self, store_opener: StoreOpener) -> None:
        store = await store_opener()
        await store.close()
        with pytest.raises(StorageError):
            await store.run(lambda tx: tx.get(b"k"))

    # -- limits ------------------------------------------------------------

    async def test_key_limit(self, store: Store) -> None:
        ok = b"k" * MAX_KEY_BYTES
        too_long = b"k" * (MAX_KEY_BYTES + 1)
        await put(store, (ok, b"v"))
        assert await get(store, ok) == b"v"

        def body(tx: Transaction) -> None:
            tx.set(keys.pack("sibling"), b"v")
            tx.set(too_long, b"v")

        with pytest.raises(LimitExceededError):
            await store.run(body)
        assert await all_pairs(store) == [(ok, b"v")]

    async def test_value_limit(self, store: Store) -> None:
        k = keys.pack("big")
        biggest = max_value_bytes(store)
        await put(store, (k, b"x" * biggest))
        assert await get(store, k) == b"x" * biggest

        def body(tx: Transaction) -> None:
            tx.set(keys.pack("sibling"), b"v")
            tx.set(k, b"y" * (MAX_VALUE_BYTES + 1))

        with pytest.raises(LimitExceededError) as info:
            await store.run(body)
        assert keys.describe(k) in str(info.value)
        assert await all_pairs(store) == [(k, b"x" * biggest)]

    async def test_limit_error_caught_by_the_body_writes_nothing_oversized(
        self, store: Store
    ) -> None:
        k = keys.pack("big")

        def body(tx: Transaction) -> None:
            with pytest.raises(LimitExceededError):
                tx.set(k, b"y" * (MAX_VALUE_BYTES + 1))
            tx.set(keys.pack("small"), b"v")

        await store.run(body)
        assert await all_pairs(store) == [(keys.pack("small"), b"v")]

    async def test_transaction_size_limit(self, store: Store) -> None:
        chunk = b"z" * (max_value_bytes(store) - 100)
        count = MAX_TRANSACTION_BYTES // len(chunk) + 2

        def body(tx: Transaction) -> None:
            for i in range(count):
                tx.set(keys.pack("bulk", i), chunk)

        with pytest.raises(LimitExceededError):
            await store.run(body)
        assert await all_pairs(store) == []

    async def test_system_keyspace_is_refused(self, store: Store) -> None:
        with pytest.raises(StorageError):
            await store.run(lambda tx: tx.set(b"\xff/system", b"v"))
        assert await all_pairs(store) == []

    # -- durability --------------------------------------------------------

    async def test_data_persists_across_reopen(self, store_opener: StoreOpener) -> None:
        first = await store_opener()
        pairs = [(keys.pack("ck", "p", "l", "r", f"k{i}"), b"v%d" % i) for i in range(5)]
        try:
            await put(first, *pairs)
            await first.run(lambda tx: tx.clear(pairs[0][0]))
        finally:
            await first.close()
        second = await store_opener()
        try:
            assert await all_pairs(second) == pairs[1:]
        finally:
            await second.close()

    # -- model check -------------------------------------------------------

    @settings(
        max_examples=100,
        deadline=None,
        derandomize=True,
        database=None,
        # Each example clears the store first, so sharing the function-scoped
        # store fixture between examples is fine; and every backend's subclass
        # runs this same method ("differing executors"), which is the point.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
            HealthCheck.too_slow,
        ],
    )
    @given(data=st.data())
    async def test_matches_a_dict_model(self, store: Store, data: st.DataObject) -> None:
        key = st.builds(
            lambda a, n: keys.pack(a, n) if n >= 0 else keys.pack(a),
            st.sampled_from(["a", "ab", "b", ""]),
            st.integers(-1, 12),
        )
        op = st.one_of(
            st.tuples(st.just("set"), key, st.binary(max_size=16)),
            st.tuples(st.just("clear"), key),
            st.tuples(st.just("clear_range"), key, key),
        )
        transactions: list[list[tuple[Any, ...]]] = data.draw(
            st.lists(st.lists(op, max_size=6), max_size=6)
        )
        queries = data.draw(
            st.lists(st.tuples(key, key, st.integers(0, 6), st.booleans()), max_size=6)
        )

        await store.run(lambda tx: tx.clear_range(*EVERYTHING))
        model: dict[bytes, bytes] = {}

        for ops in transactions:

            def body(tx: Transaction, ops: list[tuple[Any, ...]] = ops) -> None:
                for o in ops:
                    if o[0] == "set":
                        tx.set(o[1], o[2])
                    elif o[0] == "clear":
                        tx.clear(o[1])
                    else:
                        tx.clear_range(min(o[1], o[2]), max(o[1], o[2]))

            await store.run(body)
            for o in ops:
                if o[0] == "set":
                    model[o[1]] = o[2]
                elif o[0] == "clear":
                    model.pop(o[1], None)
                else:
                    lo, hi = min(o[1], o[2]), max(o[1], o[2])
                    for k in [k for k in model if lo <= k < hi]:
                        del model[k]

        assert await all_pairs(store) == sorted(model.items())
        for a, b, limit, reverse in queries:
            lo, hi = min(a, b), max(a, b)
            expected = sorted((k, v) for k, v in model.items() if lo <= k < hi)
            if reverse:
                expected.reverse()
            if limit:
                expected = expected[:limit]
            assert await scan(store, lo, hi, limit=limit, reverse=reverse) == expected
