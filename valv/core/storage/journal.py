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

    ("wj", seq:int)   JournalEntry {seq, time_us, ranges}
    ("wj-head",)      JournalHead {last_seq, first_seq}

Entries are sealed like every other value (the keys they list are resource
names, not secrets, but storage is untrusted: an edited journal could make a
backup miss a write). It wraps the *raw* store, below sealing, so that writes
made through ``SealedStore.inner`` (an RMK rotation's reseal) are journaled
too. Stack it as ``SealedStore(JournaledStore(raw, sealer), sealer)``, which
``journaled_store`` does.

Seqs are gap-free, as in the change log (valv.core.changelog): each append
reads the head and moves it. SQLite serializes writers anyway; on
FoundationDB every writer conflicts on the head, which serializes writes
(Valv's are key-management operations and batched audit records, not data
traffic); a versionstamped key can replace it without changing readers.

Each entry also lists its own key and the head, and a trim is journaled like
any write: the journal is part of the store, so a restored store's journal is
as of the same instant as everything else.

An entry lists at most MAX_RANGES ranges (besides its own two). A transaction that touched more is
recorded as the one range from its lowest to just past its highest key:
re-reading more than was written is always safe, missing a write never is.

Entries older than RETENTION are trimmed (central's change follower calls
``trim`` alongside the change log's). A reader that falls further behind gets
``gap=True`` and must start over (a backup fails and says so; the active
backup writes a new base).
"""

from __future__ import annotations

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
MAX_RANGES = 256
RETENTION = timedelta(hours=1)
READ_LIMIT = 1000
TRIM_BATCH = 1000

KeyRange = tuple[bytes, bytes]


def entry_key(seq: int) -> bytes:
    return keys.pack(ENTRY_PREFIX, seq)


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


def _decode_entry(key: bytes, value: bytes) -> JournalEntry:
    try:
        record = pb.JournalEntry.parse(value)
    except Exception as exc:
        raise JournalError(f"journal entry {keys.describe(key)} is corrupt: {exc}") from None
    _check_schema(key, record.schema_version)
    return JournalEntry(int(record.seq), int(record.time_us),
                        tuple((bytes(r.begin), bytes(r.end)) for r in record.ranges))


def _check_schema(key: bytes, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise JournalError(f"journal record {keys.describe(key)} has schema version {version}, "
                           f"newer than this Valv understands ({SCHEMA_VERSION}); upgrade Valv")


def append(tr: Transaction, now_us: int, ranges: list[KeyRange]) -> int:
    """Append one entry listing ``ranges`` in ``tr`` (sealed); its seq.

    The entry lists itself and the head too: the journal is part of the store,
    and a backup replays it like everything else.
    """
    if len(ranges) > MAX_RANGES:
        ranges = [(min(b for b, _ in ranges), max(e for _, e in ranges))]
    last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
    seq = last_seq + 1
    ranges = [*ranges, single_key_range(entry_key(seq)), single_key_range(HEAD_KEY)]
    record = pb.JournalEntry(schema_version=SCHEMA_VERSION, seq=seq, time_us=now_us,
                             ranges=[pb.KeyRange(begin=b, end=e) for b, e in ranges])
    tr.set(entry_key(seq), bytes(record))
    tr.set(HEAD_KEY, _encode_head(seq, first_seq))
    return seq


def head_body(tr: Transaction) -> int:
    return _decode_head(tr.get(HEAD_KEY))[0]


def read_since_body(tr: Transaction, seq: int, limit: int = READ_LIMIT) -> JournalBatch:
    """Entries after ``seq``, at most ``limit``, read in ``tr`` (sealed)."""
    last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
    gap = seq + 1 < first_seq or seq > last_seq
    start = first_seq if gap else seq + 1
    if start > last_seq:
        return JournalBatch([], last_seq, last_seq, gap)
    pairs = tr.get_range(entry_key(start), entry_key(last_seq + 1), limit=limit)
    entries = [_decode_entry(k, v) for k, v in pairs]
    resume = entries[-1].seq if entries else last_seq
    return JournalBatch(entries, resume, last_seq, gap)


async def head(store: Store) -> int:
    """The last journal seq committed in ``store`` (a sealed store)."""
    return await store.run(head_body, read_only=True)


async def trim(store: Store, now_us: int, retention: timedelta = RETENTION,
               batch: int = TRIM_BATCH) -> int:
    """Remove entries older than ``retention``, ``batch`` per transaction; how many."""
    cutoff_us = now_us - retention // timedelta(microseconds=1)

    def body(tr: Transaction) -> int:
        last_seq, first_seq = _decode_head(tr.get(HEAD_KEY))
        removed = 0
        for key, value in tr.get_range(entry_key(first_seq), entry_key(last_seq + 1),
                                       limit=batch):
            if _decode_entry(key, value).time_us >= cutoff_us:
                break
            tr.clear(key)
            removed += 1
        if removed:
            tr.set(HEAD_KEY, _encode_head(last_seq, first_seq + removed))
        return removed

    total = 0
    while True:
        removed = await store.run(body)
        total += removed
        if removed < batch:
            return total


class _JournalingTransaction(Transaction):
    """Passes everything through and remembers which ranges were written."""

    def __init__(self, inner: Transaction) -> None:
        self._inner = inner
        self.ranges: list[KeyRange] = []

    def get(self, key: bytes) -> bytes | None:
        return self._inner.get(key)

    def set(self, key: bytes, value: bytes) -> None:
        self._inner.set(key, value)
        self.ranges.append(single_key_range(key))

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
                append(SealedTransaction(tx, sealer), now_us(), journaling.ranges)
            return result

        return await self._inner.run(journaling_body)

    async def erase_freed_space(self) -> None:
        await self._inner.erase_freed_space()

    async def close(self) -> None:
        await self._inner.close()


def journaled_store(raw: Store, sealer: Sealer, now_us: Callable[[], int]) -> SealedStore:
    """``raw`` as Valv uses it: sealed, with every write journaled."""
    return SealedStore(JournaledStore(raw, sealer, now_us), sealer)
