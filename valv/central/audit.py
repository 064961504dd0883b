"""Central's Auditor: what each call adds to the audit log (valv.core.audit).

- State-changing calls: the record is written by ``change_hook`` inside the
  change's own transaction (KeyStore.change_hook), so the change and its
  record commit together or not at all. A state-changing call that fails gets
  a record of the failure in its own transaction, from ``finished``.
- Denied calls (UNAUTHENTICATED, PERMISSION_DENIED), whatever the RPC: a
  record in its own transaction, from ``finished``.
- Data access (Encrypt, Decrypt, GenerateRandomBytes...), by mode: ``off``
  records nothing; ``aggregate`` counts in memory per principal x key
  version x minute (DataAccessAggregator, flushed in batches); ``full`` writes
  one record per call in its own transaction.
- Reads (Get*, List*, TestIamPermissions) are not recorded unless denied.

``finished`` never raises: a record that can't be written there is logged as
an error (the call's outcome is already decided by then).
"""

from __future__ import annotations

import logging

from grpclib import GRPCError

from valv.core.audit import (
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
from valv.core.calls import CallContext
from valv.core.clock import Clock
from valv.core.storage.base import Transaction

log = logging.getLogger("valv.audit")

# Calls that use key material or the RNG: audited by the data-access mode.
DATA_ACCESS_RPCS = frozenset({
    "Encrypt", "Decrypt", "GenerateRandomBytes", "AsymmetricSign", "AsymmetricDecrypt",
    "MacSign", "MacVerify", "RawEncrypt", "RawDecrypt", "Decapsulate",
})
# Reads that change nothing; every other RPC is treated as state-changing, so a
# new RPC is audited until someone says otherwise.
READ_ONLY_RPCS = frozenset({"TestIamPermissions"})
READ_ONLY_PREFIXES = ("Get", "List")


def is_data_access(rpc: str) -> bool:
    return rpc in DATA_ACCESS_RPCS


def is_read_only(rpc: str) -> bool:
    return rpc in READ_ONLY_RPCS or (rpc.startswith(READ_ONLY_PREFIXES)
                                     and not is_data_access(rpc))


class CentralAuditor:
    """The call guard's Auditor, and the KeyStore's change hook."""

    def __init__(self, audit_log: AuditLog, clock: Clock, *,
                 data_access: DataAccessMode = DataAccessMode.AGGREGATE) -> None:
        self.log = audit_log
        self.data_access = data_access
        self.aggregator = DataAccessAggregator(audit_log, clock)
        self._hooked = AuditedChanges()
        # Records ``finished`` could not write (also logged): for health checks and tests.
        self.write_failures = 0

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
        if status in DENIED_STATUSES:
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
        try:
            await self.log.write([entry])
        except Exception:
            self.write_failures += 1
            log.exception("could not write an audit record", extra={"fields": {
                "rpc": call.rpc, "principal": call.principal.member, "status": status,
                "request_id": call.request_id}})
