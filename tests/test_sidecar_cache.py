"""KekCache: the sidecar's cache of unwrapped KEKs (valv/sidecar/cache.py)."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from valv.core.crypto.secrets import SecretBytes
from valv.sidecar.cache import PRIMARY, FetchedKek, KekCache, Lease

K = "projects/p/locations/l/keyRings/r/cryptoKeys/k"
K2 = "projects/p/locations/l/keyRings/r/cryptoKeys/k2"


class FakeTimer:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kek(n: int) -> SecretBytes:
    return SecretBytes(bytes([n % 256]) * 32)


class Fetcher:
    """Counts fetches; returns version ``vid`` (or raises ``error``)."""

    def __init__(self, vid: int = 1, error: Exception | None = None,
                 gate: asyncio.Event | None = None, ttl_s: float | None = None) -> None:
        self.vid = vid
        self.ttl_s = ttl_s
        self.error = error
        self.gate = gate
        self.calls = 0
        self.issued: list[SecretBytes] = []

    async def __call__(self) -> FetchedKek:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        secret = kek(self.vid)
        self.issued.append(secret)
        return FetchedKek(self.vid, secret, ttl_s=self.ttl_s)


def make(**kw: object) -> tuple[KekCache, FakeTimer]:
    timer = FakeTimer()
    return KekCache(timer=timer, **kw), timer  # type: ignore[arg-type]


async def test_hit_after_fetch_and_primary_pointer() -> None:
    cache, _ = make()
    f = Fetcher(vid=3)
    async with cache.use(K, PRIMARY, f) as lease:
        assert lease.version_id == 3 and lease.kek == bytes([3]) * 32
    # The primary pointer and the version itself are now both hits.
    with cache.lookup(K, PRIMARY) as lease:  # type: ignore[union-attr]
        assert lease.version_id == 3
    with await cache.get_or_fetch(K, 3, f) as lease:
        assert lease.kek == bytes([3]) * 32
    assert f.calls == 1
    assert cache.lookup(K, 2) is None and cache.lookup(K2) is None
    s = cache.stats
    assert (s.hits, s.misses, s.fetches) == (2, 3, 1)


async def test_ttl_expiry_with_fake_timer_and_stale_until_ttl() -> None:
    cache, timer = make(ttl_s=60)
    f = Fetcher(vid=1)
    (await cache.get_or_fetch(K, PRIMARY, f)).release()
    secret = f.issued[0]
    # Central goes away: the cached entry keeps serving until its TTL...
    down = Fetcher(error=ConnectionError("central unreachable"))
    timer.now += 59.9
    with await cache.get_or_fetch(K, PRIMARY, down) as lease:
        assert lease.version_id == 1
    assert down.calls == 0
    # ...then it is a miss (wiped), and the failed fetch reaches the caller.
    timer.now += 0.2
    assert cache.lookup(K, PRIMARY) is None
    assert secret.zeroized
    with pytest.raises(ConnectionError):
        await cache.get_or_fetch(K, 1, down)
    assert down.calls == 1 and len(cache) == 0
    assert cache.stats.expirations == 1
    # Use does not extend the TTL.
    (await cache.get_or_fetch(K, 1, f)).release()
    for _ in range(5):
        timer.now += 20
        cache.lookup(K, 1)
    assert cache.lookup(K, 1) is None


async def test_a_shorter_ttl_from_the_source_wins_and_scales_refresh_ahead() -> None:
    cache, timer = make(ttl_s=60, refresh_ahead_s=12)
    short = Fetcher(vid=1, ttl_s=10)  # central allows 10 s: the entry keeps 10 s
    (await cache.get_or_fetch(K, 1, short)).release()
    timer.now += 7.9  # the refresh window is the last fifth of 10 s, not the last 12 s
    (await cache.get_or_fetch(K, 1, short)).release()
    await settle()
    assert short.calls == 1
    timer.now += 0.2
    (await cache.get_or_fetch(K, 1, Fetcher(vid=1, error=ConnectionError("down")))).release()
    await settle()
    timer.now += 2  # 10.1 s after the fetch: gone, although the cache's own TTL is 60 s
    assert cache.lookup(K, 1) is None
    assert short.issued[0].zeroized and cache.stats.expirations == 1
    # A longer TTL (or none, 0) from the source leaves the cache's own.
    for ttl in (600.0, 0.0, None):
        (await cache.get_or_fetch(K, 2, Fetcher(vid=2, ttl_s=ttl))).release()
        timer.now += 59.9
        lease = cache.lookup(K, 2)
        assert lease is not None
        lease.release()
        timer.now += 0.2
        assert cache.lookup(K, 2) is None


async def test_every_wipe_is_reported_for_derived_keys_to_follow() -> None:
    """on_wipe(name, version) runs when a KEK is wiped: at once if unused, else at
    its last release; never while a lease holds it."""
    wiped: list[tuple[str, int]] = []
    timer = FakeTimer()
    cache = KekCache(ttl_s=60, max_entries=2, timer=timer,
                     on_wipe=lambda name, vid: wiped.append((name, vid)))
    (await cache.get_or_fetch(K, 1, Fetcher(vid=1))).release()
    held = await cache.get_or_fetch(K, 2, Fetcher(vid=2))
    cache.invalidate_key(K)
    assert wiped == [(K, 1)]  # version 2 is still in use
    held.release()
    assert wiped == [(K, 1), (K, 2)]
    (await cache.get_or_fetch(K2, 3, Fetcher(vid=3))).release()
    timer.now += 61
    cache.expire()
    assert wiped[-1] == (K2, 3)


async def settle() -> None:
    """Let background flights run to completion (they need a few loop turns)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_refresh_ahead_replaces_a_busy_entry_before_its_ttl() -> None:
    cache, timer = make(ttl_s=60, refresh_ahead_s=12)
    f = Fetcher(vid=1)
    (await cache.get_or_fetch(K, PRIMARY, f)).release()
    old = f.issued[0]
    timer.now += 47.9  # not yet in the refresh window
    (await cache.get_or_fetch(K, PRIMARY, f)).release()
    await settle()
    assert f.calls == 1 and cache.stats.refreshes == 0
    timer.now += 0.2  # in the last 12 s: served from cache, refreshed behind
    with await cache.get_or_fetch(K, PRIMARY, f) as lease:
        assert lease.kek is old
    await settle()
    assert f.calls == 2 and cache.stats.refreshes == 1
    assert old.zeroized  # replaced, and no lease held it any more
    timer.now += 30  # past the first copy's TTL, inside the fresh one's
    with await cache.get_or_fetch(K, PRIMARY, f) as lease:
        assert lease.kek is f.issued[1]
    assert f.calls == 2


