"""The audit log: a tamper-evident hash chain in the store, written atomically with changes.

Layout (tuples packed with fdb.tuple; see valv.core.storage.keys)::

    ("audit", seq:int)     AuditRecord (valv.audit.v1), seq = 1, 2, 3...
    ("audit-head",)        AuditHead: the last seq and its hash (seq 0: empty log)
    ("audit-genesis",)     the log's birth certificate (JSON, see ``Genesis``)
    ("audit-stage", vs)    FoundationDB only: a record waiting for ``chain``

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
  that hides it;
- the genesis marker, written once when the log is created (``AuditLog.open``
  at startup, or with the first append), says a log exists: deleting the head
  and every record leaves it behind. Deleting it too leaves the store's other
  records (key rings, keys...) without a log, which can't happen otherwise:
  every change since the store's first one has its record. ``verify`` reports
  both, ``open`` refuses them (audited changes then fail with DATA_LOSS) and
  an ``AuditLog`` that has seen the log refuses to start a new one. The
  genesis also holds the hash of record 1, so a head rolled back to the empty
  log, or another log put in place of this one, shows.

What it does not catch on its own: putting back an older copy of the whole
store (or of the head together with the records after it), and rewriting by
someone who holds the root key. Both are caught by comparing with a head
hash kept elsewhere (``valv audit verify`` prints it; ``--anchor`` checks it).

Appends. ``AuditLog.append`` runs inside the caller's transaction, so an
audited change and its record commit together or not at all. On SQLite it
reads the head, writes the records after it and the new head: appends
serialize on the head, which is free there (writers are serialized anyway).
On FoundationDB that would make every audited transaction conflict on the
head key, so there versionstamps order the log instead: the record is staged
at ``("audit-stage", <versionstamp>)`` (a key FDB completes at commit, in
commit order, with no read), and ``chain`` (every central's change follower
runs it every poll interval, 0.2 s) links staged records
into the chain in that order: seq, prev_hash, hash, head. Only chain passes
touch the head; FDB reruns the one that loses a race.

What staging gives up: until its record is chained (normally well under a
second), a record is sealed and bound to the staging prefix but not yet
linked, so someone with write access to storage could delete it in that
window unnoticed, as they could roll back the whole store; once chained it is
as tamper-evident as any other.

Data access (Encrypt, Decrypt, GenerateRandomBytes) goes through
``DataAccessAggregator`` in "aggregate" mode: counts kept in memory per
principal x key version x minute and flushed in batches, so the hot path
does no storage I/O. Refusals of callers that could not be authenticated are
counted the same way, per caller host x RPC x reason x minute, so that
anyone who can reach the port can't make central write a record per call.

Sidecars answer Encrypt/Decrypt themselves and report per-minute counts
(valv.sidecar.v1.KeyMaterial/ReportUsage): ``DataAccessAggregator.add_reported``
turns them into the same DATA_ACCESS_AGGREGATE records, with the sidecar's
principal, auth method and address, the reported window, and request_json
``{"reported_by":"sidecar"}`` (REPORTED_REQUEST): ``record_to_json`` shows
it as ``"reported_by": "sidecar"`` and ``valv audit query --reported`` selects
them.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

from valv._proto.valv.audit import v1 as pb
from valv.core.calls import CallContext
from valv.core.clock import Clock, from_micros, to_micros
from valv.core.errors import DataLoss
from valv.core.storage.base import Store, Transaction
from valv.core.storage.keys import pack, range_of, unpack
from valv.core.storage.sealed import SealedStore, SealedTransaction, TamperedRecordError

log = logging.getLogger("valv.audit")

SCHEMA_VERSION = 1
HASH_BYTES = 32
ZERO_HASH = bytes(HASH_BYTES)

RECORD_PREFIX = "audit"
HEAD_KEY = pack("audit-head")
GENESIS_KEY = pack("audit-genesis")
# Records waiting for ``chain`` on a store with versionstamps (FoundationDB).
STAGE_PREFIX = pack("audit-stage")
# Every audit key starts with these bytes (("audit", seq), ("audit-head",),
# ("audit-genesis",)): the rest of the store is outside [begin, end).
_AUDIT_SPACE = (pack(RECORD_PREFIX)[:-1], pack(RECORD_PREFIX)[:-2] + b"u")

RecordKind = pb.RecordKind
AuditRecord = pb.AuditRecord

# request_json of the aggregate records of usage a sidecar reported (ReportUsage).
REPORTED_BY = "sidecar"
REPORTED_REQUEST: Final = {"reported_by": REPORTED_BY}
REPORTED_REQUEST_JSON: Final = '{"reported_by":"sidecar"}'

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
# Records written per transaction by ``AuditLog.write``: ~60 kB worst case
# each keeps a transaction far below the 10 MB limit.
APPEND_BATCH = 100
# Aggregate records written per transaction by a flush: they hold no request
# summary or message longer than MAX_REASON_BYTES, so ~8 kB worst case each
# (~4 MB per transaction); usually ~300 bytes.
FLUSH_BATCH = 500
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


def _build(entry: AuditEntry, time_us: int) -> pb.AuditRecord:
    """The record for ``entry``, without its place in the chain (seq, prev_hash, hash)."""
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
        schema_version=SCHEMA_VERSION, time_us=time_us, kind=entry.kind,
        principal=text["principal"], auth_method=text["auth_method"], rpc=text["rpc"],
        resource=text["resource"], target=text["target"], request_json=request_json,
        truncated=truncated, status=text["status"], status_message=text["status_message"],
        peer=text["peer"], request_id=text["request_id"], count=entry.count,
        window_start_us=entry.window_start_us, window_end_us=entry.window_end_us,
        peers=peers)
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
class Genesis:
    """The log's birth certificate, at ``("audit-genesis",)``, sealed like every value.

    Written once, with the log's first head, and again (the same
    ``created_us``) when record 1 is appended, to hold its hash. Stored as
    canonical JSON: ``{"created_us": int, "first_hash": hex or "",
    "schema_version": 1}``.
    """

    created_us: int
    first_hash: bytes = b""

    def to_bytes(self) -> bytes:
        return json.dumps({"created_us": self.created_us, "first_hash": self.first_hash.hex(),
                           "schema_version": SCHEMA_VERSION},
                          sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def parse(cls, value: bytes) -> Genesis:
        try:
            fields = json.loads(value)
            version = int(fields["schema_version"])
            created_us = int(fields["created_us"])
            first_hash = bytes.fromhex(str(fields["first_hash"]))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise DataLoss(f"the audit genesis marker could not be decoded: {exc}") from None
        if version > SCHEMA_VERSION:
            raise DataLoss(f"the audit genesis marker has schema version {version}; "
                           "upgrade Valv")
        if first_hash and len(first_hash) != HASH_BYTES:
            raise DataLoss("the audit genesis marker holds a malformed first hash")
        return cls(created_us, first_hash)


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
    genesis: Genesis | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class AuditLog:
    """The audit log in ``store`` (normally a SealedStore), with time from ``clock``."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        # Set once this process has seen the log committed (open, a write, a
        # head read): from then on a store without it lost it.
        self._known = False
        # Why appends are refused (the log was found deleted by ``open``).
        self._refusal: str | None = None

    # ---- writing -------------------------------------------------------------------

    async def open(self) -> Genesis:
        """Check the log before serving, and create it (genesis and an empty head)
        in a store that has nothing yet. Call once at startup, before changes.

        Raises DataLoss (or TamperedRecordError) if the log was deleted or its
        head or genesis marker can't be read; from then on this AuditLog refuses
        every append with that reason, so no change is made without its record
        and no new chain is started over the evidence.
        """
        now_us = to_micros(self._clock.now())

        def body(tr: Transaction) -> Genesis:
            head = self._read_head_in(tr)
            genesis_value = tr.get(GENESIS_KEY)
            if head is not None:
                if genesis_value is None:
                    raise DataLoss(
                        "the audit log's genesis marker is missing but the log is there: it "
                        "was deleted at the storage level; run `valv audit verify`. Audited "
                        "changes are refused until it is restored from a backup")
                return Genesis.parse(genesis_value)
            # No log at all (_read_head_in refused a missing head with a
            # genesis or records left): a new store, or one whose log was wiped.
            if _other_keys_exist(tr):
                raise DataLoss(
                    "the store holds records (key rings, keys...) but no audit log: the whole "
                    "log was deleted at the storage level; run `valv audit verify`. Audited "
                    "changes are refused until it is restored from a backup")
            genesis = Genesis(now_us)
            tr.set(GENESIS_KEY, genesis.to_bytes())
            tr.set(HEAD_KEY, bytes(pb.AuditHead(schema_version=SCHEMA_VERSION, seq=0,
                                                hash=ZERO_HASH)))
            return genesis

        try:
            genesis = await self._store.run(body)
        except (DataLoss, TamperedRecordError) as exc:
            self._refusal = f"the audit log can't be appended to: {exc}"
            raise
        self._known = True
        return genesis

    def append(self, tr: Transaction, entries: Iterable[AuditEntry]) -> list[pb.AuditRecord]:
        """Append ``entries`` in ``tr``, the caller's transaction, and move the head.

        If ``tr`` does not commit, nothing is appended; if the append fails
        (e.g. a tampered head, a deleted log), the exception aborts the
        caller's transaction.

        On a store with versionstamps (FoundationDB) the records are staged
        instead, in commit order, without reading the head, so audited
        transactions don't conflict on it; ``chain`` links them into the
        chain (every central runs it). They are returned with seq 0 then.
        """
        if self._refusal is not None:
            raise DataLoss(self._refusal)
        time_us = to_micros(self._clock.now())
        records = [_build(entry, time_us) for entry in entries]
        if tr.supports_versionstamps:
            for record in records:  # seq and hashes come with their place in the chain
                tr.set_versionstamped(STAGE_PREFIX, bytes(record))
            return records
        return self._link(tr, records)

    def _link(self, tr: Transaction, records: list[pb.AuditRecord]) -> list[pb.AuditRecord]:
        """Put ``records`` after the head, in order: seq, prev_hash and hash; move the head.

        The head is checked even when there is nothing to put (a deleted log
        refuses every append)."""
        head = self._read_head_in(tr)
        if not records:
            return records
        seq, prev = (head.seq, head.hash) if head is not None else (0, ZERO_HASH)
        if tr.get(record_key(seq + 1)) is not None:
            # One point read per append keeps a rolled-back head from
            # overwriting the records after it.
            raise DataLoss(
                f"a record already exists past the audit log head (seq {seq + 1}): the head "
                "was rolled back at the storage level; run `valv audit verify`. Audited changes "
                "are refused until it is restored")
        for record in records:
            seq += 1
            record.seq, record.prev_hash = seq, prev
            record.hash = compute_hash(record)
            tr.set(record_key(seq), bytes(record))
            prev = record.hash
        if head is None or head.seq == 0:
            # Record 1: the genesis marker (new, or the one ``open`` wrote) names it.
            genesis = Genesis(records[0].time_us)
            if head is not None:
                value = tr.get(GENESIS_KEY)
                if value is None:
                    raise DataLoss("the audit log's genesis marker is missing: it was deleted "
                                   "at the storage level; run `valv audit verify`")
                genesis = Genesis.parse(value)
                if genesis.first_hash:
                    raise DataLoss("the audit log head says the log is empty but its genesis "
                                   "marker names a first record: the head was rolled back at "
                                   "the storage level; run `valv audit verify`")
            tr.set(GENESIS_KEY, Genesis(genesis.created_us, bytes(records[0].hash)).to_bytes())
        tr.set(HEAD_KEY, bytes(pb.AuditHead(schema_version=SCHEMA_VERSION, seq=seq, hash=prev)))
        return records

    def _chain_body(self, tr: Transaction) -> int:
        assert isinstance(tr, SealedTransaction), "the audit log is read and written sealed"
        staged = tr.get_stamped_range(STAGE_PREFIX, limit=APPEND_BATCH)
        if not staged:
            return 0
        records = []
        for key, value in staged:
            records.append(_parse_record(key, value))
            tr.clear(key)
        self._link(tr, records)
        return len(records)

    async def chain(self, *, always: bool = False) -> int:
        """Link staged records (FoundationDB) into the chain, in commit order; how many.

        Any number of centrals may run it at once: each pass reads the head, so
        concurrent passes conflict there and FoundationDB runs the loser again.
        ``always``: even without versionstamps (see valv.core.changelog.sequence).
        """
        if not self._store.supports_versionstamps and not always:
            return 0
        total = 0
        while True:
            linked = await self._store.run(self._chain_body)
            total += linked
            if linked < APPEND_BATCH:
                return total

    async def write(self, entries: list[AuditEntry], *,
                    batch: int = APPEND_BATCH) -> list[pb.AuditRecord]:
        """Append ``entries`` in transactions of their own, ``batch`` per transaction.

        Each transaction commits on its own: if one fails, the ones before it
        are in the log. The caller decides what cancellation means: this
        coroutine, cancelled, may leave its current transaction committed or
        not (shield it in a task of its own to have it finish).
        """
        written: list[pb.AuditRecord] = []
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]

            def body(tr: Transaction, chunk: list[AuditEntry] = chunk) -> list[pb.AuditRecord]:
                return self.append(tr, chunk)

            written += await self._store.run(body)
            self._known = True
        return written

    def _read_head_in(self, tr: Transaction) -> Head | None:
        value = tr.get(HEAD_KEY)
        if value is None:
            # A log that was never written to gets here; one that was must not
            # start over at seq 1, over the evidence of its deletion.
            begin, end = records_range()
            if tr.get_range(begin, end, limit=1):
                raise DataLoss(
                    "the audit log head is missing but audit records exist: it was deleted at "
                    "the storage level; run `valv audit verify`. Audited changes are refused "
                    "until the head is restored from a backup")
            genesis = tr.get(GENESIS_KEY)
            if genesis is not None:
                created = _iso(Genesis.parse(genesis).created_us)
                raise DataLoss(
                    f"the audit log created at {created} was deleted at the storage level: its "
                    "genesis marker is there but the head and every record are gone; run "
                    "`valv audit verify`. Audited changes are refused until the log is "
                    "restored from a backup")
            if self._known:
                raise DataLoss(
                    "the audit log was deleted at the storage level while central was using "
                    "it (its head, records and genesis marker are gone); run `valv audit "
                    "verify`. Audited changes are refused until it is restored from a backup")
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

        head = await self._store.run(body, read_only=True)
        if head is not None:
            self._known = True
        return head

    async def genesis(self) -> Genesis | None:
        """The genesis marker, or None if the log was never created (or it was deleted)."""
        def body(tr: Transaction) -> Genesis | None:
            value = tr.get(GENESIS_KEY)
            return None if value is None else Genesis.parse(value)

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
        ends = await self._ends()
        head, genesis = ends.head, ends.genesis
        head_readable = ends.head_problem is None
        genesis_readable = ends.genesis_problem is None
        if ends.head_problem is not None:
            problems.append(f"the head: {ends.head_problem}")
        if ends.genesis_problem is not None:
            problems.append(f"the genesis marker: {ends.genesis_problem}")
        report.head, report.genesis = head, genesis
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
            if item.seq == 1 and genesis is not None and genesis.first_hash \
                    and genesis.first_hash != bytes(record.hash):
                problems.append("record 1: is not the record the genesis marker names: the "
                                "log was replaced")
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
        if head_readable and genesis_readable:
            _check_existence(head, last_seq, genesis, ends.other_keys, problems)
        return report

    async def _ends(self) -> _Ends:
        """The head and genesis marker, and whether the store holds anything else when
        there is neither, in one snapshot (central may be appending meanwhile)."""
        raw_store, open_value = self._raw()

        def body(tr: Transaction) -> _Ends:
            ends = _Ends()
            head_value, genesis_value = tr.get(HEAD_KEY), tr.get(GENESIS_KEY)
            try:
                if head_value is not None:
                    head = _parse_head(open_value(HEAD_KEY, head_value))
                    ends.head = Head(head.seq, bytes(head.hash))
            except (TamperedRecordError, DataLoss) as exc:
                ends.head_problem = _reason(exc)
            try:
                if genesis_value is not None:
                    ends.genesis = Genesis.parse(open_value(GENESIS_KEY, genesis_value))
            except (TamperedRecordError, DataLoss) as exc:
                ends.genesis_problem = _reason(exc)
            if head_value is None and genesis_value is None:
                ends.other_keys = _other_keys_exist(tr)
            return ends

        return await raw_store.run(body, read_only=True)


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


