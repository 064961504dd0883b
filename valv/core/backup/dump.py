"""Consistent logical dumps of a live store: full backups and incremental segments.

A full backup must equal the store as of one instant while writers keep
going, and on FoundationDB no transaction may last 5 s, so it can't be one
big read. It is made in two phases instead:

1. **Scan.** Note the write journal's head H0 (valv.core.storage.journal),
   then read the whole keyspace in key order, ``chunk`` pairs per read-only
   transaction, and write every pair as it is. Each chunk is consistent on its
   own; together they are not.
2. **Replay.** Read the journal entries after H0 and, in the same read-only
   transaction, read again every range they list; write each as "clear the
   range, then these pairs". Repeat from the last entry seen until a round
   has read up to the journal's head in one transaction: the dump is then
   consistent as of that round's read.

Why that is exact: a key no entry after H0 touches has not changed since H0,
so its scanned value is its value at the end. Every key an entry touches is
read again in a round that saw that entry, and if no later entry touches it,
that value is still its value at the end. Restore applies frames in order,
so the last word on each key wins. The journal is written in the same
transaction as each write (raw writes below sealing included), so no write
escapes it.

A segment of the active backup is one replay round after the previous
segment (or the base backup): the ranges written since, as of one read.

The dump reads values raw: sealed, exactly as stored. It needs the root key
only to read the journal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from valv.core.backup.format import KIND_FULL, BackupWriter
from valv.core.records import SCHEMA_VERSION
from valv.core.storage import journal
from valv.core.storage.base import StorageError, Transaction
from valv.core.storage.keys import pack
from valv.core.storage.sealed import SealedStore, SealedTransaction, rmk_id_of

# Everything a backup covers: the whole keyspace below FoundationDB's \xff.
KEYSPACE = (b"", b"\xff")
DEFAULT_CHUNK = 500
# A replay round reads at most this many journal entries, so it stays well
# inside FoundationDB's 5 s; the next round continues.
REPLAY_ENTRIES = 200
# Replay rounds before a full backup gives up because writers outpace it.
MAX_REPLAY_ROUNDS = 10_000

# restore's resume marker (valv.core.backup.restore); never part of a backup.
RESTORE_MARKER_KEY = pack("meta", "restore")


class BackupError(StorageError):
    """A backup could not be made; the message says why and what to do."""


@dataclass
class DumpProgress:
    records: int = 0
    replayed: int = 0
    bytes: int = 0
    done: bool = False


@dataclass(frozen=True, slots=True)
class ReplayRound:
    """One replay read: the ranges to restore as they were at that read."""

    ranges: list[tuple[tuple[bytes, bytes], list[tuple[bytes, bytes]]]]
    from_seq: int
    to_seq: int
    head: int
    gap: bool

    @property
    def complete(self) -> bool:
        """True when the round read up to the journal's head: consistent at its read."""
        return self.to_seq == self.head


