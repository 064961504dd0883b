"""Central's Auditor: what each call adds to the audit log (valv.core.audit).

- State-changing calls: the record is written by ``change_hook`` inside the
  change's own transaction (KeyStore.change_hook), so the change and its
  record commit together or not at all. A state-changing call that fails gets
  a record of the failure in its own transaction, from ``finished``.
- Calls refused to an authenticated principal (PERMISSION_DENIED, or
  UNAUTHENTICATED raised after authentication), whatever the RPC: a record in
  its own transaction, from ``finished``.
- Calls refused because the caller could not be authenticated: counted in
  memory per caller host x RPC x reason x minute (DataAccessAggregator.add_refusal)
  and written in batches, so anyone who can reach the port can't make central
  write (and fsync) a record per call.
- Data access (Encrypt, Decrypt, GenerateRandomBytes...), by mode: ``off``
  records nothing; ``aggregate`` counts in memory per principal x key
  version x minute (DataAccessAggregator, flushed in batches); ``full`` writes
  one record per call in its own transaction.
- Reads (Get*, List*, TestIamPermissions) are not recorded unless denied,
  nor are a sidecar's Watch streams (a subscription, not a change) and its
  ReportUsage calls (what they report becomes DATA_ACCESS_AGGREGATE records
  of its own, ``record_reported``; valv.central.usage).

``finished`` runs after the call's response was sent, so the caller may be
gone (a reset stream cancels the task): a record it writes is written by a
task of its own, which the caller's cancellation does not stop. It never
raises an error of its own: a record that can't be written is logged as an
error (the call's outcome is already decided by then).

Created in a running event loop (central's start, before it listens), the
auditor checks the log at once (``AuditLog.open``): a store whose log was
deleted refuses every audited change from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from grpclib import GRPCError

from valv.core.audit import (
    DEFAULT_FLUSH_INTERVAL_S,
    DENIED_STATUSES,
    AuditedChanges,
    AuditEntry,
    AuditLog,
    DataAccessAggregator,
    DataAccessMode,
    RecordKind,
    entry_for_call,
    entry_for_change,
)
from valv.core.calls import UNAUTHENTICATED_PRINCIPAL, CallContext
from valv.core.clock import Clock
from valv.core.storage.base import Transaction

if TYPE_CHECKING:
    from valv.central.usage import ReportedUse

log = logging.getLogger("valv.audit")

# Calls that use key material or the RNG: audited by the data-access mode.
DATA_ACCESS_RPCS = frozenset({
    "Encrypt", "Decrypt", "GenerateRandomBytes", "AsymmetricSign", "AsymmetricDecrypt",
    "MacSign", "MacVerify", "RawEncrypt", "RawDecrypt", "Decapsulate",
    "FetchVersion",  # valv.sidecar.v1.KeyMaterial: a sidecar fetching material to use
})
# Calls not recorded themselves unless denied: reads that change nothing, and
# valv.sidecar.v1 Watch (a subscription) and ReportUsage (its counts become
# records, ``record_reported``). Every other RPC is treated as state-changing,
# so a new RPC is audited until someone says otherwise.
READ_ONLY_RPCS = frozenset({"TestIamPermissions", "Watch", "ReportUsage"})
READ_ONLY_PREFIXES = ("Get", "List")


def is_data_access(rpc: str) -> bool:
    return rpc in DATA_ACCESS_RPCS


def is_read_only(rpc: str) -> bool:
    return rpc in READ_ONLY_RPCS or (rpc.startswith(READ_ONLY_PREFIXES)
                                     and not is_data_access(rpc))


class CentralAuditor:
    """The call guard's Auditor, and the KeyStore's change hook.

    Counted refusals are flushed by ``aggregator.run`` (central runs it in
    ``aggregate`` mode); in the other modes the auditor starts its own flusher
    at the first refusal. ``close`` stops it and waits for every record still
    being written (call it before closing the store).
    """

    def __init__(self, audit_log: AuditLog, clock: Clock, *,
                 data_access: DataAccessMode = DataAccessMode.AGGREGATE,
                 flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
                 open_log: bool = True) -> None:
        self.log = audit_log
        self.data_access = data_access
        self.flush_interval_s = flush_interval_s
        self.aggregator = DataAccessAggregator(audit_log, clock)
        self.aggregator.before_final_flush = self.drain
        self._hooked = AuditedChanges()
        # Records ``finished`` could not write (also logged): for health checks and tests.
        self.write_failures = 0
        # Writes in flight: referenced here so that a task whose caller was
        # cancelled is neither collected nor forgotten at shutdown.
        self._writes: set[asyncio.Task[None]] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._flusher_stop = asyncio.Event()
        self._opening: asyncio.Task[None] | None = None
        if open_log:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None  # opened by the first append instead
            if loop is not None:
                self._opening = loop.create_task(self.open())

    async def open(self) -> None:
        """Check the log (and create it in an empty store); never raises.

        A deleted log makes every later append fail with DATA_LOSS (see
        AuditLog.open); the reason is logged here.
        """
        try:
            await self.log.open()
        except Exception:
            log.exception("the audit log failed its startup check; audited changes are "
                          "refused until it is restored")

    async def wait_open(self) -> None:
        """Wait for the check started at construction (if any)."""
        if self._opening is not None:
            await asyncio.shield(self._opening)

    def change_hook(self, tr: Transaction, call: CallContext | None,
                    outcome: object = None) -> None:
        """Inside a change's transaction: append its admin-activity record there."""
        entry = entry_for_change(call, outcome)
        if entry is None:
            return
        self.log.append(tr, [entry])
        if call is not None:
            self._hooked.mark(call.request_id)

    async def finished(self, call: CallContext | None, error: GRPCError | None) -> None:
        if call is None:  # the guard always passes one; nothing to say who or what
            return
        hooked = self._hooked.pop(call.request_id)
        status = "OK" if error is None else error.status.name
        message = "" if error is None else (error.message or "")
        entry: AuditEntry | None = None
        if status == "UNAUTHENTICATED" and call.principal == UNAUTHENTICATED_PRINCIPAL:
            # Anyone who can reach the port gets here: counted, not a write per call.
            self.aggregator.add_refusal(call, status=status, reason=message)
            self._ensure_flusher()
        elif status in DENIED_STATUSES:
            entry = entry_for_call(call, RecordKind.DENIED, status=status,
                                   status_message=message)
        elif is_data_access(call.rpc):
            if self.data_access is DataAccessMode.AGGREGATE:
                self.aggregator.add(call, status=status, target=call.used_version)
            elif self.data_access is DataAccessMode.FULL:
                entry = entry_for_call(call, RecordKind.DATA_ACCESS, status=status,
                                       status_message=message, target=call.used_version)
        elif is_read_only(call.rpc):
            pass
        elif error is not None:
            # A failed change: nothing committed (or, if the failure came after
            # the commit, the change's own record is there too).
            entry = entry_for_call(call, RecordKind.ADMIN_ACTIVITY, status=status,
                                   status_message=message)
        elif not hooked:
            # A change made without the keystore's hook (a path that bypasses
            # KeyStore._change): still recorded, though not atomically with it.
            log.warning("state-changing call without an in-transaction audit record; "
                        "recording it afterwards", extra={"fields": {
                            "rpc": call.rpc, "request_id": call.request_id}})
            entry = entry_for_call(call, RecordKind.ADMIN_ACTIVITY)
        if entry is None:
            return
        fields = {"rpc": call.rpc, "principal": call.principal.member, "status": status,
                  "request_id": call.request_id}
        # The response is already sent: if the client resets the stream now,
        # grpclib cancels this task. The write runs in a task of its own, so a
        # cancellation here stops the waiting, not the write.
        task = asyncio.ensure_future(self._write(entry, fields))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        try:
            await asyncio.shield(task)
        except BaseException:
            # Cancelled: the caller stops waiting, the write goes on (``_write``
            # reports its outcome; ``drain`` waits for it). The cancellation is
            # the caller's and goes on too.
            if not task.done():
                log.debug("call cancelled while its audit record is being written; the "
                          "write goes on", extra={"fields": fields})
            raise

    def record_reported(self, call: CallContext, uses: Iterable[ReportedUse]) -> int:
        """Usage a sidecar reported (ReportUsage, checked by valv.central.usage): counted
        into the data-access aggregates under the caller's name, marked as reported.
        Nothing with data access ``off``. How many entries were counted."""
        if self.data_access is DataAccessMode.OFF:
            return 0
        counted = 0
        for use in uses:
            self.aggregator.add_reported(call, rpc=use.rpc, resource=use.resource,
                                         target=use.target, status=use.status,
                                         window_start_us=use.window_start_us, count=use.count)
            counted += 1
        self._ensure_flusher()
        return counted

    async def _write(self, entry: AuditEntry, fields: dict[str, Any]) -> None:
        """Write one record; never raises an Exception (failures are logged and counted)."""
        try:
            await self.log.write([entry])
        except BaseException as exc:
            self.write_failures += 1
            log.error("could not write an audit record", exc_info=exc,
                      extra={"fields": fields})
            if not isinstance(exc, Exception):
                raise  # this task itself was cancelled (the loop is closing)

    def _ensure_flusher(self) -> None:
        """Have someone flush the counted refusals (central runs the aggregator's
        flusher itself only in ``aggregate`` mode)."""
        if self.data_access is DataAccessMode.AGGREGATE or self.aggregator.running:
            return
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(
                self.aggregator.run(self._flusher_stop, self.flush_interval_s))

    async def drain(self) -> None:
        """Wait until every record ``finished`` started writing is written (or failed)."""
        while self._writes:
            await asyncio.wait(set(self._writes))

    async def close(self) -> None:
        """Write what is pending (records being written, counts) and stop the own flusher.

        Never raises; call it before closing the store.
        """
        if self._opening is not None:
            await asyncio.wait({self._opening})
        if self._flusher is not None:
            self._flusher_stop.set()
            await asyncio.wait({self._flusher})  # its final flush logs its own failures
            self._flusher = None
        await self.drain()
        await self.aggregator.final_flush()