@dataclass(slots=True)
class _Ends:
    head: Head | None = None
    head_problem: str | None = None
    genesis: Genesis | None = None
    genesis_problem: str | None = None
    other_keys: bool = False


def _check_existence(head: Head | None, last_seq: int, genesis: Genesis | None,
                     other_keys: bool, problems: list[str]) -> None:
    """What the genesis marker and the rest of the store say about the log as a whole."""
    if genesis is not None:
        if head is None and last_seq == 0:
            problems.append(
                f"the whole log was deleted: its genesis marker (created "
                f"{_iso(genesis.created_us)}) is there but the head and every record "
                "are gone")
        elif head is not None and head.seq == 0 and genesis.first_hash:
            problems.append("the head says the log is empty but the genesis marker names "
                            "a first record: the head was rolled back")
        elif head is not None and head.seq > 0 and not genesis.first_hash:
            problems.append("the genesis marker names no first record but the log has "
                            "records: the marker was rolled back")
        return
    if head is not None or last_seq > 0:
        problems.append("the genesis marker is missing: it was deleted at the storage level "
                        "(or the log was written by a Valv older than this one)")
        return
    if other_keys:
        problems.append("the store holds records (key rings, keys...) but no audit log at "
                        "all: the whole log, genesis marker included, was deleted at the "
                        "storage level")