def _merge(ranges: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Sorted, overlapping and adjacent ranges joined: each key read once."""
    merged: list[tuple[bytes, bytes]] = []
    for begin, end in sorted(ranges):
        if merged and begin <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((begin, end))
    return merged


def _clip(begin: bytes, end: bytes) -> tuple[bytes, bytes] | None:
    begin, end = max(begin, KEYSPACE[0]), min(end, KEYSPACE[1])
    return (begin, end) if begin < end else None


def replay_body(tr: Transaction, after_seq: int, limit: int = REPLAY_ENTRIES) -> ReplayRound:
    """In one read-only (sealed) transaction: the journal after ``after_seq`` and the
    current contents of every range it lists."""
    assert isinstance(tr, SealedTransaction)
    batch = journal.read_since_body(tr, after_seq, limit)
    listed = [r for entry in batch.entries for r in entry.ranges]
    # Entries not yet given a seq (FoundationDB: valv.core.storage.journal) are
    # committed writes too: read their ranges as well, or this read would not
    # be the whole store as of itself.
    listed += journal.staged_ranges_body(tr)
    wanted: list[tuple[bytes, bytes]] = []
    for begin, end in listed:
        clipped = _clip(begin, end)
        if clipped is not None:
            wanted.append(clipped)
    ranges = [((begin, end), [(k, v) for k, v in tr.raw.get_range(begin, end)
                              if k != RESTORE_MARKER_KEY])
              for begin, end in _merge(wanted)]
    return ReplayRound(ranges, after_seq, batch.last_seq, batch.head, batch.gap)


def write_round(writer: BackupWriter, round_: ReplayRound, rmk_ids: set[str]) -> int:
    """Write a replay round's frames; how many pairs."""
    pairs = 0
    for (begin, end), contents in round_.ranges:
        writer.clear(begin, end)
        for key, value in contents:
            _note_rmk(key, value, rmk_ids)
            writer.pair(key, value)
            pairs += 1
    return pairs


def _note_rmk(key: bytes, value: bytes, rmk_ids: set[str]) -> None:
    try:
        rmk_ids.add(rmk_id_of(value, key))
    except StorageError:
        # Not a sealed value (tampered storage): copied as it is; fsck and
        # reads report it wherever it is restored.
        rmk_ids.add("?")


def source_name(store: SealedStore) -> str:
    return store.url.split(":", 1)[0]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class FullDump:
    """What ``dump`` wrote: the manifest, and the journal seq it is consistent at."""

    manifest: dict[str, Any] = field(default_factory=dict)
    journal_seq: int = 0


async def dump(store: SealedStore, writer: BackupWriter, *, chunk: int = DEFAULT_CHUNK,
               progress: Callable[[DumpProgress], None] | None = None,
               extra_header: dict[str, Any] | None = None) -> FullDump:
    """Write a full, consistent backup of ``store`` (journaled and sealed) to ``writer``."""
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    raw = store.inner
    state = DumpProgress()
    rmk_ids: set[str] = set()
    await journal.sequence(store)  # what others left staged: fewer ranges to replay
    start_seq = await journal.head(store)
    writer.header({"kind": KIND_FULL, "source": source_name(store),
                   "schema_version": SCHEMA_VERSION, "created_at": now_iso(),
                   "journal_seq_start": start_seq, **(extra_header or {})})

    cursor = KEYSPACE[0]
    while True:
        def scan(tr: Transaction, begin: bytes = cursor) -> list[tuple[bytes, bytes]]:
            return tr.get_range(begin, KEYSPACE[1], limit=chunk)

        pairs = await raw.run(scan, read_only=True)
        for key, value in pairs:
            if key == RESTORE_MARKER_KEY:
                continue
            _note_rmk(key, value, rmk_ids)
            writer.pair(key, value)
            state.records += 1
        state.bytes = writer.body_bytes
        if progress is not None:
            progress(state)
        if len(pairs) < chunk:
            break
        cursor = pairs[-1][0] + b"\x00"

    seen = start_seq
    for _ in range(MAX_REPLAY_ROUNDS):
        await journal.sequence(store)
        round_ = await store.run(partial(replay_body, after_seq=seen), read_only=True)
        if round_.gap:
            raise BackupError(
                f"the write journal was trimmed past this backup's start (seq {start_seq}) "
                f"while it ran: the backup took longer than the journal's retention "
                f"({journal.RETENTION}). Run it again (a larger --chunk is faster)")
        state.replayed += write_round(writer, round_, rmk_ids)
        seen = round_.to_seq
        state.bytes = writer.body_bytes
        if progress is not None:
            progress(state)
        if round_.complete:
            break
    else:
        raise BackupError("writers kept ahead of the backup's replay; run it again when the "
                          "store is less busy")
    manifest = writer.finish({"journal_seq": seen, "finished_at": now_iso(),
                              "rmk_ids": sorted(rmk_ids)})
    state.done = True
    if progress is not None:
        progress(state)
    return FullDump(manifest, seen)


def wall_time() -> float:
    """Seconds since the epoch, for segments' ``read_at`` (not the injectable clock:
    it tells an operator when, in real time, the data was read)."""
    return time.time()
