"""The write journal: which key ranges each committed transaction changed.

Backups must be consistent (a restore equals the store as of one instant)
while central keeps writing, and on FoundationDB no transaction may last more
than 5 s, so a backup can't read a large store in one transaction. It reads
the store in chunks instead and then replays, from the journal, every range
written since it began (valv.core.backup). The active backup tails the
journal to write incremental segments.

``JournaledStore`` wraps a raw backend. Every read-write transaction that
writes anything appends one entry, in that same transaction, so a committed
write always has its entry and an uncommitted one never does:

    ("wj", seq:int, part:int)   JournalEntry {seq, time_us, ranges, part}
    ("wj-head",)                JournalHead {last_seq, first_seq}

Entries are sealed like every other value (the keys they list are resource
names, not secrets, but storage is untrusted: an edited journal could make a
backup miss a write). It wraps the *raw* store, below sealing, so that writes
made through ``SealedStore.inner`` (an RMK rotation's reseal) are journaled
too. Stack it as ``SealedStore(JournaledStore(raw, sealer), sealer)``, which
``journaled_store`` does.

Seqs are gap-free, as in the change log (valv.core.changelog). Where the
store has no versionstamps (SQLite, which serializes writers anyway), each
append reads the head and moves it. On FoundationDB that would make every
writer conflict on the head, so there an entry is *staged* instead, at a
versionstamped key, which orders entries by commit and needs no read:

    ("wj-stage", <versionstamp>)   JournalEntry {time_us, ranges, part}

and ``sequence`` (run by every central's change follower, and by a backup
before it reads the journal) moves staged entries, in versionstamp order, to
their seqs. Only sequencers touch the head, so only they contend. Readers
see sequenced entries; a backup's replay reads the staged ones too
(``staged_ranges_body``), so a committed write is never missed either way.

Each entry also lists its own key and the head, and a trim is journaled like
any write: the journal is part of the store, so a restored store's journal is
as of the same instant as everything else.

An entry lists every key and range its transaction wrote, exactly, spread
over as many parts as it needs (a transaction that wrote 10,000 keys has a
few parts), so a backup re-reads what was written and nothing else.

Entries older than RETENTION are trimmed (central's change follower calls
``trim`` alongside the change log's). A reader that falls further behind gets
``gap=True`` and must start over (a backup fails and says so; the active
backup writes a new base).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from valv._proto.valv.storage import v1 as pb
from valv.core.storage import keys
from valv.core.storage.base import StorageError, Store, Transaction
from valv.core.storage.sealed import SealedStore, SealedTransaction, Sealer

T = TypeVar("T")

SCHEMA_VERSION = 1
ENTRY_PREFIX = "wj"
HEAD_KEY = keys.pack("wj-head")
STAGE_PREFIX = keys.pack("wj-stage")
STAGE_RANGE = (STAGE_PREFIX + b"\x00", STAGE_PREFIX + b"\xff")
# A part's ranges, before sealing: far under the 100 kB value limit even with
# the largest keys (a range is two keys of at most 10 kB).
PART_BYTES = 60_000
_RANGE_OVERHEAD = 8
RETENTION = timedelta(hours=1)
READ_LIMIT = 1000
# Staged bytes one sequencing transaction takes: it rewrites them all, so this
# keeps it far inside FoundationDB's 10 MB (1000 parts of 60 kB would not be).
SEQUENCE_BYTES = 2_000_000
TRIM_BATCH = 1000

KeyRange = tuple[bytes, bytes]


def entry_key(seq: int, part: int = 0) -> bytes:
    return keys.pack(ENTRY_PREFIX, seq, part)


def entry_range(seq: int) -> KeyRange:
    """Every part of entry ``seq``."""
    return keys.range_of(ENTRY_PREFIX, seq)


def single_key_range(key: bytes) -> KeyRange:
    return key, key + b"\x00"


@dataclass(frozen=True, slots=True)
class JournalEntry:
    seq: int
    time_us: int
    ranges: tuple[KeyRange, ...]


@dataclass(frozen=True, slots=True)
class JournalBatch:
    """What ``read_since`` found: ``entries`` in seq order, and the seq to resume after.

    ``head``: the last seq committed when it was read, so ``last_seq == head``
    means the reader has seen everything. ``gap``: entries after the requested
    seq were trimmed (or the journal is behind it: the store went back), so
    the reader missed writes.
    """

    entries: list[JournalEntry] = field(default_factory=list)
    last_seq: int = 0
    head: int = 0
    gap: bool = False


class JournalError(StorageError):
    """A journal record could not be decoded."""


def _decode_head(value: bytes | None) -> tuple[int, int]:
    """(last_seq, first_seq); (0, 1) for a store that never journaled."""
    if value is None:
        return 0, 1
    try:
        head = pb.JournalHead.parse(value)
    except Exception as exc:  # betterproto raises assorted errors on bad bytes
        raise JournalError(f"journal head {keys.describe(HEAD_KEY)} is corrupt: {exc}") from None
    _check_schema(HEAD_KEY, head.schema_version)
    return int(head.last_seq), int(head.first_seq)


def _encode_head(last_seq: int, first_seq: int) -> bytes:
    return bytes(pb.JournalHead(schema_version=SCHEMA_VERSION, last_seq=last_seq,
                                first_seq=first_seq))


def _decode_part(key: bytes, value: bytes) -> tuple[int, int, tuple[KeyRange, ...]]:
    """(seq, time_us, ranges) of one stored part."""
    try:
        record = pb.JournalEntry.parse(value)
    except Exception as exc:
        raise JournalError(f"journal entry {keys.describe(key)} is corrupt: {exc}") from None
    _check_schema(key, record.schema_version)
    return (int(record.seq), int(record.time_us),
            tuple((bytes(r.begin), bytes(r.end)) for r in record.ranges))


def _entries(pairs: list[tuple[bytes, bytes]]) -> list[JournalEntry]:
    """Stored parts, in key order, joined into entries."""
    entries: list[JournalEntry] = []
    for key, value in pairs:
        seq, time_us, ranges = _decode_part(key, value)
        if entries and entries[-1].seq == seq:
            last = entries[-1]
            entries[-1] = JournalEntry(seq, last.time_us, last.ranges + ranges)
        else:
            entries.append(JournalEntry(seq, time_us, ranges))
    return entries


def _check_schema(key: bytes, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise JournalError(f"journal record {keys.describe(key)} has schema version {version}, "
                           f"newer than this Valv understands ({SCHEMA_VERSION}); upgrade Valv")


def _parts(first: list[KeyRange], ranges: list[KeyRange]) -> list[list[KeyRange]]:
    """``first`` then ``ranges``, spread over parts of at most PART_BYTES each."""
    parts: list[list[KeyRange]] = [list(first)]
    size = 0
    for begin, end in ranges:
        cost = len(begin) + len(end) + _RANGE_OVERHEAD
        if size + cost > PART_BYTES and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append((begin, end))
        size += cost
    return parts


def _encode_part(seq: int, time_us: int, part: int, ranges: list[KeyRange]) -> bytes:
    return bytes(pb.JournalEntry(schema_version=SCHEMA_VERSION, seq=seq, time_us=time_us,
                                 part=part,
                                 ranges=[pb.KeyRange(begin=b, end=e) for b, e in ranges]))


def append(tr: SealedTransaction, now_us: int, ranges: list[KeyRange], *,
           staged: bool = False) -> int:
    """Append one entry listing ``ranges`` in ``tr``; its seq (0 if ``staged``).

    The entry lists itself and the head too: the journal is part of the store,
    and a backup replays it like everything else. Ranges are spread over as
    many parts as it takes to keep each one under PART_BYTES: an entry is
    exact however many keys its transaction wrote (a transaction is at most
    10 MB, so its entry is too). ``staged``: at versionstamped keys, for
    ``sequence`` to number (the head is neither read nor written).
    """
    if staged:
        for part, part_ranges in enumerate(_parts([STAGE_RANGE], ranges)):
            tr.set_versionstamped(STAGE_PREFIX, _encode_part(0, now_us, part, part_ranges))
        return 0
    last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
    seq = last_seq + 1
    first = [entry_range(seq), single_key_range(HEAD_KEY)]
    for part, part_ranges in enumerate(_parts(first, ranges)):
        tr.set(entry_key(seq, part), _encode_part(seq, now_us, part, part_ranges))
    tr.set(HEAD_KEY, _encode_head(seq, first_seq))
    return seq


def _staged(tr: SealedTransaction, limit: int,
            max_bytes: int = 0) -> list[tuple[list[bytes], JournalEntry]]:
    """Staged entries in commit order: (their keys, the entry with seq 0).

    ``max_bytes`` > 0: stop after the first entry that brings the parts read to
    that many bytes (at least one whole entry is always returned)."""
    rows = tr.get_stamped_range(STAGE_PREFIX, limit=limit)
    groups: list[tuple[bytes, list[bytes], JournalEntry]] = []
    taken = 0
    for index, (key, value) in enumerate(rows):
        stamp, _ = keys.stamp_of(key, STAGE_PREFIX)
        if max_bytes and taken >= max_bytes and groups and groups[-1][0] != stamp:
            rows = rows[:index]
            limit = 0  # cut here on purpose: what was taken is whole
            break
        taken += len(key) + len(value)
        _, time_us, ranges = _decode_part(key, value)
        if groups and groups[-1][0] == stamp:
            _, staged_keys, entry = groups[-1]
            staged_keys.append(key)
            groups[-1] = (stamp, staged_keys, JournalEntry(0, entry.time_us,
                                                           entry.ranges + ranges))
        else:
            groups.append((stamp, [key], JournalEntry(0, time_us, ranges)))
    if limit and len(rows) == limit and len(groups) > 1:
        groups.pop()  # perhaps cut short: the next pass takes it whole
    return [(staged_keys, entry) for _, staged_keys, entry in groups]


def sequence_body(tr: SealedTransaction, limit: int = READ_LIMIT) -> int:
    """Give staged entries their seqs, in commit order; how many. Bounded by
    ``limit`` parts and about SEQUENCE_BYTES: the rest is the next pass's."""
    staged = _staged(tr, limit, SEQUENCE_BYTES)
    if not staged:
        return 0
    last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
    for staged_keys, entry in staged:
        last_seq += 1
        # Each part is written again under its seq; its STAGE_RANGE element
        # stays: the range it names held the entry when it was committed.
        for part, part_ranges in enumerate(_parts([], list(entry.ranges))):
            tr.set(entry_key(last_seq, part),
                   _encode_part(last_seq, entry.time_us, part, part_ranges))
        for key in staged_keys:
            tr.clear(key)
    tr.set(HEAD_KEY, _encode_head(last_seq, first_seq))
    return len(staged)