def _other_keys_exist(tr: Transaction) -> bool:
    """Whether the store holds anything outside the audit keyspace (two point-ish reads)."""
    for begin, end in ((b"", _AUDIT_SPACE[0]), (_AUDIT_SPACE[1], b"\xff")):
        try:
            if tr.get_range(begin, end, limit=1):
                return True
        except TamperedRecordError:  # there, if unreadable
            return True
    return False


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
    # DATA_ACCESS_AGGREGATE, or DENIED counted per caller host x RPC x reason x minute.
    aggregate = record.kind == pb.RecordKind.DATA_ACCESS_AGGREGATE or record.count > 0
    if not aggregate:
        try:
            out["request"] = json.loads(record.request_json) if record.request_json else {}
        except ValueError:  # cut to fit
            out["request_text"] = record.request_json
    out["status"] = record.status
    if record.status_message:
        out["message"] = record.status_message
    if aggregate:
        if is_reported(record):
            out["reported_by"] = REPORTED_BY
        out["count"] = record.count
        out["window_start"] = _iso(record.window_start_us)
        out["window_end"] = _iso(record.window_end_us)
        out["peers"] = list(record.peers)
        if record.peer:
            out["peer"] = record.peer  # the callers' host, for counted refusals
    else:
        out["peer"] = record.peer
    if record.request_id:
        out["request_id"] = record.request_id
    out["prev_hash"] = bytes(record.prev_hash).hex()
    out["hash"] = bytes(record.hash).hex()
    return out


