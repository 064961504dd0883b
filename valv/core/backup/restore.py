"""Restore a backup (a file, or an active backup's directory) into any store.

Values are written exactly as they were dumped, still sealed, into the raw
store: restore needs no root key, and the target may be another backend
(sqlite -> fdb is backup then restore). The sealing binds each value to its
key, not to a backend or a prefix, so the restored store opens with the
source's root keys.

Guarantees:

- **Nothing is written until everything is checked.** Every file is read
  through once (valv.core.backup.format checks the digest, counts and
  structure; here, the key bounds and how the files chain) before the first
  write. A bad file changes nothing.
- **Bounded transactions.** Frames are applied in order; a transaction ends
  at the frame that reaches ``batch_frames`` frames or ``batch_bytes`` bytes
  (so it holds at most one frame more than that), well inside
  FoundationDB's 10 MB / 5 s.
- **Resumable.** Each batch also writes a marker, ("meta", "restore"), with
  the position reached, in the same transaction. Run the same restore again
  after a crash and it goes on from there; the last batch removes the marker.
  Replaying frames from any earlier point gives the same end state (the last
  write to each key wins), so the marker only saves work.
- **A new change-log epoch.** The last batch clears ("log-epoch",), so the
  next central to start makes a new one and sidecars that watched the store
  before drop what they hold (valv.core.changelog.ensure_epoch).
- **Nothing opens a half-restored store**: ``refuse_if_unfinished`` is checked
  by every process that opens one to use it (central, backup, fsck, rmk).
- **Refuses a non-empty target** unless ``force``, which first clears the
  whole keyspace (in the same transaction as the marker, so a crash after it
  resumes rather than finding a "non-empty" half-cleared store).

The marker is plain JSON, not sealed: restore has no root key. It holds
positions only, and exists only while a restore is unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from valv.core import records
from valv.core.backup.dump import KEYSPACE, RESTORE_MARKER_KEY
from valv.core.backup.format import (
    KIND_FULL,
    KIND_SEGMENT,
    BackupFormatError,
    BackupReader,
    BackupSummary,
    Clear,
    Pair,
)
from valv.core.storage.base import StorageError, Store, Transaction

DEFAULT_BATCH_FRAMES = 500
DEFAULT_BATCH_BYTES = 2_000_000

BASE_NAME = re.compile(r"^g(\d{6})-base\.vbk$")
SEGMENT_NAME = re.compile(r"^g(\d{6})-s(\d{6})\.vbk$")


def base_file_name(generation: int) -> str:
    return f"g{generation:06d}-base.vbk"


def segment_file_name(generation: int, segment: int) -> str:
    return f"g{generation:06d}-s{segment:06d}.vbk"


class RestoreError(StorageError):
    """A restore was refused or failed; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Source:
    path: str
    summary: BackupSummary


@dataclass
class RestorePlan:
    """The checked files to apply, in order."""

    sources: list[Source]
    skipped_segments: list[str] = field(default_factory=list)

    @property
    def restore_id(self) -> str:
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(str(source.summary.manifest["body_sha256"]).encode() + b"\n")
        return digest.hexdigest()

    @property
    def journal_seq(self) -> int:
        return int(self.sources[-1].summary.manifest.get("journal_seq", 0))

    @property
    def rmk_ids(self) -> list[str]:
        ids: set[str] = set()
        for source in self.sources:
            ids.update(source.summary.manifest.get("rmk_ids", []))
        return sorted(ids)

    @property
    def records(self) -> int:
        return sum(int(s.summary.manifest["records"]) for s in self.sources)


def check_file(path: str) -> BackupSummary:
    """Read ``path`` through and check it (format, digest, key bounds)."""
    try:
        with open(path, "rb") as stream:
            reader = BackupReader(stream, path)
            for frame in reader.frames():
                if isinstance(frame, Pair):
                    _check_bounds(path, frame.key, frame.key)
                else:
                    _check_bounds(path, frame.begin, frame.end)
            return BackupSummary(reader.header, reader.manifest, reader._frames,
                                 reader.compressed_bytes)
    except OSError as exc:
        raise BackupFormatError(f"{path}: cannot read it: {exc.strerror or exc}") from None


