"""The change log: every change, in order, for every central to follow.

Each change (KeyStore._change: key and version changes, the scheduler's
rotations and destructions, IAM policies) appends one entry in its own
transaction, so a committed change always has its entry and an uncommitted
one never does:

    ("log", seq:int)   ChangeRecord {seq, time_us, kind, resource}
    ("log-head",)      ChangeLogHead {last_seq, first_seq}
    ("log-epoch",)     ChangeLogEpoch {epoch}: which incarnation of the log
                       this is; a restore clears it and the next central to
                       start makes a new one (``ensure_epoch``)

Seqs are gap-free. On SQLite each append reads the head, writes
``last_seq + 1`` and moves the head, in the change's transaction (writers are
serialized anyway). On FoundationDB that would make every change conflict on
the head, so there versionstamps order the log: a change *stages* its entry
at ``("log-stage", <versionstamp>)``, a key FDB fills in at commit in commit
order, with no read; and every central's follower, before it reads, moves
staged entries to their seqs in that order (``sequence``; only sequencers
touch the head, and FDB retries the one that loses a race). Readers see
sequenced entries only, so ``read_since`` and the Watch stream are the same
on both.

Kinds: ``crypto_key`` (the key record changed: primary, rotation, template,
labels; resource: the key), ``version`` (a version was created or changed
state, was destroyed or restored; resource: the version), ``iam`` (a policy
was set; resource: the KeyRing or CryptoKey), ``key_ring`` (created),
``root_keys`` (an RMK rotation finished, valv.core.rmk_rotation; resource:
empty: whoever caches key material drops all of it).

Every central runs a ChangeFollower: it polls for entries after the last seq
it has seen and drops what it caches about each changed resource, so a change
through another central reaches it within the poll interval instead of the
cache TTL. ``wake()`` makes it poll at once: central calls it when a change
through itself commits (KeyStore.after_change), so its own changes reach its
listeners (and the sidecars' Watch streams, valv.core.changehub) in
milliseconds. The poll interval then only bounds changes through other
centrals. Whatever learns of a commit can call ``wake()``. On a store that
watches keys (FoundationDB: ``Store.supports_watches``) the follower does not
poll the log: it waits on a watch of the head key, which every numbered change
moves (the central that made a change numbers it at once, through ``wake()``),
so a change through another central arrives in milliseconds too. The watch is
armed before the head is read again, so nothing falls between a read and the
watch; ``WATCH_FALLBACK_S`` (10 s) only bounds the wait, for a failing watch.
What writers stage is numbered by every central every ``poll_interval_s``
(``_sequence_staged_until``: snapshot reads of the staging prefixes), which
also covers a central that crashed before numbering its own change.
``read_since`` is the same read for the sidecar Watch stream.

Retention: entries older than RETENTION (1 hour) are trimmed, a bounded batch
per transaction, by every follower (any number may race: each batch re-reads
the head). A reader that asks for seqs already trimmed gets ``gap=True`` and
must revalidate everything it holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from valv.core import records
from valv.core.clock import Clock, to_micros
from valv.core.storage import journal
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import pack
from valv.core.storage.sealed import SealedTransaction

log = logging.getLogger("valv.changelog")

CRYPTO_KEY = "crypto_key"
VERSION = "version"
IAM = "iam"
KEY_RING = "key_ring"
ROOT_KEYS = "root_keys"
KINDS = frozenset({CRYPTO_KEY, VERSION, IAM, KEY_RING, ROOT_KEYS})

RETENTION = timedelta(hours=1)
DEFAULT_POLL_INTERVAL_S = 0.2
# On a store with watches the follower doesn't poll; this bounds its wait anyway.
WATCH_FALLBACK_S = 10.0
READ_LIMIT = 1000
TRIM_BATCH = 1000
TRIM_INTERVAL_S = 60.0
# Entries staged at versionstamped keys, waiting for ``sequence`` (FoundationDB).
STAGE_PREFIX = pack("log-stage")


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    time_us: int
    kind: str
    resource: str


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    """What ``read_since`` found: ``changes`` in seq order, and the seq to resume after.

    ``gap``: entries after the requested seq were trimmed (or the log is behind
    it, e.g. a restored backup), so the reader missed changes and must
    revalidate everything; ``changes`` then starts at the oldest retained one.
    """

    changes: list[Change] = field(default_factory=list)
    last_seq: int = 0
    gap: bool = False


def append(tr: Transaction, now_us: int, kind: str, resource: str) -> int:
    """Append one entry in ``tr``, the change's own transaction; its seq.

    Where the store has versionstamps (FoundationDB), the entry is staged
    instead, so concurrent changes don't conflict on the head, and ``sequence``
    gives it its seq (returns 0 then).
    """
    if tr.supports_versionstamps:
        tr.set_versionstamped(STAGE_PREFIX, records.encode_change(0, now_us, kind, resource))
        return 0
    last_seq, first_seq = records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))
    seq = last_seq + 1
    tr.set(records.change_key(seq), records.encode_change(seq, now_us, kind, resource))
    tr.set(records.CHANGE_HEAD_KEY, records.encode_change_head(seq, first_seq))
    return seq


def sequence_body(tr: Transaction, limit: int = READ_LIMIT) -> int:
    """Give staged entries their seqs, in commit (versionstamp) order; how many."""
    assert isinstance(tr, SealedTransaction), "the change log is read and written sealed"
    staged = tr.get_stamped_range(STAGE_PREFIX, limit=limit)
    if not staged:
        return 0
    last_seq, first_seq = records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))
    for key, value in staged:
        record = records.decode_change(key, value)
        last_seq += 1
        tr.set(records.change_key(last_seq),
               records.encode_change(last_seq, int(record.time_us), record.kind,
                                     record.resource))
        tr.clear(key)
    tr.set(records.CHANGE_HEAD_KEY, records.encode_change_head(last_seq, first_seq))
    return len(staged)


async def sequence(store: Store, *, always: bool = False) -> int:
    """Sequence what is staged (FoundationDB); how many. Safe to run anywhere, any
    number of times at once: sequencers conflict on the head, and retry.

    ``always``: also on a store without versionstamps, which can hold staged
    entries only if a backup of a FoundationDB store was restored into it
    (central runs this at startup, before it writes anything)."""
    if not store.supports_versionstamps and not always:
        return 0
    total = 0
    while True:
        moved = await store.run(sequence_body)
        total += moved
        if moved < READ_LIMIT:
            return total


def _decode(key: bytes, value: bytes) -> Change:
    record = records.decode_change(key, value)
    return Change(int(record.seq), int(record.time_us), record.kind, record.resource)


def read_since_body(tr: Transaction, seq: int, limit: int) -> ChangeBatch:
    last_seq, first_seq = records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))
    gap = seq + 1 < first_seq or seq > last_seq
    start = first_seq if gap else seq + 1
    if start > last_seq:
        return ChangeBatch([], last_seq, gap)
    begin, end = records.changes_range(start, last_seq + 1)
    changes = [_decode(key, value) for key, value in tr.get_range(begin, end, limit=limit)]
    resume = changes[-1].seq if changes else last_seq
    return ChangeBatch(changes, resume, gap)


async def read_since(store: Store, seq: int, limit: int = READ_LIMIT) -> ChangeBatch:
    """Entries after ``seq``, at most ``limit``, in one read-only transaction."""
    return await store.run(lambda tr: read_since_body(tr, seq, limit), read_only=True)


async def ensure_epoch(store: Store) -> bytes:
    """The store's change-log epoch, made now (16 random bytes) if it has none:
    a new store, or one just restored (a restore clears it). Seqs are only
    comparable within an epoch, so a Watch resumed across a restore resets.
    Any number of centrals may race here: the transaction makes one epoch."""
    def body(tr: Transaction) -> bytes:
        current = records.decode_change_epoch(tr.get(records.CHANGE_EPOCH_KEY))
        if current:
            return current
        fresh = os.urandom(16)
        tr.set(records.CHANGE_EPOCH_KEY, records.encode_change_epoch(fresh))
        return fresh

    return await store.run(body)


async def head_and_epoch(store: Store) -> tuple[int, bytes]:
    """The last seq handed out, and the epoch it belongs to, read together."""
    def body(tr: Transaction) -> tuple[int, bytes]:
        return (records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))[0],
                records.decode_change_epoch(tr.get(records.CHANGE_EPOCH_KEY)))

    return await store.run(body, read_only=True)


async def head(store: Store) -> int:
    """The last seq handed out (0: none yet)."""
    def body(tr: Transaction) -> int:
        return records.decode_change_head(tr.get(records.CHANGE_HEAD_KEY))[0]

    return await store.run(body, read_only=True)


async def trim(store: Store, clock: Clock, retention: timedelta = RETENTION,
               batch: int = TRIM_BATCH) -> int:
    """Remove entries older than ``retention``, ``batch`` per transaction; how many."""
    cutoff_us = to_micros(clock.now() - retention)

    def body(tr: Transaction) -> int:
        raw = tr.get(records.CHANGE_HEAD_KEY)
        last_seq, first_seq = records.decode_change_head(raw)
        begin, end = records.changes_range(first_seq, last_seq + 1)
        removed = 0
        for key, value in tr.get_range(begin, end, limit=batch):
            if _decode(key, value).time_us >= cutoff_us:
                break
            tr.clear(key)
            removed += 1
        if removed:
            tr.set(records.CHANGE_HEAD_KEY,
                   records.encode_change_head(last_seq, first_seq + removed))
        return removed

    total = 0
    while True:
        removed = await store.run(body)
        total += removed
        if removed < batch:
            return total


class ChangeListener(Protocol):
    """What a follower tells: ``changed`` for each entry, ``reset`` after a gap."""

    def changed(self, change: Change) -> None: ...

    def reset(self) -> None: ...


class ChangeFollower:
    """Follows the change log and tells ``listeners`` (caches) what changed."""

    def __init__(self, store: Store, clock: Clock, listeners: Sequence[ChangeListener], *,
                 poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 retention: timedelta = RETENTION,
                 trim_interval_s: float = TRIM_INTERVAL_S,
                 sequencers: Sequence[Callable[[], Awaitable[int]]] = (),
                 watch_fallback_s: float = WATCH_FALLBACK_S) -> None:
        if poll_interval_s <= 0 or watch_fallback_s <= 0:
            raise ValueError("the change log poll interval must be positive")
        self._store = store
        self._clock = clock
        self._listeners = list(listeners)
        self.poll_interval_s = poll_interval_s
        # On a store with watches: the longest wait between polls (see _idle).
        self.watch_fallback_s = max(poll_interval_s, watch_fallback_s)
        self._retention = retention
        self._trim_interval_s = trim_interval_s
        # Other logs to sequence before each poll on a store with versionstamps
        # (the audit log's AuditLog.chain); the change log's and the journal's
        # own are always run.
        self._sequencers = list(sequencers)
        # The last seq seen; None until start() (or the first poll) reads the head.
        self.seen: int | None = None
        # Set by wake(): poll now rather than at the end of the interval.
        self._wakeup = asyncio.Event()

    def wake(self) -> None:
        """Poll as soon as possible (a change was just committed). Event-loop thread only."""
        self._wakeup.set()

    async def start(self) -> None:
        """Begin at the current head: caches start empty, so older changes don't matter."""
        self.seen = await head(self._store)

    async def sequence_staged(self) -> int:
        """Number what writers (through any central) left staged, on a store with
        versionstamps: the change log, then the other logs, the journal last
        (sequencing the others journals staged entries of its own). How many
        change-log entries were numbered."""
        if not self._store.supports_versionstamps:
            return 0
        numbered = await sequence(self._store)
        for sequencer in self._sequencers:
            await sequencer()
        await journal.sequence(self._store)
        return numbered

    async def poll(self) -> int:
        """Read and apply everything new; how many entries were applied."""
        await self.sequence_staged()
        if self.seen is None:
            # start() failed (e.g. the head is unreadable): begin now, and drop
            # whatever was cached meanwhile, as after a gap.
            await self.start()
            for listener in self._listeners:
                listener.reset()
        applied = 0
        while True:
            assert self.seen is not None
            batch = await read_since(self._store, self.seen)
            if batch.gap:
                log.warning("change log entries were missed (trimmed, or the store went "
                            "back); dropping every cached key state and policy",
                            extra={"fields": {"seen": self.seen, "resume": batch.last_seq}})
                for listener in self._listeners:
                    listener.reset()
            for change in batch.changes:
                for listener in self._listeners:
                    listener.changed(change)
            applied += len(batch.changes)
            self.seen = batch.last_seq
            if len(batch.changes) < READ_LIMIT:
                return applied

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``poll_interval_s`` (on a store with watches: when the head
        moves), and trim now and then, until ``stop`` is set."""
        sequencing: asyncio.Task[None] | None = None
        if self._store.supports_versionstamps and self._store.supports_watches:
            sequencing = asyncio.create_task(self._sequence_staged_until(stop))
        try:
            await self._follow(stop)
        finally:
            if sequencing is not None:
                sequencing.cancel()
                await asyncio.gather(sequencing, return_exceptions=True)

    async def _sequence_staged_until(self, stop: asyncio.Event) -> None:
        """On FoundationDB the follower reads the log only when its head moves, but
        the audit records and journal entries writers stage don't move it: number
        them every ``poll_interval_s`` (three snapshot range reads, empty when
        idle), so none stays staged (deletable unnoticed) for long. Change-log
        entries numbered here move the head, which wakes every follower."""
        failing = False
        while not stop.is_set():
            try:
                await self.sequence_staged()
                failing = False
            except Exception:
                if not failing:
                    log.exception("numbering staged log entries failed; retrying every "
                                  "%.1f s", self.poll_interval_s)
                failing = True
            try:
                await asyncio.wait_for(stop.wait(), self.poll_interval_s)
            except TimeoutError:
                pass

    async def _follow(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_trim = loop.time()
        failing = False
        while not stop.is_set():
            # Cleared before the poll: a wake() during it means another poll at once.
            self._wakeup.clear()
            try:
                await self.poll()
                failing = False
            except Exception:
                if not failing:  # once per failure streak, not every poll
                    log.exception("change log poll failed; retrying every %.1f s (changes "
                                  "through other centrals arrive within the cache TTL "
                                  "meanwhile)", self.poll_interval_s)
                failing = True
            if loop.time() >= next_trim:
                next_trim = loop.time() + self._trim_interval_s
                try:
                    await trim(self._store, self._clock, self._retention)
                    # The write journal (backups) keeps the same hour; every
                    # central runs this, so a journal never grows unbounded.
                    await journal.trim(self._store, to_micros(self._clock.now()))
                except Exception:
                    log.exception("change log trim failed; retrying later")
            await self._idle(stop)

    async def _idle(self, stop: asyncio.Event) -> None:
        """Wait for the next poll: a wake(), ``stop``, or the poll interval; on a
        store with watches, a change of the log head instead of the interval.

        With watches (FoundationDB) there is no polling: the watch is armed
        first, then the head is read once more, so a change committed between
        the last poll and the watch is seen (by the read) and any later one
        fires the watch. Only ``watch_fallback_s`` (10 s) bounds the wait, for
        entries a crashed central staged and never numbered, and for a watch
        that fails (then the wait is that long too: never a tight loop)."""
        if self._wakeup.is_set():
            return
        waiters: set[asyncio.Future[bool]] = {asyncio.ensure_future(stop.wait()),
                                              asyncio.ensure_future(self._wakeup.wait())}
        if not self._store.supports_watches:
            try:
                await asyncio.wait(waiters, timeout=self.poll_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.watch_fallback_s
        armed = asyncio.Event()
        watch = asyncio.ensure_future(self._store.wait_for_change(
            records.CHANGE_HEAD_KEY, self.watch_fallback_s, armed=armed))
        is_armed = asyncio.ensure_future(armed.wait())
        pending: set[asyncio.Future[Any]] = {*waiters, watch, is_armed}
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED)
                if not done or done - {watch, is_armed}:
                    return  # the fallback interval passed, or stop / wake()
                if is_armed in done:
                    # Armed: anything from now on fires the watch. What came
                    # between the last poll and now, the head shows.
                    # (Not before a first good poll: a failing one would spin.)
                    try:
                        if self.seen is not None and await head(self._store) != self.seen:
                            return
                    except Exception:
                        log.debug("change log head read failed after arming the watch",
                                  exc_info=True)
                    done = done - {is_armed}
                if watch not in done:
                    continue
                # The watch finished. A change: poll now. Its own timeout
                # or a failed watch: wait out the interval as without watches
                # (never poll in a tight loop because watches keep failing).
                failure = None if watch.cancelled() else watch.exception()
                if failure is None and not watch.cancelled() and watch.result():
                    return
                if failure is not None:
                    log.debug("change log head watch failed; polling at the fallback interval",
                              exc_info=failure)
                pending.discard(is_armed)
        finally:
            everything: list[asyncio.Future[Any]] = [*waiters, watch, is_armed]
            for future in everything:
                future.cancel()
            if watch.done() and not watch.cancelled():
                watch.exception()  # retrieved: no "exception was never retrieved"