def is_reported(record: pb.AuditRecord) -> bool:
    """A DATA_ACCESS_AGGREGATE of usage a sidecar reported (not counted by central)."""
    return (record.kind == pb.RecordKind.DATA_ACCESS_AGGREGATE
            and record.request_json == REPORTED_REQUEST_JSON)


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
    # True: only usage reported by sidecars; False: none of it.
    reported: bool | None = None

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
        if self.reported is not None and is_reported(record) != self.reported:
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
# Distinct (caller host, RPC, reason, minute) counters of unauthenticated
# refusals kept apart between flushes; past it they are counted together in one
# "other" counter per minute, so a caller with many addresses can't grow memory
# or the log.
DEFAULT_MAX_REFUSALS = 1_000
# Refusal reasons are cut to this many bytes (they come from the authenticator
# and may quote what the caller sent).
MAX_REASON_BYTES = 256
# The largest count one record holds (its field is a uint64).
MAX_COUNT = 2**64 - 1
OVERFLOW_REASON = "(more distinct callers, RPCs or reasons than are counted apart: counted here)"

# (kind, principal, auth_method, rpc, resource, target, status, message, peer,
# window_start_us, reported by a sidecar)
_BucketKey = tuple[pb.RecordKind, str, str, str, str, str, str, str, str, int, bool]
_WINDOW_FIELD: Final = 9