async def test_a_failed_refresh_changes_nothing_and_the_ttl_still_ends_service() -> None:
    cache, timer = make(ttl_s=60, refresh_ahead_s=12)
    (await cache.get_or_fetch(K, 1, Fetcher(vid=1))).release()
    down = Fetcher(error=ConnectionError("central unreachable"))
    timer.now += 50
    for _ in range(3):  # each use in the window may try again; the entry keeps serving
        (await cache.get_or_fetch(K, 1, down)).release()
        await settle()
    assert down.calls == 3 and cache.stats.fetch_errors == 3 and len(cache) == 1
    timer.now += 10.1  # the TTL has run out: never served past it
    with pytest.raises(ConnectionError):
        await cache.get_or_fetch(K, 1, down)
    assert len(cache) == 0


async def test_a_refresh_invalidated_in_flight_is_not_cached() -> None:
    cache, timer = make(ttl_s=60, refresh_ahead_s=12)
    (await cache.get_or_fetch(K, 1, Fetcher(vid=1))).release()
    gate = asyncio.Event()
    slow = Fetcher(vid=1, gate=gate)
    timer.now += 55
    (await cache.get_or_fetch(K, 1, slow)).release()
    await settle()
    cache.invalidate_key(K)  # e.g. disabled at central while the refresh was out
    gate.set()
    await settle()
    assert slow.calls == 1 and len(cache) == 0
    assert slow.issued[0].zeroized


async def test_max_uses_evicts_and_refetches() -> None:
    cache, _ = make(max_uses=3)
    f = Fetcher(vid=1)
    for _ in range(3):
        (await cache.get_or_fetch(K, 1, f)).release()
    assert f.calls == 1
    assert f.issued[0].zeroized  # third use reached the bound, nobody holds it
    assert cache.stats.exhausted == 1
    (await cache.get_or_fetch(K, 1, f)).release()
    assert f.calls == 2 and not f.issued[1].zeroized


async def test_lru_bound() -> None:
    cache, _ = make(max_entries=3)
    fs = {v: Fetcher(vid=v) for v in range(1, 5)}
    for v in (1, 2, 3):
        (await cache.get_or_fetch(K, v, fs[v])).release()
    cache.lookup(K, 1).release()  # type: ignore[union-attr]  # 2 is now least recent
    (await cache.get_or_fetch(K, 4, fs[4])).release()
    assert len(cache) == 3 and cache.stats.evictions == 1
    assert fs[2].issued[0].zeroized
    assert cache.lookup(K, 2) is None
    for v in (1, 3, 4):
        cache.lookup(K, v).release()  # type: ignore[union-attr]