def _check_bounds(path: str, begin: bytes, end: bytes) -> None:
    if begin == RESTORE_MARKER_KEY or not (KEYSPACE[0] <= begin and end <= KEYSPACE[1]):
        raise BackupFormatError(f"{path}: corrupt: it writes outside Valv's keyspace")


def plan_file(path: str) -> RestorePlan:
    summary = check_file(path)
    if summary.header.get("kind") != KIND_FULL:
        raise RestoreError(f"{path} is an incremental segment of an active backup: restore "
                           "the directory that holds it (valv restore --in DIR)")
    return RestorePlan([Source(path, summary)])


def _parse_until(until: str | None) -> tuple[int | None, float | None]:
    """``--until``: a segment number, or an ISO 8601 time."""
    if until is None:
        return None, None
    if until.isdigit():
        return int(until), None
    try:
        when = datetime.fromisoformat(until)
    except ValueError:
        raise RestoreError(f"--until {until!r} is neither a segment number nor an ISO 8601 "
                           "time such as 2026-12-07T05:30:00+00:00") from None
    if when.tzinfo is None:
        raise RestoreError(f"--until {until!r} has no time zone; add one, e.g. +00:00")
    return None, when.timestamp()


def plan_directory(directory: str, until: str | None = None) -> RestorePlan:
    """The newest generation's base and its segments (up to ``until``), all checked."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise RestoreError(f"{directory}: cannot list it: {exc.strerror or exc}") from None
    bases = sorted(int(m.group(1)) for n in names if (m := BASE_NAME.match(n)))
    if not bases:
        raise RestoreError(f"{directory} holds no base backup (g000001-base.vbk...): is it an "
                           "active backup's directory (valv backup --follow DIR)?")
    generation = bases[-1]
    segments = sorted(int(m.group(2)) for n in names
                      if (m := SEGMENT_NAME.match(n)) and int(m.group(1)) == generation)
    until_segment, until_time = _parse_until(until)
    base_path = os.path.join(directory, base_file_name(generation))
    plan = RestorePlan([Source(base_path, check_file(base_path))])
    previous = int(plan.sources[0].summary.manifest.get("journal_seq", 0))
    chosen: list[Source] = []
    for expected, number in enumerate(segments, start=1):
        path = os.path.join(directory, segment_file_name(generation, number))
        if number != expected:
            plan.skipped_segments.append(f"{path} (segment {expected} is missing)")
            break
        if until_segment is not None and number > until_segment:
            break
        try:
            summary = check_file(path)
        except BackupFormatError as exc:
            raise RestoreError(f"{exc}; to restore up to the segment before it, pass "
                               f"--until {number - 1}") from None
        header, manifest = summary.header, summary.manifest
        if header.get("kind") != KIND_SEGMENT or header.get("generation") != generation \
                or header.get("segment") != number:
            raise RestoreError(f"{path}: its header does not match its name")
        if header.get("from_seq") != previous:
            raise RestoreError(f"{path}: it continues from journal seq "
                               f"{header.get('from_seq')}, but the files before it end at "
                               f"{previous}; pass --until {number - 1}")
        if until_time is not None and float(header.get("read_at", 0)) > until_time:
            break
        previous = int(manifest.get("journal_seq", 0))
        chosen.append(Source(path, summary))
    # A segment that stopped short of the journal's head is consistent only
    # together with the one after it: never end on one.
    while chosen and not chosen[-1].summary.manifest.get("complete", False):
        plan.skipped_segments.append(f"{chosen.pop().path} (incomplete without the next)")
    plan.sources.extend(chosen)
    return plan


@dataclass
class RestoreProgress:
    frames: int = 0
    records: int = 0
    batches: int = 0
    resumed_from: tuple[int, int] | None = None
    done: bool = False


def _marker(restore_id: str, file_index: int, frame_index: int) -> bytes:
    return json.dumps({"restore_id": restore_id, "file": file_index,
                       "frame": frame_index}, sort_keys=True).encode()


def _read_marker(value: bytes | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        marker = json.loads(value.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RestoreError("the target's restore marker is unreadable; restore again with "
                           "--force to start over") from None
    if not isinstance(marker, dict):
        raise RestoreError("the target's restore marker is unreadable; restore again with "
                           "--force to start over")
    return marker


async def refuse_if_unfinished(store: Store) -> None:
    """Raise RestoreError if a restore into ``store`` (the raw store) is unfinished.

    Every process that opens a store to use it checks this first: a half-restored
    store holds part of a backup (and the marker, which is not a sealed record),
    and anything written to it now would be overwritten when the restore resumes.
    """
    marker = _read_marker(await store.run(lambda tr: tr.get(RESTORE_MARKER_KEY),
                                          read_only=True))
    if marker is not None:
        raise RestoreError(
            f"a restore into {store.url} is unfinished (backup {marker.get('restore_id', '?')}"
            f", at file {marker.get('file', '?')} frame {marker.get('frame', '?')}); finish it "
            "first: run the same `valv restore` again and it resumes")


async def restore(target: Store, plan: RestorePlan, *, force: bool = False,
                  batch_frames: int = DEFAULT_BATCH_FRAMES,
                  batch_bytes: int = DEFAULT_BATCH_BYTES,
                  progress: Callable[[RestoreProgress], None] | None = None) -> RestoreProgress:
    """Apply ``plan`` to the raw store ``target``."""
    restore_id = plan.restore_id
    state = RestoreProgress()

    def inspect(tr: Transaction) -> tuple[dict[str, Any] | None, bool]:
        marker = _read_marker(tr.get(RESTORE_MARKER_KEY))
        others = [k for k, _ in tr.get_range(*KEYSPACE, limit=2) if k != RESTORE_MARKER_KEY]
        return marker, bool(others)

    marker, non_empty = await target.run(inspect, read_only=True)
    start = (0, 0)
    if marker is not None and marker.get("restore_id") == restore_id and not force:
        start = (int(marker.get("file", 0)), int(marker.get("frame", 0)))
        state.resumed_from = start
    elif marker is not None and not force:
        raise RestoreError(f"{target.url} holds an unfinished restore of a different backup; "
                           "finish that one (run it again), or pass --force to clear the "
                           "target and restore this one")
    elif non_empty and not force:
        raise RestoreError(f"{target.url} is not empty; restore into an empty store, or pass "
                           "--force to clear it first (everything in it is lost)")
    else:
        def begin(tr: Transaction) -> None:
            if force:
                tr.clear_range(*KEYSPACE)
            tr.set(RESTORE_MARKER_KEY, _marker(restore_id, 0, 0))

        await target.run(begin)

    pending: list[Pair | Clear] = []
    pending_bytes = 0

    async def flush(file_index: int, frame_index: int, last: bool) -> None:
        nonlocal pending, pending_bytes
        ops = pending

        def body(tr: Transaction) -> None:
            for op in ops:
                if isinstance(op, Pair):
                    tr.set(op.key, op.value)
                else:
                    tr.clear_range(op.begin, op.end)
            if last:
                tr.clear(RESTORE_MARKER_KEY)
                # The change log's seqs start a new epoch: a sidecar resuming a
                # Watch from a seq of before the restore is told to start over.
                # The next central to start writes the new epoch (it has the keys).
                tr.clear(records.CHANGE_EPOCH_KEY)
            else:
                tr.set(RESTORE_MARKER_KEY, _marker(restore_id, file_index, frame_index))

        await target.run(body)
        state.batches += 1
        state.frames += len(ops)
        state.records += sum(1 for op in ops if isinstance(op, Pair))
        pending, pending_bytes = [], 0
        if progress is not None:
            progress(state)

    for file_index, source in enumerate(plan.sources):
        if file_index < start[0]:
            continue
        skip = start[1] if file_index == start[0] else 0
        try:
            with open(source.path, "rb") as stream:
                reader = BackupReader(stream, source.path)
                for frame_index, frame in enumerate(reader.frames()):
                    if frame_index < skip:
                        continue
                    pending.append(frame)
                    pending_bytes += (len(frame.key) + len(frame.value) if isinstance(frame, Pair)
                                      else len(frame.begin) + len(frame.end))
                    if len(pending) >= batch_frames or pending_bytes >= batch_bytes:
                        await flush(file_index, frame_index + 1, last=False)
        except (OSError, BackupFormatError) as exc:
            # It was checked a moment ago: the file changed under us.
            raise RestoreError(f"{source.path} changed while it was being restored ({exc}); "
                               "the restore stopped; run it again with a good copy to "
                               "resume") from exc
        if pending:
            await flush(file_index + 1, 0, last=False)
    await flush(len(plan.sources), 0, last=True)
    state.done = True
    if progress is not None:
        progress(state)
    return state