async def sequence(store: Store, limit: int = READ_LIMIT, *, always: bool = False) -> int:
    """Sequence everything staged in ``store`` (sealed); how many entries. Any number of
    processes may run it at once: they conflict on the head, and FDB retries the losers.
    ``always``: even without versionstamps (see valv.core.changelog.sequence)."""
    if not store.supports_versionstamps and not always:
        return 0
    total = 0
    while True:
        moved = await store.run(lambda tr: sequence_body(_sealed(tr), limit))
        total += moved
        if moved == 0:
            return total


def staged_ranges_body(tr: SealedTransaction) -> list[KeyRange]:
    """Every range listed by entries still staged: for a backup's replay."""
    return [r for _, entry in _staged(tr, 0) for r in entry.ranges]


def _sealed(tr: Transaction) -> SealedTransaction:
    assert isinstance(tr, SealedTransaction), "the journal is read and written sealed"
    return tr


def head_body(tr: Transaction) -> int:
    return _decode_head(tr.get(HEAD_KEY))[0]


def read_since_body(tr: Transaction, seq: int, limit: int = READ_LIMIT) -> JournalBatch:
    """Whole entries after ``seq``, about ``limit`` parts' worth, read in ``tr`` (sealed)."""
    last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
    gap = seq + 1 < first_seq or seq > last_seq
    start = first_seq if gap else seq + 1
    if start > last_seq:
        return JournalBatch([], last_seq, last_seq, gap)
    pairs = tr.get_range(keys.pack(ENTRY_PREFIX, start), keys.pack(ENTRY_PREFIX, last_seq + 1),
                         limit=limit)
    entries = _entries(pairs)
    if len(pairs) == limit and entries:
        # The read may have stopped inside the last entry's parts: drop it, or
        # if it is the only one, read all of it.
        if len(entries) > 1:
            entries.pop()
        else:
            entries = _entries(tr.get_range(*entry_range(entries[0].seq)))
    resume = entries[-1].seq if entries else last_seq
    return JournalBatch(entries, resume, last_seq, gap)