async def test_coalescing_fifty_misses_one_fetch() -> None:
    cache, _ = make()
    gate = asyncio.Event()
    f = Fetcher(vid=7, gate=gate)
    tasks = [asyncio.ensure_future(cache.get_or_fetch(K, PRIMARY, f)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    leases = await asyncio.gather(*tasks)
    assert f.calls == 1 and cache.stats.fetches == 1 and cache.stats.misses == 50
    assert {lease.version_id for lease in leases} == {7}
    for lease in leases:
        lease.release()
    assert not f.issued[0].zeroized  # still cached


async def test_coalesced_failure_is_shared_and_not_cached() -> None:
    cache, _ = make()
    gate = asyncio.Event()
    boom = RuntimeError("permission denied")
    f = Fetcher(error=boom, gate=gate)
    tasks = [asyncio.ensure_future(cache.get_or_fetch(K, 1, f)) for _ in range(50)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert f.calls == 1
    assert all(r is boom for r in results)
    assert cache.stats.fetch_errors == 1 and len(cache) == 0
    # The next call retries.
    ok = Fetcher(vid=1)
    (await cache.get_or_fetch(K, 1, ok)).release()
    assert ok.calls == 1


async def test_cancelled_waiter_does_not_cancel_the_fetch() -> None:
    cache, _ = make()
    gate = asyncio.Event()
    f = Fetcher(vid=1, gate=gate)
    first = asyncio.ensure_future(cache.get_or_fetch(K, 1, f))
    second = asyncio.ensure_future(cache.get_or_fetch(K, 1, f))
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    lease = await second
    assert first.cancelled() and f.calls == 1
    lease.release()
    assert cache.lookup(K, 1) is not None


async def test_wrong_version_from_fetch_is_an_error() -> None:
    cache, _ = make()
    f = Fetcher(vid=2)
    with pytest.raises(ValueError, match="wrong version"):
        await cache.get_or_fetch(K, 1, f)
    assert f.issued[0].zeroized and len(cache) == 0


async def test_evicted_while_in_use_is_wiped_at_release() -> None:
    cache, _ = make(max_entries=1)
    f1, f2 = Fetcher(vid=1), Fetcher(vid=2)
    held = await cache.get_or_fetch(K, 1, f1)
    (await cache.get_or_fetch(K, 2, f2)).release()  # evicts version 1 for size
    assert cache.stats.evictions == 1
    assert held.kek == bytes([1]) * 32  # still usable by its holder
    second = await cache.get_or_fetch(K, 2, f2)
    cache.invalidate_all()
    assert second.kek == bytes([2]) * 32
    held.release()
    assert f1.issued[0].zeroized
    assert not f2.issued[0].zeroized
    second.release()
    second.release()  # idempotent
    assert f2.issued[0].zeroized
    with pytest.raises(ValueError):
        _ = second.kek
    assert "redacted" not in repr(second) and "\\x02" not in repr(second)


async def test_invalidations() -> None:
    cache, _ = make()
    fs = {(name, v): Fetcher(vid=v) for name in (K, K2) for v in (1, 2)}
    for (name, v), f in fs.items():
        (await cache.get_or_fetch(name, v, f)).release()
    (await cache.get_or_fetch(K, PRIMARY, Fetcher(vid=2))).release()  # replaces (K, 2)
    assert fs[(K, 2)].issued[0].zeroized
    cache.invalidate_version(K, 2)
    assert cache.lookup(K, PRIMARY) is None and cache.lookup(K, 2) is None
    cache.lookup(K, 1).release()  # type: ignore[union-attr]
    cache.invalidate_key(K)
    assert cache.lookup(K, 1) is None and fs[(K, 1)].issued[0].zeroized
    cache.lookup(K2, 1).release()  # type: ignore[union-attr]
    cache.invalidate_all()
    assert len(cache) == 0
    assert all(f.issued[0].zeroized for f in fs.values())
    assert cache.stats.invalidations == 4


async def test_fetch_in_flight_during_invalidation_is_served_but_not_cached() -> None:
    cache, _ = make()
    gate = asyncio.Event()
    f = Fetcher(vid=1, gate=gate)
    task = asyncio.ensure_future(cache.get_or_fetch(K, PRIMARY, f))
    await asyncio.sleep(0)
    cache.invalidate_key(K)
    gate.set()
    lease = await task
    assert lease.kek == bytes([1]) * 32
    assert cache.lookup(K, PRIMARY) is None and cache.lookup(K, 1) is None
    lease.release()
    assert f.issued[0].zeroized


async def test_stats_for_many_encrypts() -> None:
    cache, timer = make()
    f = Fetcher(vid=1)
    for i in range(100_000):
        if i % 1000 == 0:
            timer.now += 0.5  # 100k calls over 50 s
        lease = cache.lookup(K, PRIMARY) or await cache.get_or_fetch(K, PRIMARY, f)
        lease.release()
    assert f.calls == 1 and cache.stats.fetches == 1
    assert cache.stats.hits == 99_999


def test_no_key_bytes_in_reprs() -> None:
    cache, _ = make()
    assert "KekCache" in repr(cache)
    assert "xx" not in repr(FetchedKek(1, SecretBytes(b"x" * 32)))


async def test_memory_of_ten_thousand_entries() -> None:
    cache, _ = make()
    names = [f"projects/p/locations/l/keyRings/r/cryptoKeys/k{i}" for i in range(10_000)]
    fetched = [FetchedKek(1, kek(i)) for i in range(10_000)]

    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for name, item in zip(names, fetched, strict=True):
            async def fetch(item: FetchedKek = item) -> FetchedKek:
                return item
            (await cache.get_or_fetch(name, PRIMARY, fetch)).release()
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(cache) == 10_000
    per_entry = used / 10_000
    print(f"KekCache: {per_entry:.0f} bytes per entry (bookkeeping, excluding the KEK)")
    assert per_entry < 1024


async def test_release_from_a_worker_thread() -> None:
    cache, _ = make()
    f = Fetcher(vid=1)
    lease = await cache.get_or_fetch(K, 1, f)
    cache.invalidate_key(K)
    assert not f.issued[0].zeroized
    await asyncio.to_thread(lease.release)
    assert f.issued[0].zeroized


def test_rejects_bad_limits() -> None:
    for kw in ({"ttl_s": 0}, {"max_uses": 0}, {"max_entries": 0}):
        with pytest.raises(ValueError):
            KekCache(**kw)  # type: ignore[arg-type]


class KekCacheMachine(RuleBasedStateMachine):
    """Random fetches, uses, releases, time and invalidations. Invariants: a held
    KEK is never wiped; a KEK that is neither cached nor held is wiped; the
    size bound holds; a cached entry is served only within its TTL."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.timer = FakeTimer()
        self.cache = KekCache(ttl_s=10, max_uses=4, max_entries=3, timer=self.timer)
        self.issued: list[SecretBytes] = []
        self.held: list[Lease] = []

    def teardown(self) -> None:
        self.loop.close()

    def _fetcher(self, vid: int) -> Callable[[], Awaitable[FetchedKek]]:
        async def fetch() -> FetchedKek:
            secret = kek(vid)
            self.issued.append(secret)
            return FetchedKek(vid, secret)
        return fetch

    @rule(name=st.sampled_from([K, K2]), vid=st.sampled_from([PRIMARY, 1, 2]),
          keep=st.booleans())
    def use(self, name: str, vid: int, keep: bool) -> None:
        lease = self.loop.run_until_complete(
            self.cache.get_or_fetch(name, vid, self._fetcher(vid or 2)))
        assert lease.kek == bytes([lease.version_id]) * 32
        if keep:
            self.held.append(lease)
        else:
            lease.release()

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.held:
            i = data.draw(st.integers(0, len(self.held) - 1))
            self.held.pop(i).release()

    @rule(dt=st.floats(0, 8))
    def advance(self, dt: float) -> None:
        self.timer.now += dt

    @rule(name=st.sampled_from([K, K2]))
    def invalidate_key(self, name: str) -> None:
        self.cache.invalidate_key(name)

    @rule(name=st.sampled_from([K, K2]), vid=st.sampled_from([1, 2]))
    def invalidate_version(self, name: str, vid: int) -> None:
        self.cache.invalidate_version(name, vid)

    @rule()
    def invalidate_all(self) -> None:
        self.cache.invalidate_all()

    @invariant()
    def secrets_wiped_exactly_when_unused(self) -> None:
        self.cache.expire()
        assert len(self.cache) <= 3
        cached = {id(e.kek) for e in self.cache._entries.values()}
        held = {id(lease.kek) for lease in self.held}
        for secret in self.issued:
            assert secret.zeroized == (id(secret) not in cached | held)

    @invariant()
    def one_shared_name_per_cached_key(self) -> None:
        """The cache keeps one copy of each key name, counted by its live
        entries, and forgets it with the last of them."""
        self.cache.expire()
        per_name: dict[str, int] = {}
        for entry in self.cache._entries.values():
            per_name[entry.key_name] = per_name.get(entry.key_name, 0) + 1
            assert entry.key_name is self.cache._names[entry.key_name].name
        assert {n: c.entries for n, c in self.cache._names.items()} == per_name


TestKekCacheMachine = KekCacheMachine.TestCase
TestKekCacheMachine.settings = settings(max_examples=60, stateful_step_count=30,
                                        deadline=None)
