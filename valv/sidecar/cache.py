"""The sidecar's cache of unwrapped KEK versions (DESIGN.md §5, "Cache limits").

Core logic only: no network code. The sidecar's Encrypt/Decrypt path asks
this cache for a KEK; on a miss it passes a ``fetch`` coroutine that calls
central's private service.

Entries are keyed by (CryptoKey name, version id). Each key also has a
"primary" pointer (ask for :data:`PRIMARY` instead of a version id) used by
Encrypt. The pointer lives exactly as long as the entry it points to.

Limits, per entry:

- a TTL (default 60 s) from an injectable monotonic ``timer``; the TTL runs
  from when the material was fetched and is *not* extended by use. A fetch
  may bring a shorter TTL of its own (central's limit: the entry keeps the
  shorter of the two). Expired entries are never served; they are wiped by
  the next cache call or by :meth:`KekCache.expire`;
- a max-uses bound (default 1,000,000 acquisitions, Encrypt and Decrypt
  alike). The use that reaches the bound is served; the entry then leaves the
  cache and the next call refetches;
- a place under a total bound (``maxsize`` entries, default 10,000) with
  least-recently-used eviction (cachetools ``TLRUCache``: LRU, with a
  time-to-use per entry).

Refresh ahead (``refresh_ahead_s``, off by default; the sidecar uses a fifth
of the TTL; scaled down with an entry's shorter TTL): an entry used in its
last ``refresh_ahead_s`` is fetched again
in the background while it keeps serving, and the fresh copy replaces it. A
busy key then never expires under its callers (no latency spike, no burst of
misses), and a central outage is felt only once the old copy's TTL has
really run out: a failed refresh changes nothing.

Zeroization. The cache owns the ``SecretBytes`` a fetch returns. A caller
holds a :class:`Lease` (a context manager) while it uses the key, which
counts as a reference. An entry that leaves the cache (expired, used up,
evicted for size, invalidated or replaced) is zeroized at once if no lease
holds it, otherwise when its last lease is released. So a KEK is never
wiped under a caller, and never outlives its last user once evicted.

Central unreachable (serve stale until TTL). The cache never talks to
central itself: a cached entry keeps serving until its TTL whatever central's
state, and after that :meth:`KekCache.lookup` reports a miss and
:meth:`KekCache.get_or_fetch` calls ``fetch``. If central is down that fetch
raises; the error goes to every coalesced waiter, nothing is cached, and the
next call tries again. The caller (the sidecar's servicer) must turn a failed
fetch into UNAVAILABLE. Nothing is ever served past its TTL: the cache never
fails open.

Miss coalescing. Concurrent misses for the same (key, version) — or for the
same key's primary — share one fetch, run as its own task so a cancelled
waiter does not cancel the others. A fetch that was in flight when its key
was invalidated still answers its waiters (their calls began before the
invalidation) but its result is not cached, and is zeroized once they are
done with it.

Invalidation (for the watch stream): :meth:`KekCache.invalidate_key`,
:meth:`KekCache.invalidate_version`, :meth:`KekCache.invalidate_prefix`
(every key of a KeyRing), :meth:`KekCache.invalidate_all` (after a gap in
the stream).

Threads: state changes take a lock, so leases may be released from worker
threads; ``get_or_fetch`` itself belongs to one event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from cachetools import TLRUCache

from valv.core.crypto.secrets import SecretBytes

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_USES",
    "DEFAULT_TTL_SECONDS",
    "PRIMARY",
    "CacheStats",
    "FetchedKek",
    "KekCache",
    "Lease",
]

DEFAULT_TTL_SECONDS: Final = 60.0
DEFAULT_MAX_USES: Final = 1_000_000
DEFAULT_MAX_ENTRIES: Final = 10_000

#: Pass as the version to mean "the key's primary version" (version ids are >= 1).
PRIMARY: Final = 0


@dataclass(frozen=True, slots=True)
class FetchedKek:
    """What a fetch returns: a version id and its unwrapped KEK.

    The cache takes ownership of ``kek`` and zeroizes it when done with it.
    For a :data:`PRIMARY` fetch, ``version_id`` is the key's primary version.
    """

    version_id: int
    kek: SecretBytes
    # Whether the version was the key's primary when fetched (a change of
    # primary invalidates the key, so this stays true while the entry lives).
    is_primary: bool = False
    # The longest the source allows this material to serve (central's TTL), in
    # seconds; None or <= 0: no limit of its own, the cache's TTL applies.
    ttl_s: float | None = None

    def __repr__(self) -> str:
        return (f"FetchedKek(version_id={self.version_id}, is_primary={self.is_primary}, "
                f"ttl_s={self.ttl_s})")


class _Entry:
    __slots__ = ("expires_at", "is_primary", "kek", "key_name", "refresh_at", "refs", "retired",
                 "uses", "version_id")

    def __init__(self, key_name: str, version_id: int, kek: SecretBytes,
                 is_primary: bool = False, expires_at: float = 0.0,
                 refresh_at: float = 0.0) -> None:
        self.key_name = key_name
        self.version_id = version_id
        self.kek = kek
        self.is_primary = is_primary
        self.expires_at = expires_at  # on the cache's timer; never served from then on
        self.refresh_at = refresh_at  # used from then on: fetched again in the background
        self.uses = 0
        self.refs = 0
        self.retired = False  # no longer in the cache


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    fetches: int = 0  # fetches started (coalesced misses share one; refreshes included)
    refreshes: int = 0  # of which refresh-ahead fetches for entries still live
    fetch_errors: int = 0
    evictions: int = 0  # for size (LRU)
    expirations: int = 0  # TTL
    exhausted: int = 0  # max uses
    invalidations: int = 0  # entries removed by invalidate_*


class Lease:
    """A reference to a cached KEK; the KEK is not wiped while a lease holds it.

    Use it as a context manager, or call :meth:`release` (idempotent).
    """

    __slots__ = ("_cache", "_entry")

    def __init__(self, cache: KekCache, entry: _Entry) -> None:
        self._cache: KekCache | None = cache
        self._entry = entry

    @property
    def kek(self) -> SecretBytes:
        if self._cache is None:
            raise ValueError("this lease has been released")
        return self._entry.kek

    @property
    def key_name(self) -> str:
        return self._entry.key_name

    @property
    def version_id(self) -> int:
        return self._entry.version_id

    @property
    def is_primary(self) -> bool:
        return self._entry.is_primary

    def release(self) -> None:
        cache, self._cache = self._cache, None
        if cache is not None:
            cache._release(self._entry)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._cache is None else "held"
        return f"Lease({self._entry.key_name!r}, version={self._entry.version_id}, {state})"


_CacheKey = tuple[str, int]


def _expiry(_key: _CacheKey, entry: _Entry, _now: float) -> float:
    return entry.expires_at


class _Entries(TLRUCache[_CacheKey, _Entry, float]):
    """A TLRUCache (each entry expires at its own ``expires_at``) that tells its
    owner about every entry it drops by itself."""

    def __init__(self, owner: KekCache, maxsize: int, timer: Callable[[], float]) -> None:
        super().__init__(maxsize, _expiry, timer)
        self._owner = owner

    def expire(self, time: float | None = None) -> list[tuple[_CacheKey, _Entry]]:
        expired = super().expire(time)
        for _, entry in expired:
            self._owner.stats.expirations += 1
            self._owner._retire(entry)
        return expired

    def popitem(self) -> tuple[_CacheKey, _Entry]:
        key, entry = super().popitem()
        self._owner.stats.evictions += 1
        self._owner._retire(entry)
        return key, entry


class _Name:
    __slots__ = ("entries", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries = 0


class _Flight:
    __slots__ = ("entry", "ref_held", "stale", "task", "waiters")

    def __init__(self) -> None:
        self.task: asyncio.Task[_Entry] | None = None
        self.waiters = 0
        self.stale = False  # invalidated while in flight: do not cache the result
        self.entry: _Entry | None = None
        self.ref_held = False  # the flight's own reference, until all waiters have theirs


class KekCache:
    def __init__(self, *, ttl_s: float = DEFAULT_TTL_SECONDS,
                 max_uses: int = DEFAULT_MAX_USES,
                 max_entries: int = DEFAULT_MAX_ENTRIES,
                 refresh_ahead_s: float = 0.0,
                 timer: Callable[[], float] = time.monotonic,
                 on_wipe: Callable[[str, int], object] | None = None) -> None:
        """``on_wipe(key_name, version_id)`` is called each time a KEK is wiped, so
        what was derived from it (the sidecar's subkeys) can go with it."""
        if ttl_s <= 0 or max_uses < 1 or max_entries < 1:
            raise ValueError("ttl_s must be > 0, max_uses and max_entries >= 1")
        if not 0 <= refresh_ahead_s < ttl_s:
            raise ValueError("refresh_ahead_s must be in [0, ttl_s)")
        self.ttl_s = ttl_s
        self.refresh_ahead_s = refresh_ahead_s
        self._timer = timer
        self.max_uses = max_uses
        self.max_entries = max_entries
        self.stats = CacheStats()
        self._on_wipe = on_wipe
        self._lock = threading.RLock()
        self._entries = _Entries(self, max_entries, timer)
        # key name -> primary version id; only while (name, id) is cached.
        self._primary: dict[str, int] = {}
        # key name -> one shared copy of it and how many cached entries use it.
        # Each request brings its own copy of the name; kept per entry, 10,000
        # versions of a key held 10,000 copies (~130 bytes each).
        self._names: dict[str, _Name] = {}
        self._flights: dict[_CacheKey, _Flight] = {}

    def __len__(self) -> int:
        with self._lock:
            self._entries.expire()
            return len(self._entries)

    def expire(self) -> None:
        """Wipe entries whose TTL has passed. Every call does this as it goes;
        an idle sidecar should call it from a periodic timer (say every
        second) so expired material does not linger until the next call."""
        with self._lock:
            self._entries.expire()

    # -- lookups ----------------------------------------------------------------

    def lookup(self, key_name: str, version_id: int = PRIMARY) -> Lease | None:
        """A lease on a live cached entry (counting one use), or None on a miss."""
        with self._lock:
            entry = self._find(key_name, version_id)
            if entry is None:
                self.stats.misses += 1
                return None
            self.stats.hits += 1
            return self._acquire(entry)

    async def get_or_fetch(self, key_name: str, version_id: int,
                           fetch: Callable[[], Awaitable[FetchedKek]]) -> Lease:
        """A lease on the cached entry, fetching it (once for all concurrent
        misses) when absent. A fetch error is raised to every waiter."""
        lease = self.lookup(key_name, version_id)
        if lease is not None:
            if self.refresh_ahead_s and (key_name, version_id) not in self._flights and \
                    self._timer() >= lease._entry.refresh_at:
                # Used in its last refresh_ahead_s: fetch a fresh copy in the
                # background, so a busy entry never runs out under its callers.
                self.stats.refreshes += 1
                self._start_flight(key_name, version_id, fetch)
            return lease
        flight = self._flights.get((key_name, version_id))
        if flight is None:
            flight = self._start_flight(key_name, version_id, fetch)
        assert flight.task is not None
        flight.waiters += 1
        try:
            entry = await asyncio.shield(flight.task)
            with self._lock:
                return self._acquire(entry)
        finally:
            flight.waiters -= 1
            self._land(flight)

    def _start_flight(self, key_name: str, version_id: int,
                      fetch: Callable[[], Awaitable[FetchedKek]]) -> _Flight:
        flight = _Flight()
        self._flights[(key_name, version_id)] = flight
        self.stats.fetches += 1
        task = asyncio.ensure_future(self._fly(flight, key_name, version_id, fetch))
        flight.task = task

        def landed(_task: asyncio.Task[_Entry], flight: _Flight = flight) -> None:
            self._land(flight)

        task.add_done_callback(landed)
        return flight

    def use(self, key_name: str, version_id: int,
            fetch: Callable[[], Awaitable[FetchedKek]]) -> _Use:
        """``async with cache.use(name, version, fetch) as lease: ...``"""
        return _Use(self, key_name, version_id, fetch)

    # -- invalidation -----------------------------------------------------------

    def invalidate_key(self, key_name: str) -> None:
        """Drop every version of ``key_name`` and its primary pointer."""
        with self._lock:
            self._entries.expire()
            for cache_key in [k for k in self._entries if k[0] == key_name]:
                self.stats.invalidations += self._remove(cache_key)
            self._primary.pop(key_name, None)
            for (name, _), flight in self._flights.items():
                if name == key_name:
                    flight.stale = True

    def invalidate_version(self, key_name: str, version_id: int) -> None:
        """Drop one version (and the key's primary pointer if it points there)."""
        with self._lock:
            self._entries.expire()
            self.stats.invalidations += self._remove((key_name, version_id))
            for (name, vid), flight in self._flights.items():
                if name == key_name and vid in (version_id, PRIMARY):
                    flight.stale = True

    def invalidate_prefix(self, parent: str) -> None:
        """Drop every key under ``parent`` (a KeyRing name: ``parent/cryptoKeys/...``)."""
        prefix = parent.rstrip("/") + "/"
        with self._lock:
            self._entries.expire()
            for cache_key in [k for k in self._entries if k[0].startswith(prefix)]:
                self.stats.invalidations += self._remove(cache_key)
            for name in [n for n in self._primary if n.startswith(prefix)]:
                del self._primary[name]
            for (name, _), flight in self._flights.items():
                if name.startswith(prefix):
                    flight.stale = True

    def invalidate_all(self) -> None:
        """Drop everything, e.g. after the watch stream reconnects or reports a gap."""
        with self._lock:
            self._entries.expire()
            for cache_key in list(self._entries):
                self.stats.invalidations += self._remove(cache_key)
            self._primary.clear()
            for flight in self._flights.values():
                flight.stale = True

    # -- internals (callers hold self._lock) -------------------------------------

    def _find(self, key_name: str, version_id: int) -> _Entry | None:
        if version_id == PRIMARY:
            vid = self._primary.get(key_name)
            if vid is None:
                return None
            version_id = vid
        entry: _Entry | None = self._entries.get((key_name, version_id))
        if entry is None:
            self._entries.expire()  # wipe what has run out, pointer included
        return entry

    def _acquire(self, entry: _Entry) -> Lease:
        entry.refs += 1
        entry.uses += 1
        if entry.uses >= self.max_uses and not entry.retired:
            self.stats.exhausted += 1
            self._remove((entry.key_name, entry.version_id))
        return Lease(self, entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.refs == 0 and entry.retired:
                self._wipe(entry)

    def _retire(self, entry: _Entry) -> None:
        """The entry has left the cache: wipe it now or at its last release."""
        if not entry.retired:
            name = self._names.get(entry.key_name)
            if name is not None:
                name.entries -= 1
                if name.entries <= 0:
                    del self._names[entry.key_name]
        entry.retired = True
        if self._primary.get(entry.key_name) == entry.version_id:
            del self._primary[entry.key_name]
        if entry.refs == 0:
            self._wipe(entry)

    def _wipe(self, entry: _Entry) -> None:
        entry.kek.zeroize()
        if self._on_wipe is not None:
            self._on_wipe(entry.key_name, entry.version_id)

    def _remove(self, cache_key: _CacheKey) -> bool:
        """Take a live entry out of the cache; False if it was not there."""
        entry: _Entry | None = self._entries.get(cache_key)
        if entry is None:
            return False
        try:
            del self._entries[cache_key]
        except KeyError:
            pass  # it expired just now; deleted all the same
        self._retire(entry)
        return True

    def _store(self, flight: _Flight, key_name: str, version_id: int,
               fetched: FetchedKek) -> _Entry:
        if not flight.stale:
            self._remove((key_name, fetched.version_id))  # an older copy fetched meanwhile
            key_name = self._shared_name(key_name)
        ttl = self.ttl_s
        if fetched.ttl_s is not None and 0 < fetched.ttl_s < ttl:
            ttl = fetched.ttl_s
        now = self._timer()
        entry = _Entry(key_name, fetched.version_id, fetched.kek, fetched.is_primary,
                       expires_at=now + ttl,
                       refresh_at=now + ttl - self.refresh_ahead_s * ttl / self.ttl_s)
        entry.refs = 1  # the flight's reference, until every waiter has its own
        flight.entry = entry
        flight.ref_held = True
        if flight.stale:
            entry.retired = True
            return entry
        self._entries[(key_name, fetched.version_id)] = entry
        if version_id == PRIMARY:
            self._primary[key_name] = fetched.version_id
        return entry

    def _shared_name(self, key_name: str) -> str:
        """The one copy of ``key_name`` the cache keeps, counting one more entry."""
        name = self._names.get(key_name)
        if name is None:
            name = self._names[key_name] = _Name(key_name)
        name.entries += 1
        return name.name

    async def _fly(self, flight: _Flight, key_name: str, version_id: int,
                   fetch: Callable[[], Awaitable[FetchedKek]]) -> _Entry:
        try:
            try:
                fetched = await fetch()
            except BaseException:
                self.stats.fetch_errors += 1
                raise
            if not isinstance(fetched, FetchedKek) or (
                    version_id != PRIMARY and fetched.version_id != version_id):
                self.stats.fetch_errors += 1
                if isinstance(fetched, FetchedKek):
                    fetched.kek.zeroize()
                raise ValueError(
                    f"fetch for {key_name} version {version_id} returned the wrong version")
            with self._lock:
                return self._store(flight, key_name, version_id, fetched)
        finally:
            if self._flights.get((key_name, version_id)) is flight:
                del self._flights[(key_name, version_id)]

    def _land(self, flight: _Flight) -> None:
        """Drop the flight's own reference once it is done and every waiter
        has taken its lease (or given up)."""
        task = flight.task
        if task is None or not task.done():
            return
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning if nobody waited
        if flight.waiters == 0 and flight.ref_held and flight.entry is not None:
            flight.ref_held = False
            self._release(flight.entry)


class _Use:
    __slots__ = ("_args", "_cache", "_lease")

    def __init__(self, cache: KekCache, key_name: str, version_id: int,
                 fetch: Callable[[], Awaitable[FetchedKek]]) -> None:
        self._cache = cache
        self._args = (key_name, version_id, fetch)
        self._lease: Lease | None = None

    async def __aenter__(self) -> Lease:
        self._lease = await self._cache.get_or_fetch(*self._args)
        return self._lease

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._lease is not None:
            self._lease.release()