async def head(store: Store) -> int:
    """The last journal seq committed in ``store`` (a sealed store)."""
    return await store.run(head_body, read_only=True)


async def trim(store: Store, now_us: int, retention: timedelta = RETENTION,
               batch: int = TRIM_BATCH) -> int:
    """Remove entries older than ``retention``, about ``batch`` parts per transaction;
    how many entries."""
    cutoff_us = now_us - retention // timedelta(microseconds=1)

    def body(tr: Transaction) -> tuple[int, bool]:
        last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
        batch_read = read_since_body(tr, first_seq - 1, batch)
        removed = 0
        for entry in batch_read.entries:
            if entry.time_us >= cutoff_us:
                break
            tr.clear_range(*entry_range(entry.seq))
            removed += 1
        if removed:
            tr.set(HEAD_KEY, _encode_head(last_seq, first_seq + removed))
        more = removed == len(batch_read.entries) and batch_read.last_seq < last_seq
        return removed, more

    total = 0
    while True:
        removed, more = await store.run(body)
        total += removed
        if not more:
            return total


class _JournalingTransaction(Transaction):
    """Passes everything through and remembers which ranges were written."""

    def __init__(self, inner: Transaction) -> None:
        self._inner = inner
        self.ranges: list[KeyRange] = []
        self.wrote_head = False  # a sequencer or a trim: it holds the head anyway

    def get(self, key: bytes) -> bytes | None:
        return self._inner.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self._inner.set(key, value)
        self.ranges.append(single_key_range(key))
        if key == HEAD_KEY:
            self.wrote_head = True

    @property
    def supports_versionstamps(self) -> bool:
        return self._inner.supports_versionstamps

    def set_versionstamped(self, prefix: bytes, value: bytes) -> None:
        self._inner.set_versionstamped(prefix, value)
        self.ranges.append((prefix + b"\x00", prefix + b"\xff"))

    def clear(self, key: bytes) -> None:
        self._inner.clear(key)
        self.ranges.append(single_key_range(key))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._inner.clear_range(begin, end)
        if begin < end:
            self.ranges.append((begin, end))

    def get_range(self, begin: bytes, end: bytes, *, limit: int = 0,
                  reverse: bool = False) -> list[tuple[bytes, bytes]]:
        return self._inner.get_range(begin, end, limit=limit, reverse=reverse)

    def get_range_snapshot(self, begin: bytes, end: bytes, *,
                           limit: int = 0) -> list[tuple[bytes, bytes]]:
        return self._inner.get_range_snapshot(begin, end, limit=limit)