@dataclass(slots=True)
class _Bucket:
    count: int = 0
    peers: list[str] = field(default_factory=list)

    def merge(self, other: _Bucket) -> None:
        self.count += other.count
        self.peers = (self.peers + [p for p in other.peers if p not in self.peers])[:MAX_PEERS]


_Batch = list[tuple[_BucketKey, _Bucket]]


def peer_host(peer: str) -> str:
    """The host part of a peer address ("10.0.0.7:52211" -> "10.0.0.7"; "unix" stays)."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peer


class DataAccessAggregator:
    """Counts calls in memory and writes the counts in batches: data access per
    principal x key version x result x minute, and refusals of unauthenticated
    callers per caller host x RPC x reason x minute.

    ``add`` and ``add_refusal`` are O(1) and do no I/O: those calls never wait
    on storage. A flush appends one record per counter (DATA_ACCESS_AGGREGATE,
    or DENIED with a count), FLUSH_BATCH per transaction. ``run`` flushes every
    ``interval_s`` the windows that have closed, so a busy minute normally
    becomes one record; ``flush(everything=True)`` (at shutdown) writes the
    open ones too.

    Every count is written exactly once: each batch's transaction runs in a
    task of its own that a cancelled flush does not stop, and only the counts
    of a batch that did not commit go back to be written by the next flush.

    Not thread-safe: call it from the event loop only.
    """

    def __init__(self, log_: AuditLog, clock: Clock, *,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 max_refusals: int = DEFAULT_MAX_REFUSALS) -> None:
        self._log = log_
        self._clock = clock
        self._max_pending = max_pending
        self._max_refusals = max_refusals
        self._buckets: dict[_BucketKey, _Bucket] = {}
        self._refusals: dict[_BucketKey, _Bucket] = {}
        # Batches being written: their counts are out of the maps until they commit
        # (then gone) or fail (then back).
        self._in_flight: dict[asyncio.Future[Any], _Batch] = {}
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.running = False
        # Awaited before the final flush (e.g. records still being written).
        self.before_final_flush: Callable[[], Awaitable[None]] | None = None

    @property
    def pending(self) -> int:
        """Calls counted but not written yet (including those being written)."""
        return (sum(b.count for b in self._buckets.values())
                + sum(b.count for b in self._refusals.values())
                + sum(b.count for batch in self._in_flight.values() for _, b in batch))

    def _window(self) -> int:
        now_us = to_micros(self._clock.now())
        return now_us - now_us % _WINDOW_US

    def add(self, call: CallContext, *, status: str, target: str = "") -> None:
        key = (pb.RecordKind.DATA_ACCESS_AGGREGATE, call.principal.member, call.principal.method,
               call.rpc, call.resource, target, status, "", "", self._window(), False)
        _count(self._data_bucket(key), call.peer)

    def add_reported(self, call: CallContext, *, rpc: str, resource: str, target: str,
                     status: str, window_start_us: int, count: int) -> None:
        """Count ``count`` uses a sidecar reported for the minute at ``window_start_us``.

        ``call`` is the ReportUsage call: its principal (the sidecar's identity),
        auth method and peer go into the record, marked as reported
        (REPORTED_REQUEST). The caller validates the values; the window must
        start on a minute and ``count`` be positive.
        """
        if window_start_us % _WINDOW_US or count < 1:
            raise ValueError("a reported window starts on a minute and has a positive count")
        key = (pb.RecordKind.DATA_ACCESS_AGGREGATE, call.principal.member, call.principal.method,
               rpc, resource, target, status, "", "", window_start_us, True)
        bucket = self._data_bucket(key)
        bucket.count += count - 1
        _count(bucket, call.peer)

    def _data_bucket(self, key: _BucketKey) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            if len(self._buckets) >= self._max_pending:
                self._wake.set()
        return bucket

    def add_refusal(self, call: CallContext, *, status: str, reason: str) -> None:
        """Count a refused call from a caller that could not be authenticated."""
        window = self._window()
        key = (pb.RecordKind.DENIED, call.principal.member, call.principal.method, call.rpc,
               "", "", status, _cut(reason, MAX_REASON_BYTES)[0], peer_host(call.peer), window,
               False)
        bucket = self._refusals.get(key)
        if bucket is None:
            if len(self._refusals) >= self._max_refusals:
                self._wake.set()
                key = (pb.RecordKind.DENIED, call.principal.member, call.principal.method, "",
                       "", "", status, OVERFLOW_REASON, "", window, False)
                bucket = self._refusals.get(key)
            if bucket is None:
                bucket = self._refusals[key] = _Bucket()
        _count(bucket, call.peer)

    async def flush(self, *, everything: bool = False) -> int:
        """Write the closed windows (all of them if ``everything``); returns records written.

        If a batch fails, the batches before it stay written, its counts and
        those of the batches after it are kept for the next flush, and the
        error is raised. If the flush is cancelled, the batch being written
        still commits or has its counts put back, and the rest are put back.
        """
        async with self._lock:
            await self._settle()
            taken = self._take(everything)
            written = 0
            while taken:
                batch, taken = taken[:FLUSH_BATCH], taken[FLUSH_BATCH:]
                entries = [_aggregate_entry(key, bucket) for key, bucket in batch]
                task = asyncio.ensure_future(self._log.write(entries, batch=FLUSH_BATCH))
                self._in_flight[task] = batch
                task.add_done_callback(self._settled)
                try:
                    await asyncio.shield(task)
                except BaseException:
                    # Failed or cancelled: ``_settled`` puts this batch back unless
                    # it committed; the batches not tried go back now.
                    self._restore(taken)
                    raise
                written += len(batch)
            return written

    def _take(self, everything: bool) -> _Batch:
        now_us = to_micros(self._clock.now())
        taken: _Batch = []
        for buckets, limit in ((self._buckets, self._max_pending),
                               (self._refusals, self._max_refusals)):
            full = len(buckets) >= limit
            keys = [key for key in buckets
                    if everything or full or key[_WINDOW_FIELD] + _WINDOW_US <= now_us]
            taken += [(key, buckets.pop(key)) for key in keys]
        taken.sort(key=lambda item: (item[0][_WINDOW_FIELD], item[0]))
        return taken

    def _restore(self, batch: _Batch) -> None:
        for key, bucket in batch:
            buckets = self._refusals if key[0] == pb.RecordKind.DENIED else self._buckets
            buckets.setdefault(key, _Bucket()).merge(bucket)

    def _settled(self, task: asyncio.Future[Any]) -> None:
        batch = self._in_flight.pop(task, [])
        if task.cancelled() or task.exception() is not None:
            self._restore(batch)  # not committed: the next flush writes it

    async def _settle(self) -> None:
        """Wait for batches a cancelled flush left in flight."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))

    async def run(self, stop: asyncio.Event, interval_s: float = DEFAULT_FLUSH_INTERVAL_S
                  ) -> None:
        """Flush closed windows every ``interval_s`` until ``stop``; then flush everything."""
        self.running = True
        try:
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
                    log.exception("could not write aggregated audit counts; retrying at the "
                                  "next flush", extra={"fields": {"pending_calls": self.pending}})
            await self.final_flush()
        finally:
            self.running = False

    async def final_flush(self) -> None:
        if self.before_final_flush is not None:
            await self.before_final_flush()
        try:
            await self.flush(everything=True)
        except Exception:
            log.exception("could not write aggregated audit counts at shutdown; they are "
                          "lost", extra={"fields": {"pending_calls": self.pending}})


def _count(bucket: _Bucket, peer: str) -> None:
    bucket.count += 1
    if len(bucket.peers) < MAX_PEERS and peer not in bucket.peers:
        bucket.peers.append(peer)


def _aggregate_entry(key: _BucketKey, bucket: _Bucket) -> AuditEntry:
    kind, principal, method, rpc, resource, target, status, message, peer, start, reported = key
    return AuditEntry(kind=kind, principal=principal, auth_method=method, rpc=rpc,
                      resource=resource, target=target, status=status, status_message=message,
                      request=REPORTED_REQUEST if reported else {}, peer=peer,
                      count=min(bucket.count, MAX_COUNT), window_start_us=start,
                      window_end_us=start + _WINDOW_US, peers=tuple(bucket.peers))


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
    "FLUSH_BATCH",
    "GENESIS_KEY",
    "HEAD_KEY",
    "SCHEDULER_PRINCIPAL",
    "AuditEntry",
    "AuditLog",
    "AuditRecord",
    "AuditedChanges",
    "DataAccessAggregator",
    "DataAccessMode",
    "Genesis",
    "Head",
    "Query",
    "RecordKind",
    "VerifyReport",
    "canonical_bytes",
    "compute_hash",
    "entry_for_call",
    "entry_for_change",
    "is_reported",
    "query",
    "record_key",
    "record_to_json",
    "records_range",
]
