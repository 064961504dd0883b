"""The audit log: a tamper-evident hash chain in the store, written atomically with changes.

Layout (tuples packed with fdb.tuple; see valv.core.storage.keys)::

    ("audit", seq:int)     AuditRecord (valv.audit.v1), seq = 1, 2, 3...
    ("audit-head",)        AuditHead: the last seq and its hash

Chain. Record n holds ``prev_hash`` = the hash of record n-1 (32 zero bytes
for record 1) and ``hash`` = SHA-256(prev_hash || canonical(record)), where
``canonical`` is the JSON object of every field but ``hash``, keys sorted, no
whitespace, ASCII only (``canonical_bytes``). It does not depend on how a
protobuf library orders or encodes fields, so any implementation can check it.

What makes it tamper-evident:

- every value (records and head) is sealed with the storage key and bound to
  its key (DESIGN.md §4), so an edited byte, or records swapped or moved, fail
  to open;
- the chain links each record to the one before, so a deleted record leaves a
  gap and a broken link;
- the head is sealed too, so deleting records at the end leaves a head naming
  a record that is gone, and nobody without the root key can write a head
  that hides it.

What it does not catch on its own: putting back an older copy of the whole
store (or of the head together with the records after it), and rewriting by
someone who holds the root key. Both are caught by comparing with a head
hash kept elsewhere (``valv audit verify`` prints it; ``--anchor`` checks it).

Appends. ``AuditLog.append`` runs inside the caller's transaction: it reads
the head, writes the records after it and the new head. So an audited change
and its record commit together or not at all, and appends serialize on the
head. That is free on SQLite (writers are serialized anyway). On
FoundationDB every audited transaction would conflict on the head key, which
caps admin changes at roughly one commit latency each across the cluster;
fine for admin activity, but a reason to keep data access aggregated. A
FoundationDB backend that needs more could write records at versionstamped
keys and link them into the chain in a background pass.

Data access (Encrypt, Decrypt, GenerateRandomBytes) goes through
``DataAccessAggregator`` in "aggregate" mode: counts kept in memory per
principal x key version x minute and flushed in batches, so the hot path
does no storage I/O.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from valv._proto.valv.audit import v1 as pb
from valv.core.calls import CallContext
from valv.core.clock import Clock, from_micros, to_micros
from valv.core.errors import DataLoss
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import pack, range_of, unpack
from valv.core.storage.sealed import SealedStore, TamperedRecordError

log = logging.getLogger("valv.audit")

SCHEMA_VERSION = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)

RECORD_PREFIX = "audit"
HEAD_KEY = pack("audit-head")

RecordKind = pb.RecordKind
AuditRecord = pb.AuditRecord

# Principals of work the server does on its own.
SCHEDULER_PRINCIPAL = "system:scheduler"
INTERNAL_PRINCIPAL = "system:internal"

# Limits on what one record may hold (UTF-8 bytes), so a record always stays
# far below FoundationDB's 100 kB value limit, sealed: worst case ~60 kB.
_LIMITS = {
    "principal": 1024, "auth_method": 64, "rpc": 256, "resource": 2048, "target": 2048,
    "status": 64, "status_message": 4096, "peer": 256, "request_id": 256,
}
MAX_REQUEST_JSON_BYTES = 32 * 1024
MAX_PEERS = 8
# Records written per transaction when many are appended at once (a flush):
# ~60 kB worst case each keeps a transaction far below the 10 MB limit.
APPEND_BATCH = 100
# Records read per transaction by verify, query and tail.
READ_CHUNK = 500


def record_key(seq: int) -> bytes:
    return pack(RECORD_PREFIX, seq)


def records_range() -> tuple[bytes, bytes]:
    return range_of(RECORD_PREFIX)


def canonical_bytes(record: pb.AuditRecord) -> bytes:
    """The bytes a record's hash covers (after prev_hash): every field but ``hash``."""
    fields: dict[str, Any] = {
        "schema_version": record.schema_version,
        "seq": record.seq,
        "time_us": record.time_us,
        "kind": int(record.kind),
        "principal": record.principal,
        "auth_method": record.auth_method,
        "rpc": record.rpc,
        "resource": record.resource,
        "target": record.target,
        "request_json": record.request_json,
        "truncated": record.truncated,
        "status": record.status,
        "status_message": record.status_message,
        "peer": record.peer,
        "request_id": record.request_id,
        "count": record.count,
        "window_start_us": record.window_start_us,
        "window_end_us": record.window_end_us,
        "peers": list(record.peers),
        "prev_hash": record.prev_hash.hex(),
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


def compute_hash(record: pb.AuditRecord) -> bytes:
    return hashlib.sha256(bytes(record.prev_hash) + canonical_bytes(record)).digest()


def _cut(text: str, limit: int) -> tuple[str, bool]:
    """``text`` as valid UTF-8 of at most ``limit`` bytes, and whether it was cut."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return raw.decode("utf-8"), False
    return raw[:limit].decode("utf-8", errors="ignore"), True


def summary_json(summary: Mapping[str, Any]) -> str:
    """A request summary as compact JSON (keys sorted); values JSON can't hold become text."""
    try:
        return json.dumps(summary, sort_keys=True, separators=(",", ":"), default=str)
    except (TypeError, ValueError):  # e.g. keys that are not strings
        return json.dumps({str(k): str(v) for k, v in summary.items()}, sort_keys=True,
                          separators=(",", ":"))


@dataclass(slots=True)
class AuditEntry:
    """What to record; ``AuditLog.append`` adds time, seq and the chain fields."""

    kind: pb.RecordKind
    principal: str
    auth_method: str
    rpc: str
    resource: str = ""
    target: str = ""
    request: Mapping[str, Any] = field(default_factory=dict)
    status: str = "OK"
    status_message: str = ""
    peer: str = ""
    request_id: str = ""
    count: int = 0
    window_start_us: int = 0
    window_end_us: int = 0
    peers: tuple[str, ...] = ()


def entry_for_call(call: CallContext, kind: pb.RecordKind, *, status: str = "OK",
                   status_message: str = "", target: str = "") -> AuditEntry:
    """The entry for one call, from its context (the summary is already safe to log)."""
    return AuditEntry(
        kind=kind, principal=call.principal.member, auth_method=call.principal.method,
        rpc=call.rpc, resource=call.resource, target=target, request=call.summary,
        status=status, status_message=status_message, peer=call.peer,
        request_id=call.request_id)


def entry_for_change(call: CallContext | None, outcome: object = None) -> AuditEntry | None:
    """The admin-activity entry for a change that is about to commit, or None.

    ``call`` made the change (None: the server's own work, e.g. the
    scheduler); ``outcome`` is what the change returned. A scheduler pass
    that applied nothing (another scheduler got there first, a stale index
    entry) is not recorded.
    """
    target = _name_of(outcome)
    if call is not None:
        if target == call.resource:
            target = ""
        return entry_for_call(call, pb.RecordKind.ADMIN_ACTIVITY, target=target)
    # Duck-typed on valv.core.keystore.DueOutcome (core.keystore imports nothing
    # from here, and this module does not need the keystore).
    if hasattr(outcome, "detail") and hasattr(outcome, "version"):
        version = outcome.version
        if version is None:
            return None
        name = str(getattr(outcome, "name", ""))
        if name == str(getattr(version, "name", "")):
            event = getattr(version, "destroy_event_time", None)
            return AuditEntry(
                kind=pb.RecordKind.ADMIN_ACTIVITY, principal=SCHEDULER_PRINCIPAL,
                auth_method="internal", rpc="ScheduledDestruction", resource=name,
                request={"destroy_event_time": event.isoformat() if event else None})
        next_time = getattr(outcome, "next_rotation_time", None)
        return AuditEntry(
            kind=pb.RecordKind.ADMIN_ACTIVITY, principal=SCHEDULER_PRINCIPAL,
            auth_method="internal", rpc="AutomaticRotation", resource=name,
            target=str(version.name),
            request={"next_rotation_time": next_time.isoformat() if next_time else None})
    return AuditEntry(kind=pb.RecordKind.ADMIN_ACTIVITY, principal=INTERNAL_PRINCIPAL,
                      auth_method="internal", rpc="internal", target=target)


def _name_of(outcome: object) -> str:
    name = getattr(outcome, "name", None)
    return "" if name is None else str(name)


def _build(entry: AuditEntry, seq: int, time_us: int, prev_hash: bytes) -> pb.AuditRecord:
    truncated = False
    text: dict[str, str] = {}
    for name, limit in _LIMITS.items():
        text[name], cut = _cut(str(getattr(entry, name)), limit)
        truncated |= cut
    request_json, cut = _cut(summary_json(entry.request), MAX_REQUEST_JSON_BYTES)
    truncated |= cut
    peers: list[str] = []
    for peer in entry.peers[:MAX_PEERS]:
        peers.append(_cut(peer, _LIMITS["peer"])[0])
    record = pb.AuditRecord(
        schema_version=SCHEMA_VERSION, seq=seq, time_us=time_us, kind=entry.kind,
        principal=text["principal"], auth_method=text["auth_method"], rpc=text["rpc"],
        resource=text["resource"], target=text["target"], request_json=request_json,
        truncated=truncated, status=text["status"], status_message=text["status_message"],
        peer=text["peer"], request_id=text["request_id"], count=entry.count,
        window_start_us=entry.window_start_us, window_end_us=entry.window_end_us,
        peers=peers, prev_hash=prev_hash)
    record.hash = compute_hash(record)
    return record


def _parse_record(key: bytes, value: bytes) -> pb.AuditRecord:
    try:
        record = pb.AuditRecord.parse(value)
    except Exception as exc:  # betterproto raises assorted errors on bad bytes
        raise DataLoss(f"audit record at {unpack(key)!r} could not be decoded: {exc}") from None
    if record.schema_version > SCHEMA_VERSION:
        raise DataLoss(f"audit record {record.seq} has schema version {record.schema_version}, "
                       f"newer than this Valv understands ({SCHEMA_VERSION}); upgrade Valv")
    return record


def _parse_head(value: bytes) -> pb.AuditHead:
    try:
        head = pb.AuditHead.parse(value)
    except Exception as exc:
        raise DataLoss(f"the audit head could not be decoded: {exc}") from None
    if head.schema_version > SCHEMA_VERSION:
        raise DataLoss(f"the audit head has schema version {head.schema_version}; upgrade Valv")
    return head


@dataclass(frozen=True, slots=True)
class Head:
    seq: int
    hash: bytes


@dataclass(frozen=True, slots=True)
class Item:
    """One position of the log as read for verification: a record, or why it isn't one."""

    seq: int
    record: pb.AuditRecord | None
    problem: str = ""


@dataclass(slots=True)
class VerifyReport:
    checked: int = 0
    head: Head | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log in ``store`` (normally a SealedStore), with time from ``clock``."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    # ---- writing -------------------------------------------------------------------

    def append(self, tr: Transaction, entries: Iterable[AuditEntry]) -> list[pb.AuditRecord]:
        """Append ``entries`` in ``tr``, the caller's transaction, and move the head.

        If ``tr`` does not commit, nothing is appended; if the append fails
        (e.g. a tampered head), the exception aborts the caller's transaction.
        """
        head = self._read_head_in(tr)
        seq, prev = (head.seq, head.hash) if head is not None else (0, ZERO_HASH)
        time_us = to_micros(self._clock.now())
        written: list[pb.AuditRecord] = []
        for entry in entries:
            seq += 1
            record = _build(entry, seq, time_us, prev)
            tr.set(record_key(seq), bytes(record))
            prev = record.hash
            written.append(record)
        if written:
            tr.set(HEAD_KEY, bytes(pb.AuditHead(schema_version=SCHEMA_VERSION, seq=seq,
                                                hash=prev)))
        return written

    async def write(self, entries: list[AuditEntry]) -> list[pb.AuditRecord]:
        """Append ``entries`` in transactions of their own (APPEND_BATCH per transaction)."""
        written: list[pb.AuditRecord] = []
        for start in range(0, len(entries), APPEND_BATCH):
            batch = entries[start:start + APPEND_BATCH]

            def body(tr: Transaction, batch: list[AuditEntry] = batch) -> list[pb.AuditRecord]:
                return self.append(tr, batch)

            written += await self._store.run(body)
        return written

    def _read_head_in(self, tr: Transaction) -> Head | None:
        value = tr.get(HEAD_KEY)
        if value is None:
            # Only the very first append of a store gets here. Starting over at
            # seq 1 would overwrite evidence if the head was deleted.
            begin, end = records_range()
            if tr.get_range(begin, end, limit=1):
                raise DataLoss(
                    "the audit log head is missing but audit records exist: it was deleted at "
                    "the storage level; run `valv audit verify`. Audited changes are refused "
                    "until the head is restored from a backup")
            return None
        head = _parse_head(value)
        return Head(head.seq, bytes(head.hash))

    # ---- reading -------------------------------------------------------------------

    async def head(self) -> Head | None:
        def body(tr: Transaction) -> Head | None:
            value = tr.get(HEAD_KEY)
            if value is None:
                return None
            head = _parse_head(value)
            return Head(head.seq, bytes(head.hash))

        return await self._store.run(body, read_only=True)

    def _raw(self) -> tuple[Store, Callable[[bytes, bytes], bytes]]:
        """The store to read raw values from, and how to open one (per record, so one
        bad record is reported without hiding the others)."""
        if isinstance(self._store, SealedStore):
            return self._store.inner, self._store.sealer.open
        return self._store, lambda key, value: value

    async def items(self, first: int = 1, last: int | None = None, *,
                    chunk: int = READ_CHUNK) -> AsyncIterator[Item]:
        """Every stored position from ``first`` to ``last`` (or the end) in seq order,
        read ``chunk`` at a time, each chunk in its own read-only transaction.

        Positions with no record are skipped (the caller sees the gap in seq).
        A record that does not open or decode yields an Item with a problem.
        """
        raw_store, open_value = self._raw()
        _, end = records_range()
        if last is not None:
            end = record_key(last + 1)
        # From the start, every key under ("audit",) is seen, so keys that no
        # append writes (seq <= 0, not an int) are reported too.
        begin = record_key(first) if first > 1 else records_range()[0]
        while begin < end:
            def body(tr: Transaction, begin: bytes = begin) -> list[tuple[bytes, bytes]]:
                return tr.get_range(begin, end, limit=chunk)

            pairs = await raw_store.run(body, read_only=True)
            for key, value in pairs:
                seq = _seq_of(key)
                if seq is None:
                    yield Item(-1, None, f"unexpected key {key!r} in the audit keyspace")
                    continue
                if seq < first:
                    if seq < 1:
                        yield Item(seq, None, f"a record at seq {seq}, which no append writes")
                    continue
                try:
                    record = _parse_record(key, open_value(key, value))
                except TamperedRecordError:
                    yield Item(seq, None, "failed authentication: it was edited at the storage "
                                          "level, or moved or swapped from another record")
                    continue
                except DataLoss as exc:
                    yield Item(seq, None, str(exc))
                    continue
                yield Item(seq, record)
            if len(pairs) < chunk:
                return
            begin = pairs[-1][0] + b"\x00"

    async def records(self, first: int = 1, last: int | None = None
                      ) -> AsyncIterator[pb.AuditRecord]:
        """Records from ``first`` on, in order; raises DataLoss at a record that fails."""
        async for item in self.items(first, last):
            if item.record is None:
                raise DataLoss(f"audit record {item.seq} {item.problem}; run `valv audit verify`")
            yield item.record

    async def last(self, n: int) -> list[pb.AuditRecord]:
        """The last ``n`` records, oldest first."""
        head = await self.head()
        if head is None or n <= 0:
            return []
        return [r async for r in self.records(max(1, head.seq - n + 1), head.seq)]

    # ---- verification --------------------------------------------------------------

    async def verify(self, *, anchors: Mapping[int, bytes] | None = None,
                     chunk: int = READ_CHUNK,
                     progress: Callable[[int], None] | None = None) -> VerifyReport:
        """Check the whole chain, a chunk at a time. Never raises for tampering:
        every problem found is in the report.

        ``anchors`` maps seq -> hash recorded elsewhere earlier (e.g. from an
        earlier verify): each must still be there, unchanged.
        """
        report = VerifyReport()
        problems = report.problems
        anchors = dict(anchors or {})
        head: Head | None = None
        head_readable = True
        try:
            head = await self.head()
        except (TamperedRecordError, DataLoss) as exc:
            head_readable = False
            problems.append(f"the head: {_reason(exc)}")
        report.head = head
        limit = head.seq if head is not None else None

        expected = 1
        prev: bytes | None = ZERO_HASH
        last_seq, last_hash = 0, b""
        async for item in self.items(1, limit, chunk=chunk):
            if item.seq < 1:
                problems.append(item.problem)
                continue
            if item.seq > expected:
                gap = (f"record {expected} is" if item.seq == expected + 1
                       else f"records {expected}..{item.seq - 1} are")
                problems.append(f"{gap} missing: deleted at the storage level")
                prev = None  # the link across a gap can't be checked
            expected = item.seq + 1
            last_seq = item.seq
            record = item.record
            if record is None:
                problems.append(f"record {item.seq}: {item.problem}")
                prev, last_hash = None, b""
                continue
            report.checked += 1
            if progress is not None and report.checked % 10_000 == 0:
                progress(report.checked)
            if record.seq != item.seq:
                problems.append(f"record {item.seq}: holds seq {record.seq}: it was moved")
            if prev is not None and bytes(record.prev_hash) != prev:
                problems.append(
                    f"record {item.seq}: does not follow record {item.seq - 1} (prev_hash "
                    "mismatch): records were removed, reordered or replaced")
            if compute_hash(record) != bytes(record.hash):
                problems.append(f"record {item.seq}: its hash does not match its content: "
                                "it was edited")
            anchor = anchors.pop(item.seq, None)
            if anchor is not None and anchor != bytes(record.hash):
                problems.append(f"record {item.seq}: hash {bytes(record.hash).hex()} differs "
                                f"from the anchor {anchor.hex()}: the log was rewritten")
            prev = last_hash = bytes(record.hash)

        for seq in sorted(anchors):
            problems.append(f"record {seq}: anchored but not in the log (or beyond the head)")
        if head is not None:
            if last_seq < head.seq:
                missing = (f"record {head.seq} is" if last_seq == head.seq - 1
                           else f"records {last_seq + 1}..{head.seq} are")
                problems.append(f"the tail was truncated: the head names record {head.seq} "
                                f"but the log ends at {last_seq} ({missing} missing)")
            elif last_hash and last_hash != head.hash:
                problems.append(f"record {head.seq}: its hash does not match the head's: the "
                                "last record was replaced")
            await self._check_beyond(head, problems)
        elif head_readable and last_seq > 0:
            problems.append(f"the head is missing but there are records up to {last_seq}: it "
                            "was deleted at the storage level")
        return report

    async def _check_beyond(self, head: Head, problems: list[str]) -> None:
        """No record may sit beyond the head: appends move both in one transaction.

        Records appended since the head was first read are fine: this reads the
        current head and looks past it, in one transaction.
        """
        raw_store, open_value = self._raw()

        def body(tr: Transaction) -> list[int]:
            current = head.seq
            value = tr.get(HEAD_KEY)
            if value is not None:
                try:
                    current = max(current, _parse_head(open_value(HEAD_KEY, value)).seq)
                except (TamperedRecordError, DataLoss):
                    pass
            _, end = records_range()
            extra = tr.get_range(record_key(current + 1), end, limit=1)
            return [seq for key, _ in extra if (seq := _seq_of(key)) is not None]

        for seq in await raw_store.run(body, read_only=True):
            problems.append(f"record {seq}: lies beyond the head: written outside an append "
                            "(or the head was rolled back)")


def _seq_of(key: bytes) -> int | None:
    try:
        parts = unpack(key)
    except ValueError:
        return None
    if len(parts) != 2 or parts[0] != RECORD_PREFIX or type(parts[1]) is not int:
        return None
    return int(parts[1])


def _reason(exc: Exception) -> str:
    if isinstance(exc, TamperedRecordError):
        return ("failed authentication: it was edited or replaced at the storage level")
    return str(exc)


# ---- presentation ----------------------------------------------------------------------


def _iso(micros: int) -> str:
    return from_micros(micros).isoformat().replace("+00:00", "Z")


def record_to_json(record: pb.AuditRecord) -> dict[str, Any]:
    """A record as a JSON-able dict (what ``valv audit tail/query`` print)."""
    out: dict[str, Any] = {
        "seq": record.seq,
        "time": _iso(record.time_us),
        "kind": pb.RecordKind(record.kind).name,
        "principal": record.principal,
        "auth_method": record.auth_method,
        "rpc": record.rpc,
        "resource": record.resource,
    }
    if record.target:
        out["target"] = record.target
    if record.truncated:
        out["truncated"] = True
    aggregate = record.kind == pb.RecordKind.DATA_ACCESS_AGGREGATE
    if not aggregate:
        try:
            out["request"] = json.loads(record.request_json) if record.request_json else {}
        except ValueError:  # cut to fit
            out["request_text"] = record.request_json
    out["status"] = record.status
    if record.status_message:
        out["message"] = record.status_message
    if aggregate:
        out["count"] = record.count
        out["window_start"] = _iso(record.window_start_us)
        out["window_end"] = _iso(record.window_end_us)
        out["peers"] = list(record.peers)
    else:
        out["peer"] = record.peer
    if record.request_id:
        out["request_id"] = record.request_id
    out["prev_hash"] = bytes(record.prev_hash).hex()
    out["hash"] = bytes(record.hash).hex()
    return out


DENIED_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


@dataclass(frozen=True, slots=True)
class Query:
    """Filters for ``valv audit query``; unset fields match everything."""

    principal: str | None = None
    # A resource matches itself and everything under it.
    resource: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # "OK", "DENIED" (UNAUTHENTICATED or PERMISSION_DENIED), "FAILED" (anything
    # but OK), or a status name.
    result: str | None = None
    rpc: str | None = None

    def matches(self, record: pb.AuditRecord) -> bool:
        if self.principal is not None and record.principal != self.principal:
            return False
        if self.resource is not None:
            prefix = self.resource.rstrip("/")
            if not any(name == prefix or name.startswith(prefix + "/")
                       for name in (record.resource, record.target)):
                return False
        if self.since is not None and record.time_us < to_micros(self.since):
            return False
        if self.until is not None and record.time_us >= to_micros(self.until):
            return False
        if self.rpc is not None and record.rpc != self.rpc:
            return False
        if self.result is not None:
            wanted = self.result.upper()
            if wanted == "DENIED":
                return record.status in DENIED_STATUSES
            if wanted == "FAILED":
                return record.status != "OK"
            return record.status == wanted
        return True


async def query(log_: AuditLog, q: Query) -> AsyncIterator[pb.AuditRecord]:
    async for record in log_.records():
        if q.matches(record):
            yield record


# ---- data access -----------------------------------------------------------------------


class DataAccessMode(enum.Enum):
    OFF = "off"
    AGGREGATE = "aggregate"
    FULL = "full"

    @classmethod
    def parse(cls, text: str) -> DataAccessMode:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise ValueError(f"audit data-access mode {text!r} is not one of "
                             "off, aggregate, full") from None


WINDOW = timedelta(minutes=1)
_WINDOW_US = WINDOW // timedelta(microseconds=1)
DEFAULT_FLUSH_INTERVAL_S = 10.0
# Past this many pending counters a flush starts at once (memory stays bounded
# however many principals and versions are busy).
DEFAULT_MAX_PENDING = 10_000

# (principal, auth_method, rpc, resource, target, status, window_start_us)
_BucketKey = tuple[str, str, str, str, str, str, int]


@dataclass(slots=True)
class _Bucket:
    count: int = 0
    peers: list[str] = field(default_factory=list)


class DataAccessAggregator:
    """Counts data-access calls per principal x key version x minute, in memory.

    ``add`` is O(1) and does no I/O: the hot path never waits on storage. A
    flush appends one DATA_ACCESS_AGGREGATE record per counter, in batches
    (APPEND_BATCH per transaction). ``run`` flushes every ``interval_s``
    the windows that have closed, so a busy minute normally becomes one record;
    ``flush(everything=True)`` (at shutdown) writes the open ones too. Counts of a
    flush that fails are kept and written by the next.

    Not thread-safe: call it from the event loop only.
    """

    def __init__(self, log_: AuditLog, clock: Clock, *,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self._log = log_
        self._clock = clock
        self._max_pending = max_pending
        self._buckets: dict[_BucketKey, _Bucket] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    @property
    def pending(self) -> int:
        """Calls counted but not written yet."""
        return sum(b.count for b in self._buckets.values())

    def add(self, call: CallContext, *, status: str, target: str = "") -> None:
        now_us = to_micros(self._clock.now())
        start = now_us - now_us % _WINDOW_US
        key = (call.principal.member, call.principal.method, call.rpc, call.resource, target,
               status, start)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            if len(self._buckets) >= self._max_pending:
                self._wake.set()
        bucket.count += 1
        if len(bucket.peers) < MAX_PEERS and call.peer not in bucket.peers:
            bucket.peers.append(call.peer)

    async def flush(self, *, everything: bool = False) -> int:
        """Write the closed windows (all of them if ``everything``); returns records written."""
        async with self._lock:
            now_us = to_micros(self._clock.now())
            taken = {key: bucket for key, bucket in self._buckets.items()
                     if everything or key[6] + _WINDOW_US <= now_us
                     or len(self._buckets) >= self._max_pending}
            if not taken:
                return 0
            for key in taken:
                del self._buckets[key]
            entries = [
                AuditEntry(kind=pb.RecordKind.DATA_ACCESS_AGGREGATE, principal=key[0],
                           auth_method=key[1], rpc=key[2], resource=key[3], target=key[4],
                           status=key[5], count=bucket.count, window_start_us=key[6],
                           window_end_us=key[6] + _WINDOW_US, peers=tuple(bucket.peers))
                for key, bucket in sorted(taken.items())]
            try:
                await self._log.write(entries)
            except BaseException:
                # Put the counts back; the next flush tries again.
                for key, bucket in taken.items():
                    merged = self._buckets.setdefault(key, _Bucket())
                    merged.count += bucket.count
                    merged.peers = (merged.peers + [p for p in bucket.peers
                                                    if p not in merged.peers])[:MAX_PEERS]
                raise
            return len(entries)

    async def run(self, stop: asyncio.Event, interval_s: float = DEFAULT_FLUSH_INTERVAL_S
                  ) -> None:
        """Flush closed windows every ``interval_s`` until ``stop``; then flush everything."""
        while not stop.is_set():
            waiter = asyncio.ensure_future(self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, timeout=interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()
            self._wake.clear()
            if stop.is_set():
                break
            try:
                await self.flush()
            except Exception:
                log.exception("could not write data-access audit counts; retrying at the next "
                              "flush", extra={"fields": {"pending_calls": self.pending}})
        await self.final_flush()

    async def final_flush(self) -> None:
        try:
            await self.flush(everything=True)
        except Exception:
            log.exception("could not write data-access audit counts at shutdown; they are "
                          "lost", extra={"fields": {"pending_calls": self.pending}})


class AuditedChanges:
    """Which calls already have their admin record from inside their transaction.

    The change hook runs in a storage worker thread (and again if the
    transaction is retried); ``finished`` runs on the event loop once the call
    is over. Bounded, so calls that never finish (cancelled) can't grow it.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self._ids: dict[str, None] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def mark(self, request_id: str) -> None:
        with self._lock:
            self._ids[request_id] = None
            while len(self._ids) > self._limit:
                del self._ids[next(iter(self._ids))]

    def pop(self, request_id: str) -> bool:
        """True if ``request_id`` was marked (and forget it)."""
        with self._lock:
            if request_id in self._ids:
                del self._ids[request_id]
                return True
            return False


__all__ = [
    "APPEND_BATCH",
    "HEAD_KEY",
    "SCHEDULER_PRINCIPAL",
    "AuditEntry",
    "AuditLog",
    "AuditRecord",
    "AuditedChanges",
    "DataAccessAggregator",
    "DataAccessMode",
    "Head",
    "Query",
    "RecordKind",
    "VerifyReport",
    "canonical_bytes",
    "compute_hash",
    "entry_for_call",
    "entry_for_change",
    "query",
    "record_key",
    "record_to_json",
    "records_range",
]