class JournaledStore(Store):
    """A raw Store whose read-write transactions journal what they write."""

    def __init__(self, inner: Store, sealer: Sealer, now_us: Callable[[], int]) -> None:
        self._inner = inner
        self._sealer = sealer
        self._now_us = now_us

    @property
    def inner(self) -> Store:
        return self._inner

    @property
    def url(self) -> str:
        return self._inner.url

    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        if read_only:
            return await self._inner.run(body, read_only=True)
        sealer, now_us = self._sealer, self._now_us

        def journaling_body(tx: Transaction) -> T:
            # A fresh wrapper per attempt: a retried body starts with nothing written.
            journaling = _JournalingTransaction(tx)
            result = body(journaling)
            if journaling.ranges:
                # Staged where versionstamps spare writers the head, unless this
                # transaction moved the head itself (sequencing, trimming).
                append(SealedTransaction(tx, sealer), now_us(), journaling.ranges,
                       staged=tx.supports_versionstamps and not journaling.wrote_head)
            return result

        return await self._inner.run(journaling_body)

    async def erase_freed_space(self) -> None:
        await self._inner.erase_freed_space()

    @property
    def supports_watches(self) -> bool:
        return self._inner.supports_watches

    async def wait_for_change(self, key: bytes, timeout_s: float, *,
                              armed: asyncio.Event | None = None) -> bool:
        # Keys pass through unchanged, so a watch on the inner store is one on ours.
        return await self._inner.wait_for_change(key, timeout_s, armed=armed)

    @property
    def supports_versionstamps(self) -> bool:
        return self._inner.supports_versionstamps

    async def close(self) -> None:
        await self._inner.close()


def journaled_store(raw: Store, sealer: Sealer, now_us: Callable[[], int]) -> SealedStore:
    """``raw`` as Valv uses it: sealed, with every write journaled."""
    return SealedStore(JournaledStore(raw, sealer, now_us), sealer)
