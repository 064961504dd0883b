"""Audit records and counts are written exactly once, whatever happens to the caller.

- records written when a call ends (``full`` data access, denials, failed
  changes) survive the caller's task being cancelled (a client that resets
  its stream after the response);
- a flush of counts that fails part way, or is cancelled while a transaction
  is in flight, neither loses nor double-counts a call;
- refusals of unauthenticated callers are counted, not written one by one.

In process, on a real SQLite file (tests/test_audit.py's ``audited``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from tests.test_audit import KEY, PEER, Env, _key_with_two_versions, audited
from valv.core import audit
from valv.core.audit import DataAccessAggregator, DataAccessMode, RecordKind, record_to_json
from valv.core.calls import DEV_PRINCIPAL, UNAUTHENTICATED_PRINCIPAL, CallContext, Principal
from valv.core.keystore import NewCryptoKey
from valv.core.storage.base import StorageError, Transaction

T = TypeVar("T")

VERSION_1 = f"{KEY}/cryptoKeyVersions/1"
DEADLINE_S = 30.0


async def until(condition: Callable[[], Awaitable[bool]], what: str,
                deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` until it holds, or fail after the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not await condition():
        if loop.time() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(0.01)


async def head_seq(env: Env) -> int:
    head = await env.log.head()
    return head.seq if head is not None else 0


def call_context(rpc: str, request_id: str, *, principal: Principal = DEV_PRINCIPAL,
                 peer: str = PEER, resource: str = KEY) -> CallContext:
    ctx = CallContext(rpc=rpc, principal=principal, peer=peer, request_id=request_id,
                      resource=resource)
    ctx.summary = {"name": resource}
    return ctx


# ---- records of calls whose caller is cancelled --------------------------------------


CANCELLED_CASES = {
    # what finished() writes: (mode, rpc, error)
    "full-mode data access": (DataAccessMode.FULL, "Decrypt", None),
    "a denial": (DataAccessMode.OFF, "Encrypt",
                 GRPCError(Status.PERMISSION_DENIED, "user:dev lacks useToEncrypt")),
    "a failed change": (DataAccessMode.OFF, "DestroyCryptoKeyVersion",
                        GRPCError(Status.FAILED_PRECONDITION, "already destroyed")),
}


@pytest.mark.parametrize("case", sorted(CANCELLED_CASES))
async def test_every_record_lands_when_the_callers_are_cancelled(tmp_path: Path,
                                                                 case: str) -> None:
    """grpclib cancels a call's task when the client resets the stream, which can
    happen after the response was sent, while ``finished`` writes the record."""
    mode, rpc, error = CANCELLED_CASES[case]
    k = 300
    async with audited(tmp_path, mode) as env:
        await _key_with_two_versions(env)
        before = await head_seq(env)
        calls = [call_context(rpc, f"req-{i:03}") for i in range(k)]
        for ctx in calls:
            ctx.used_version = VERSION_1
        tasks = [asyncio.create_task(env.auditor.finished(ctx, error)) for ctx in calls]
        await asyncio.sleep(0)  # each task runs to its first await: its write is under way
        for task in tasks:
            task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = sum(isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert all(o is None or isinstance(o, asyncio.CancelledError) for o in outcomes)
        assert cancelled > k // 2  # the callers really were cancelled mid-write

        async def all_written() -> bool:
            return await head_seq(env) >= before + k

        await until(all_written, f"{k} records")
        await env.auditor.drain()
        records = (await env.records())[before:]
        assert sorted(r.request_id for r in records) == [ctx.request_id for ctx in calls]
        status = "OK" if error is None else error.status.name
        assert {(r.rpc, r.status) for r in records} == {(rpc, status)}
        assert env.auditor.write_failures == 0
        assert (await env.log.verify()).ok


async def test_a_write_that_fails_after_its_caller_was_cancelled_is_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    async with audited(tmp_path, DataAccessMode.FULL) as env:
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_failure(entries: list[audit.AuditEntry], **kwargs: Any) -> Any:
            entered.set()
            await release.wait()
            raise StorageError("injected: disk full")

        monkeypatch.setattr(env.log, "write", slow_failure)
        caller = asyncio.create_task(env.auditor.finished(call_context("Encrypt", "r-1"), None))
        await asyncio.wait_for(entered.wait(), DEADLINE_S)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert env.auditor.write_failures == 0  # still being written
        with caplog.at_level(logging.ERROR, logger="valv.audit"):
            release.set()
            await asyncio.wait_for(env.auditor.drain(), DEADLINE_S)
        assert env.auditor.write_failures == 1
        (logged,) = [r for r in caplog.records if "could not write an audit record" in
                     r.getMessage()]
        assert logged.fields["request_id"] == "r-1"  # type: ignore[attr-defined]


# ---- flushes of counts ---------------------------------------------------------------


def count_calls(env: Env, n: int) -> None:
    """``n`` Encrypts by ``n`` different principals: ``n`` counters, one record each."""
    for i in range(n):
        ctx = call_context("Encrypt", f"e-{i}", principal=Principal(f"user:u{i:03}", "token"))
        env.auditor.aggregator.add(ctx, status="OK", target=VERSION_1)


async def counted(env: Env) -> dict[str, int]:
    """The count written per principal (any principal written twice shows as more)."""
    totals: dict[str, int] = {}
    for record in await env.records():
        if record.kind == RecordKind.DATA_ACCESS_AGGREGATE:
            totals[record.principal] = totals.get(record.principal, 0) + record.count
    return totals


def fail_write_transactions(env: Env, *numbers: int) -> list[int]:
    """Make the write transactions ``numbers`` (1 = the next) fail before they commit."""
    real_run = env.counter.run
    seen: list[int] = []

    async def run(body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        if not read_only:
            seen.append(len(seen) + 1)
            if seen[-1] in numbers:
                raise StorageError(f"injected: write transaction {seen[-1]} failed")
        return await real_run(body, read_only=read_only)

    env.counter.run = run  # type: ignore[method-assign]
    return seen


async def test_a_flush_that_fails_part_way_writes_every_count_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "FLUSH_BATCH", 100)
    n = 150
    async with audited(tmp_path) as env:
        count_calls(env, n)
        seen = fail_write_transactions(env, 2)
        with pytest.raises(StorageError, match="transaction 2 failed"):
            await env.auditor.aggregator.flush(everything=True)
        assert seen == [1, 2]
        assert len(await counted(env)) == 100  # the first batch committed...
        assert env.auditor.aggregator.pending == n - 100  # ...and only the rest is kept
        assert await env.auditor.aggregator.flush(everything=True) == n - 100
        assert await counted(env) == {f"user:u{i:03}": 1 for i in range(n)}
        assert env.auditor.aggregator.pending == 0
        assert (await env.log.verify()).ok


async def test_a_flush_is_one_transaction_per_batch(tmp_path: Path) -> None:
    n = audit.FLUSH_BATCH + 10
    async with audited(tmp_path) as env:
        count_calls(env, n)
        writes = env.counter.writes
        assert await env.auditor.aggregator.flush(everything=True) == n
        assert env.counter.writes - writes == 2
        assert sum((await counted(env)).values()) == n


@pytest.mark.parametrize("outcome", ["commits", "fails"])
async def test_a_flush_cancelled_mid_transaction_neither_loses_nor_doubles(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: str) -> None:
    """The flush is cancelled while its first transaction runs in a storage worker:
    that transaction still commits (or fails), and the counts follow what it did."""
    monkeypatch.setattr(audit, "FLUSH_BATCH", 100)
    n = 150
    async with audited(tmp_path) as env:
        count_calls(env, n)
        entered, release = threading.Event(), threading.Event()
        real_run = env.counter.run
        gated = [True]

        async def run(body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
            if read_only or not gated[0]:
                return await real_run(body, read_only=read_only)
            gated[0] = False

            def held(tr: Transaction) -> T:
                entered.set()
                release.wait(DEADLINE_S)
                result = body(tr)
                if outcome == "fails":
                    raise StorageError("injected: the commit failed")
                return result

            return await real_run(held)

        env.counter.run = run  # type: ignore[method-assign]
        flush = asyncio.create_task(env.auditor.aggregator.flush(everything=True))
        assert await asyncio.to_thread(entered.wait, DEADLINE_S)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert env.auditor.aggregator.pending == n  # nothing known to be written yet
        release.set()
        # The next flush first waits for the one left in flight, then writes the rest.
        await asyncio.wait_for(env.auditor.aggregator.flush(everything=True), DEADLINE_S)
        assert await counted(env) == {f"user:u{i:03}": 1 for i in range(n)}
        assert env.auditor.aggregator.pending == 0
        assert (await env.log.verify()).ok


async def test_counts_of_a_cancelled_flush_are_written_at_shutdown(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        await _key_with_two_versions(env)
        for _ in range(3):
            await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        flush = asyncio.create_task(env.auditor.aggregator.flush(everything=True))
        await asyncio.sleep(0)
        flush.cancel()
        await asyncio.gather(flush, return_exceptions=True)
        stop = asyncio.Event()
        stop.set()
        await env.auditor.aggregator.run(stop)  # what central runs; stopped: the final flush
        assert sum((await counted(env)).values()) == 3


# ---- unauthenticated callers ---------------------------------------------------------


async def refuse(env: Env, n: int, *, hosts: int = 3) -> dict[tuple[str, str, str], int]:
    """``n`` calls refused to unauthenticated callers; the expected count per
    (host, rpc, reason)."""
    expected: dict[tuple[str, str, str], int] = {}
    reasons = ["no credentials: send authorization: Bearer <token>", "unknown token"]
    for i in range(n):
        host, rpc = f"10.0.0.{i % hosts}", ("Encrypt", "CreateKeyRing")[i % 2]
        reason = reasons[i % 5 == 0]
        ctx = CallContext(rpc=rpc, principal=UNAUTHENTICATED_PRINCIPAL,
                          peer=f"{host}:{40000 + i}", request_id=f"u-{i}")
        expected[(host, rpc, reason)] = expected.get((host, rpc, reason), 0) + 1
        await env.auditor.finished(ctx, GRPCError(Status.UNAUTHENTICATED, reason))
    return expected


def denied_counts(records: list[audit.AuditRecord]) -> dict[tuple[str, str, str], int]:
    return {(r.peer, r.rpc, r.status_message): r.count for r in records
            if r.kind == RecordKind.DENIED and r.count}


async def test_unauthenticated_refusals_are_counted_not_written_one_by_one(
        tmp_path: Path) -> None:
    k = 2_000
    async with audited(tmp_path) as env:
        writes, before = env.counter.writes, await head_seq(env)
        expected = await refuse(env, k)
        assert env.counter.writes == writes  # no storage I/O on the refusal path
        assert env.auditor.aggregator.pending == k
        assert await env.auditor.aggregator.flush(everything=True) == len(expected)
        assert env.counter.writes == writes + 1  # one transaction for all of them
        records = (await env.records())[before:]
        assert denied_counts(records) == expected
        assert sum(r.count for r in records) == k
        got = record_to_json(records[0])
        assert (got["kind"], got["principal"], got["auth_method"], got["status"]) == (
            "DENIED", "", "none", "UNAUTHENTICATED")
        assert got["peer"].startswith("10.0.0.") and len(got["peers"]) == audit.MAX_PEERS
        assert all(p.startswith(got["peer"] + ":") for p in got["peers"])
        assert "request_id" not in got and "request" not in got
        # A refusal counted is a DENIED record for the query tools.
        q = audit.Query(result="DENIED")
        assert sum(r.count for r in records if q.matches(r)) == k


async def test_refusals_from_too_many_callers_share_one_counter(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        aggregator = DataAccessAggregator(env.log, env.clock, max_refusals=5)
        for i in range(20):
            ctx = CallContext(rpc="Encrypt", principal=UNAUTHENTICATED_PRINCIPAL,
                              peer=f"192.0.2.{i}:1000", request_id=f"u-{i}")
            aggregator.add_refusal(ctx, status="UNAUTHENTICATED", reason=f"bad token #{i}")
        assert aggregator.pending == 20
        assert await aggregator.flush() == 6  # over the limit: written at once, window open
        records = await env.records()
        assert {r.status_message: r.count for r in records} == {
            **{f"bad token #{i}": 1 for i in range(5)}, audit.OVERFLOW_REASON: 15}
        (overflow,) = [r for r in records if r.status_message == audit.OVERFLOW_REASON]
        assert (overflow.peer, overflow.rpc, len(overflow.peers)) == ("", "", audit.MAX_PEERS)


async def test_a_refusal_reason_is_cut_to_a_bounded_size(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ctx = CallContext(rpc="Encrypt", principal=UNAUTHENTICATED_PRINCIPAL, peer="unix",
                          request_id="u")
        env.auditor.aggregator.add_refusal(ctx, status="UNAUTHENTICATED", reason="x" * 100_000)
        await env.auditor.aggregator.flush(everything=True)
        (record,) = await env.records()
        assert len(record.status_message) == audit.MAX_REASON_BYTES


@pytest.mark.parametrize("mode", [DataAccessMode.FULL, DataAccessMode.OFF])
async def test_refusals_are_flushed_in_modes_without_a_data_access_flusher(
        tmp_path: Path, mode: DataAccessMode) -> None:
    """Central runs the aggregator's flusher only in ``aggregate`` mode: in the
    others, the auditor starts one at the first refusal."""
    async with audited(tmp_path, mode, flush_interval_s=0.01) as env:
        before = await head_seq(env)
        expected = await refuse(env, 100)
        env.clock.advance(timedelta(minutes=1))  # the window closes: the next flush takes it

        async def flushed() -> bool:
            return env.auditor.aggregator.pending == 0 and await head_seq(env) > before

        await until(flushed, "the refusals to be flushed")
        assert denied_counts((await env.records())[before:]) == expected


async def test_permission_denied_and_authenticated_refusals_keep_their_own_records(
        tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        alice = Principal("user:alice", "token")
        await env.auditor.finished(call_context("Encrypt", "d-1", principal=alice),
                                   GRPCError(Status.PERMISSION_DENIED, "no"))
        # Authenticated, then refused as unauthenticated (e.g. a token that expired
        # mid-call): who it was is known, so it is a record of its own.
        await env.auditor.finished(call_context("Encrypt", "d-2", principal=alice),
                                   GRPCError(Status.UNAUTHENTICATED, "token expired"))
        assert env.auditor.aggregator.pending == 0
        assert [(r.request_id, r.status, r.count) for r in await env.records()] == [
            ("d-1", "PERMISSION_DENIED", 0), ("d-2", "UNAUTHENTICATED", 0)]


async def test_shutdown_writes_records_still_in_flight_and_counted_refusals(
        tmp_path: Path) -> None:
    async with audited(tmp_path, DataAccessMode.FULL) as env:
        await env.ks.create_key_ring("projects/p/locations/global", "r")
        await env.ks.create_crypto_key("projects/p/locations/global/keyRings/r", "k",
                                       NewCryptoKey(purpose=1))
        before = await head_seq(env)
        task = asyncio.create_task(env.auditor.finished(call_context("Encrypt", "f-1"), None))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await refuse(env, 10)
        await env.auditor.close()  # what central's shutdown does before closing the store
        records = (await env.records())[before:]
        assert [r.request_id for r in records if r.kind == RecordKind.DATA_ACCESS] == ["f-1"]
        assert sum(denied_counts(records).values()) == 10
