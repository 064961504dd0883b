"""Background work: automatic rotation and the destruction sweep.

Every tick finds what is due through the due-time index (so a tick costs
O(due items), not O(keys)) and applies each item with
``KeyStore.apply_due``, which claims and applies it in one transaction. Any
number of central processes may run a scheduler against one store: each due
event still happens exactly once, and a crash mid-way leaves the store as it
was before the item (the transaction never committed) or after it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from valv.core import records
from valv.core.keystore import DueOutcome, KeyStore
from valv.core.storage.keys import describe

log = logging.getLogger("valv.scheduler")

DEFAULT_INTERVAL_S = 10.0
_BATCH = 100
# A tick stops after this many items so one tick can't run unboundedly long;
# the rest is picked up by the next tick.
_MAX_ITEMS_PER_TICK = 10_000


@dataclass(slots=True)
class TickReport:
    rotated: list[DueOutcome] = field(default_factory=list)
    destroyed: list[DueOutcome] = field(default_factory=list)
    # Entries another scheduler applied first, stale entries repaired, failures.
    skipped: int = 0
    failed: int = 0


class Scheduler:
    def __init__(self, keystore: KeyStore, *, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError("the scheduler interval must be positive")
        self._keystore = keystore
        self.interval_s = interval_s
        # Erase freed space at the first tick: a process that destroyed key
        # material and crashed before its erase left the old bytes behind.
        # Stays set after a failed erase, so the next tick tries again.
        self._erase_pending = True

    async def tick(self, stop: asyncio.Event | None = None) -> TickReport:
        """Apply everything that is due now (or until ``stop`` is set)."""
        report = TickReport()
        for kind in (records.ROTATE, records.DESTROY):
            await self._drain(kind, report, stop)
        if report.destroyed:
            self._erase_pending = True
        if self._erase_pending:
            try:
                await self._keystore.erase_freed_space()
                self._erase_pending = False
            except Exception:
                log.exception("could not erase freed storage space after destruction; "
                              "retrying at the next tick")
        return report

    async def _drain(self, kind: str, report: TickReport, stop: asyncio.Event | None) -> None:
        # Each entry is tried at most once per tick: a failing item (e.g. a
        # tampered record) or one that is not due after all (the clock stepped
        # back) waits for the next tick instead of spinning this one.
        seen: set[bytes] = set()
        while len(seen) < _MAX_ITEMS_PER_TICK:
            batch = await self._keystore.due_entries(kind, _BATCH + len(seen))
            entries = [entry for entry in batch if entry not in seen]
            if not entries:
                return
            for entry in entries:
                if stop is not None and stop.is_set():
                    return
                seen.add(entry)
                try:
                    outcome = await self._keystore.apply_due(entry)
                except Exception as exc:
                    report.failed += 1
                    log.error("scheduled %s failed", kind, extra={"fields": {
                        "entry": describe(entry), "error": str(exc)}})
                    continue
                self._record(kind, outcome, report)

    @staticmethod
    def _record(kind: str, outcome: DueOutcome, report: TickReport) -> None:
        if outcome.version is None:
            report.skipped += 1
            log.debug("scheduled %s skipped", kind, extra={"fields": {
                "resource": str(outcome.name), "detail": outcome.detail}})
            return
        if kind == records.ROTATE:
            report.rotated.append(outcome)
            log.info("rotated CryptoKey", extra={"fields": {
                "crypto_key": str(outcome.name),
                "new_primary": str(outcome.version.name),
                "next_rotation_time": outcome.next_rotation_time.isoformat()
                if outcome.next_rotation_time else None}})
        else:
            report.destroyed.append(outcome)
            log.info("destroyed CryptoKeyVersion", extra={"fields": {
                "crypto_key_version": str(outcome.name),
                "destroy_event_time": outcome.version.destroy_event_time.isoformat()
                if outcome.version.destroy_event_time else None}})

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.tick(stop)
            except Exception:
                log.exception("scheduler tick failed; retrying at the next tick")
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
            except TimeoutError:
                pass
