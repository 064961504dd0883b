"""The audit log, in process: completeness, atomicity, data-access modes, tamper evidence.

Calls go through ``call()``, which does what the call guard does around a
handler (set the CallContext, map the error, tell the Auditor), on a real
SQLite file with a FakeClock. tests/test_audit_processes.py does the same
through real central processes and Google's client.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from valv._proto.valv.audit import v1 as audit_pb
from valv.central.audit import CentralAuditor
from valv.central.errors import to_grpc_error
from valv.core import audit
from valv.core.audit import (
    HEAD_KEY,
    AuditLog,
    DataAccessMode,
    Query,
    RecordKind,
    record_key,
    record_to_json,
)
from valv.core.calls import (
    DEV_PRINCIPAL,
    UNAUTHENTICATED_PRINCIPAL,
    CallContext,
    Principal,
    current_call,
)
from valv.core.clock import FakeClock
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.errors import DataLoss, NotFound
from valv.core.keystore import CryptoKeyUpdate, KeyStore, KeystoreSettings, NewCryptoKey
from valv.core.model import VersionState
from valv.core.scheduler import Scheduler
from valv.core.storage.base import MAX_VALUE_BYTES, StorageError, Store, Transaction
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

T = TypeVar("T")

LOCATION = "projects/p/locations/global"
RING = f"{LOCATION}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
PEER = "10.1.2.3:4567"


class CountingStore(Store):
    """Counts the transactions that reach the real store."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.writes = 0
        self.reads = 0

    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        if read_only:
            self.reads += 1
        else:
            self.writes += 1
        return await self.inner.run(body, read_only=read_only)

    async def close(self) -> None:
        await self.inner.close()

    @property
    def url(self) -> str:
        return self.inner.url


@dataclass
class Env:
    ks: KeyStore
    store: SealedStore
    counter: CountingStore
    raw: SqliteStore
    auditor: CentralAuditor
    clock: FakeClock

    @property
    def log(self) -> AuditLog:
        return self.auditor.log

    async def call(self, rpc: str, op: Callable[[], Awaitable[Any]], *, resource: str = "",
                   summary: dict[str, Any] | None = None,
                   principal: Principal = DEV_PRINCIPAL) -> str:
        """Run ``op`` as the call guard runs a handler; the status name it ended with."""
        ctx = CallContext(rpc=rpc, principal=principal, peer=PEER, request_id=uuid.uuid4().hex,
                          resource=resource)
        ctx.summary = summary or {"name": resource}
        token = current_call.set(ctx)
        error: GRPCError | None = None
        try:
            await op()
        except Exception as exc:
            error = to_grpc_error(exc, rpc)
        finally:
            current_call.reset(token)
        await self.auditor.finished(ctx, error)
        return "OK" if error is None else error.status.name

    async def records(self) -> list[audit.AuditRecord]:
        return [r async for r in self.log.records()]


@asynccontextmanager
async def audited(tmp_path: Path, mode: DataAccessMode = DataAccessMode.AGGREGATE,
                  cache_ttl: timedelta = timedelta(0), *, flush_interval_s: float = 3600,
                  clock: FakeClock | None = None) -> AsyncIterator[Env]:
    """A keystore audited like central's, on ``tmp_path/valv.db`` (opened as central
    opens it: the log is checked, or created, before the first call)."""
    ring = RootKeyring([RootKey(b"\x01" * 32)])
    raw = SqliteStore(str(tmp_path / "valv.db"))
    counter = CountingStore(raw)
    store = SealedStore(counter, Sealer(ring))
    clock = clock or FakeClock()
    ks = KeyStore(store, ring, clock, KeystoreSettings(use_cache_ttl=cache_ttl))
    auditor = CentralAuditor(AuditLog(store, clock), clock, data_access=mode,
                             flush_interval_s=flush_interval_s)
    await auditor.wait_open()
    ks.change_hook = auditor.change_hook
    try:
        yield Env(ks, store, counter, raw, auditor, clock)
    finally:
        try:
            await auditor.close()
        finally:
            await store.close()


def brief(record: audit.AuditRecord) -> tuple[str, str, str, str]:
    return record.principal, record.rpc, record.resource, record.status


# ---- admin activity ------------------------------------------------------------------


async def test_random_operations_produce_exactly_the_expected_records(tmp_path: Path) -> None:
    rng = random.Random(4)
    async with audited(tmp_path) as env:
        ks = env.ks
        expected: list[tuple[str, str, str, str]] = []
        keys: list[str] = []
        versions: dict[str, int] = {}
        encrypts: dict[tuple[str, str], int] = {}

        async def change(rpc: str, resource: str, op: Callable[[], Awaitable[Any]]) -> str:
            status = await env.call(rpc, op, resource=resource)
            expected.append(("user:dev", rpc, resource, status))
            return status

        await change("CreateKeyRing", LOCATION, lambda: ks.create_key_ring(LOCATION, "r"))
        for _ in range(80):
            choice = rng.randrange(10)
            if choice == 0 or not keys:
                key_id = f"k{rng.randrange(4)}"
                if await change("CreateCryptoKey", RING, lambda k=key_id: ks.create_crypto_key(
                        RING, k, NewCryptoKey(purpose=1))) == "OK":
                    keys.append(f"{RING}/cryptoKeys/{key_id}")
                    versions[keys[-1]] = 1
                continue
            key = rng.choice(keys)
            version = f"{key}/cryptoKeyVersions/{rng.randint(1, versions[key] + 1)}"
            if choice == 1:
                if await change("CreateCryptoKeyVersion", key,
                                lambda k=key: ks.create_crypto_key_version(k)) == "OK":
                    versions[key] += 1
            elif choice == 2:
                state = rng.choice([VersionState.ENABLED, VersionState.DISABLED])
                await change("UpdateCryptoKeyVersion", version,
                             lambda v=version, s=state: ks.update_crypto_key_version(
                                 v, ["state"], int(s)))
            elif choice == 3:
                await change("DestroyCryptoKeyVersion", version,
                             lambda v=version: ks.destroy_crypto_key_version(v))
            elif choice == 4:
                await change("RestoreCryptoKeyVersion", version,
                             lambda v=version: ks.restore_crypto_key_version(v))
            elif choice == 5:
                vid = version.rsplit("/", 1)[1]
                await change("UpdateCryptoKeyPrimaryVersion", key,
                             lambda k=key, i=vid: ks.update_primary_version(k, i))
            elif choice == 6:
                await change("UpdateCryptoKey", key, lambda k=key: ks.update_crypto_key(
                    k, CryptoKeyUpdate(paths=["labels"], labels={"n": str(rng.randrange(9))})))
            elif choice == 7:  # data access: counted, not an admin record
                status = await env.call("Encrypt", lambda k=key: ks.encrypt(k, b"dek", b""),
                                        resource=key)
                encrypts[(key, status)] = encrypts.get((key, status), 0) + 1
            else:  # reads: not audited
                await env.call("GetCryptoKey", lambda k=key: ks.get_crypto_key(k), resource=key)
                await env.call("GetCryptoKeyVersion",
                               lambda v=version: ks.get_crypto_key_version(v), resource=version)

        assert [brief(r) for r in await env.records()] == expected
        statuses = {status for *_, status in expected}
        assert {"OK", "FAILED_PRECONDITION"} <= statuses, statuses  # failures are recorded too
        assert all(r.kind == RecordKind.ADMIN_ACTIVITY for r in await env.records())
        assert [r.seq for r in await env.records()] == list(range(1, len(expected) + 1))

        written = await env.auditor.aggregator.flush(everything=True)
        aggregates = (await env.records())[len(expected):]
        assert written == len(aggregates)
        counted: dict[tuple[str, str], int] = {}
        for record in aggregates:
            assert record.kind == RecordKind.DATA_ACCESS_AGGREGATE
            if record.status == "OK":  # the version used; none when the call failed
                assert record.target.startswith(record.resource + "/cryptoKeyVersions/")
            where = (record.resource, record.status)
            counted[where] = counted.get(where, 0) + record.count
        assert counted == encrypts
        assert (await env.log.verify()).ok


async def test_a_failed_change_is_recorded_with_its_status(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks
        await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                       resource=LOCATION)
        await env.call("CreateCryptoKey", lambda: ks.create_crypto_key(
            RING, "k", NewCryptoKey(purpose=1)), resource=RING)
        version = f"{KEY}/cryptoKeyVersions/1"
        assert await env.call("DestroyCryptoKeyVersion",
                              lambda: ks.destroy_crypto_key_version(version),
                              resource=version) == "OK"
        assert await env.call("DestroyCryptoKeyVersion",
                              lambda: ks.destroy_crypto_key_version(version),
                              resource=version) == "FAILED_PRECONDITION"
        records = await env.records()
        assert [(r.rpc, r.status) for r in records] == [
            ("CreateKeyRing", "OK"), ("CreateCryptoKey", "OK"), ("DestroyCryptoKeyVersion", "OK"),
            ("DestroyCryptoKeyVersion", "FAILED_PRECONDITION")]
        failed = record_to_json(records[-1])
        assert "DESTROY_SCHEDULED" in failed["message"]
        assert failed["peer"] == PEER and failed["auth_method"] == "dev"
        assert failed["request"] == {"name": version}
        # What the change produced, when it is not the resource named.
        assert records[0].target == RING
        assert records[1].target == KEY
        assert records[2].target == ""


async def test_the_scheduler_is_audited_as_system_scheduler(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks
        await ks.create_key_ring(LOCATION, "r")
        await ks.create_crypto_key(RING, "k", NewCryptoKey(
            purpose=1, rotation_period=timedelta(days=1),
            next_rotation_time=env.clock.now() + timedelta(days=1)))
        await ks.destroy_crypto_key_version(f"{KEY}/cryptoKeyVersions/1")
        before = len(await env.records())
        scheduler = Scheduler(ks)
        assert (await scheduler.tick()).rotated == []
        assert len(await env.records()) == before  # nothing due: nothing recorded
        env.clock.advance(timedelta(days=31))
        report = await scheduler.tick()
        assert len(report.rotated) == 1 and len(report.destroyed) == 1
        new = (await env.records())[before:]
        assert [(r.principal, r.auth_method, r.rpc, r.resource, r.target) for r in new] == [
            ("system:scheduler", "internal", "AutomaticRotation", KEY,
             f"{KEY}/cryptoKeyVersions/2"),
            ("system:scheduler", "internal", "ScheduledDestruction",
             f"{KEY}/cryptoKeyVersions/1", ""),
        ]
        assert all(r.status == "OK" and r.peer == "" for r in new)
        await scheduler.tick()
        assert len(await env.records()) == before + 2
        assert (await env.log.verify()).ok


# ---- atomicity -----------------------------------------------------------------------


async def test_when_the_append_fails_the_change_does_not_happen(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks

        def append_then_fail(tr: Transaction, call: CallContext | None,
                             outcome: object = None) -> None:
            env.auditor.change_hook(tr, call, outcome)  # the record is written...
            raise StorageError("injected: the disk filled up")  # ...then the transaction fails

        ks.change_hook = append_then_fail
        assert await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                              resource=LOCATION) == "UNAVAILABLE"
        with pytest.raises(NotFound):
            await ks.get_key_ring(RING)
        # Only the failure, from its own transaction: the record of the change
        # was rolled back with it.
        assert [(r.rpc, r.status) for r in await env.records()] == [
            ("CreateKeyRing", "UNAVAILABLE")]

        ks.change_hook = env.auditor.change_hook
        assert await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                              resource=LOCATION) == "OK"
        await ks.get_key_ring(RING)
        assert [(r.rpc, r.status) for r in await env.records()] == [
            ("CreateKeyRing", "UNAVAILABLE"), ("CreateKeyRing", "OK")]
        assert (await env.log.verify()).ok


async def test_a_fault_inside_the_append_aborts_the_change(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks
        await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                       resource=LOCATION)
        await env.call("CreateCryptoKey", lambda: ks.create_crypto_key(
            RING, "k", NewCryptoKey(purpose=1)), resource=RING)
        real_build = audit._build

        def failing_build(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected fault in the audit append")

        monkeypatch.setattr(audit, "_build", failing_build)
        version = f"{KEY}/cryptoKeyVersions/1"
        status = await env.call("DestroyCryptoKeyVersion",
                                lambda: ks.destroy_crypto_key_version(version), resource=version)
        assert status == "INTERNAL"
        assert (await ks.get_crypto_key_version(version)).state == VersionState.ENABLED
        monkeypatch.setattr(audit, "_build", real_build)
        assert [r.rpc for r in await env.records()] == ["CreateKeyRing", "CreateCryptoKey"]


async def test_a_tampered_head_refuses_changes_rather_than_losing_their_records(
        tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks
        await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                       resource=LOCATION)

        def garble(tr: Transaction) -> None:
            value = tr.get(HEAD_KEY)
            assert value is not None
            tr.set(HEAD_KEY, value[:-1] + bytes([value[-1] ^ 1]))

        await env.raw.run(garble)
        assert await env.call("CreateCryptoKey", lambda: ks.create_crypto_key(
            RING, "k", NewCryptoKey(purpose=1)), resource=RING) == "DATA_LOSS"
        with pytest.raises(NotFound):
            await ks.get_crypto_key(KEY)

        # A deleted head with records left: appending would restart at 1 over
        # the evidence, so it is refused too.
        await env.raw.run(lambda tr: tr.clear(HEAD_KEY))
        assert await env.call("CreateCryptoKey", lambda: ks.create_crypto_key(
            RING, "k", NewCryptoKey(purpose=1)), resource=RING) == "DATA_LOSS"
        with pytest.raises(NotFound):
            await ks.get_crypto_key(KEY)
        with pytest.raises(DataLoss, match="head is missing"):
            await env.store.run(lambda tr: env.log.append(tr, []))


async def test_a_change_made_without_the_hook_is_still_recorded_afterwards(
        tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        env.ks.change_hook = None  # e.g. a future path that bypasses KeyStore._change
        await env.call("CreateKeyRing", lambda: env.ks.create_key_ring(LOCATION, "r"),
                       resource=LOCATION)
        assert [(r.rpc, r.status) for r in await env.records()] == [("CreateKeyRing", "OK")]


# ---- denied calls --------------------------------------------------------------------


async def test_denied_calls_get_a_record_of_their_own(tmp_path: Path) -> None:
    async with audited(tmp_path, DataAccessMode.OFF) as env:
        alice = Principal("user:alice@example.com", "token")
        denied = CallContext(rpc="Encrypt", principal=alice, peer=PEER, request_id="r-1",
                             resource=KEY)
        denied.summary = {"name": KEY, "plaintext_bytes": 32}
        await env.auditor.finished(denied, GRPCError(
            Status.PERMISSION_DENIED, "user:alice@example.com lacks "
            "cloudkms.cryptoKeyVersions.useToEncrypt on " + KEY))
        writes = env.counter.writes
        anonymous = CallContext(rpc="DestroyCryptoKeyVersion",
                                principal=UNAUTHENTICATED_PRINCIPAL, peer="unix",
                                request_id="r-2")
        await env.auditor.finished(anonymous, GRPCError(
            Status.UNAUTHENTICATED, "no credentials: send authorization: Bearer <token>"))
        assert env.counter.writes == writes  # counted, not written yet
        await env.auditor.aggregator.flush(everything=True)
        got = [record_to_json(r) for r in await env.records()]
        assert [(g["kind"], g["principal"], g["auth_method"], g["rpc"], g["resource"],
                 g["status"], g["peer"], g.get("request_id"), g.get("count")) for g in got] == [
            ("DENIED", "user:alice@example.com", "token", "Encrypt", KEY, "PERMISSION_DENIED",
             PEER, "r-1", None),
            ("DENIED", "", "none", "DestroyCryptoKeyVersion", "", "UNAUTHENTICATED", "unix",
             None, 1),
        ]
        assert got[0]["request"] == {"name": KEY, "plaintext_bytes": 32}
        assert "useToEncrypt" in got[0]["message"]
        assert got[1]["message"] == "no credentials: send authorization: Bearer <token>"
        assert got[1]["peers"] == ["unix"]


async def test_failed_reads_are_not_audited(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        assert await env.call("GetKeyRing", lambda: env.ks.get_key_ring(RING),
                              resource=RING) == "NOT_FOUND"
        assert await env.records() == []


# ---- data access ---------------------------------------------------------------------


async def _key_with_two_versions(env: Env) -> None:
    await env.ks.create_key_ring(LOCATION, "r")
    await env.ks.create_crypto_key(RING, "k", NewCryptoKey(purpose=1))
    await env.ks.create_crypto_key_version(KEY)  # version 2, not primary


@pytest.mark.parametrize("cache_ttl", [timedelta(0), timedelta(seconds=60)])
async def test_aggregate_mode_counts_without_a_transaction_per_call(
        tmp_path: Path, cache_ttl: timedelta) -> None:
    k = 200
    async with audited(tmp_path, DataAccessMode.AGGREGATE, cache_ttl) as env:
        await _key_with_two_versions(env)
        records_before = len(await env.records())
        writes, reads = env.counter.writes, env.counter.reads
        for _ in range(k):
            assert await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"dek", b""),
                                  resource=KEY) == "OK"
        assert env.counter.writes == writes  # the hot path wrote nothing
        if cache_ttl:
            assert env.counter.reads - reads <= 1
        assert len(await env.records()) == records_before
        assert env.auditor.aggregator.pending == k

        writes = env.counter.writes
        assert await env.auditor.aggregator.flush(everything=True) == 1
        assert env.counter.writes == writes + 1  # one batch, one transaction
        (record,) = (await env.records())[records_before:]
        got = record_to_json(record)
        assert (got["kind"], got["principal"], got["rpc"], got["resource"], got["target"],
                got["status"], got["count"]) == (
            "DATA_ACCESS_AGGREGATE", "user:dev", "Encrypt", KEY, f"{KEY}/cryptoKeyVersions/1",
            "OK", k)
        assert got["window_start"] == "2030-01-01T00:00:00Z"
        assert got["window_end"] == "2030-01-01T00:01:00Z"
        assert got["peers"] == [PEER]
        assert env.auditor.aggregator.pending == 0


async def test_aggregates_are_per_principal_version_and_minute(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        await _key_with_two_versions(env)
        alice = Principal("user:alice", "token")
        ciphertext = (await env.ks.encrypt(f"{KEY}/cryptoKeyVersions/2", b"x", b"")).ciphertext
        before = len(await env.records())
        env.clock.advance(timedelta(seconds=10))
        for _ in range(3):
            await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        for _ in range(2):
            await env.call("Decrypt", lambda: env.ks.decrypt(KEY, ciphertext, b""),
                           resource=KEY, principal=alice)
        await env.call("Decrypt", lambda: env.ks.decrypt(KEY, b"garbage", b""), resource=KEY,
                       principal=alice)
        async def random_bytes() -> None:
            env.ks.generate_random_bytes(LOCATION, 16, 0)

        await env.call("GenerateRandomBytes", random_bytes, resource=LOCATION)
        # Windows still open are not written by a periodic flush...
        assert await env.auditor.aggregator.flush() == 0
        env.clock.advance(timedelta(minutes=1))
        await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        # ...closed ones are; the minute still open waits.
        assert await env.auditor.aggregator.flush() == 4
        assert await env.auditor.aggregator.flush(everything=True) == 1
        got = [(r.principal, r.rpc, r.target.rsplit("/", 1)[-1] if r.target else "", r.status,
                r.count, r.window_start_us // 60_000_000 % 60)
               for r in (await env.records())[before:]]
        assert sorted(got[:4]) == sorted([
            ("user:dev", "Encrypt", "1", "OK", 3, 0),
            ("user:alice", "Decrypt", "2", "OK", 2, 0),
            ("user:alice", "Decrypt", "", "INVALID_ARGUMENT", 1, 0),
            ("user:dev", "GenerateRandomBytes", "", "OK", 1, 0),
        ])
        assert got[4] == ("user:dev", "Encrypt", "1", "OK", 1, 1)


async def test_reported_usage_is_aggregated_apart_and_marked(tmp_path: Path) -> None:
    """ReportUsage counts (valv.central.usage): records of their own, under the
    reporting sidecar's name, marked as reported; never merged with central's."""
    from valv.central.usage import ReportedUse

    version = f"{KEY}/cryptoKeyVersions/1"
    for mode in DataAccessMode:
        (tmp_path / mode.value).mkdir()
        async with audited(tmp_path / mode.value, mode) as env:
            await _key_with_two_versions(env)
            before = len(await env.records())
            sidecar = CallContext(rpc="ReportUsage", principal=Principal("user:sc", "mtls"),
                                  peer=PEER, request_id="r")
            start = env.clock.now().timestamp() // 60 * 60_000_000
            uses = [ReportedUse("Encrypt", KEY, version, "OK", int(start) - 60_000_000, 40),
                    ReportedUse("Encrypt", KEY, version, "OK", int(start) - 60_000_000, 2)]
            counted = env.auditor.record_reported(sidecar, uses)
            await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY,
                           principal=sidecar.principal)
            await env.auditor.aggregator.flush(everything=True)
            new = (await env.records())[before:]
            reported = [r for r in new if audit.is_reported(r)]
            if mode is DataAccessMode.OFF:
                assert counted == 0 and new == []
                continue
            assert counted == 2
            assert [(r.kind, r.principal, r.auth_method, r.rpc, r.resource, r.target, r.count,
                     r.window_end_us - r.window_start_us, list(r.peers)) for r in reported] == [
                (RecordKind.DATA_ACCESS_AGGREGATE, "user:sc", "mtls", "Encrypt", KEY, version,
                 42, 60_000_000, [PEER])]
            assert audit.record_to_json(reported[0])["reported_by"] == "sidecar"
            assert Query(reported=True).matches(reported[0])
            assert not Query(reported=False).matches(reported[0])
            central_own = [r for r in new if not audit.is_reported(r)]
            assert len(central_own) == 1 and "reported_by" not in audit.record_to_json(
                central_own[0])
            with pytest.raises(ValueError):
                env.auditor.aggregator.add_reported(sidecar, rpc="Encrypt", resource=KEY,
                                                    target=version, status="OK",
                                                    window_start_us=int(start) + 1, count=1)
            with pytest.raises(ValueError):
                env.auditor.aggregator.add_reported(sidecar, rpc="Encrypt", resource=KEY,
                                                    target=version, status="OK",
                                                    window_start_us=int(start), count=0)


async def test_full_mode_writes_one_record_per_call_and_off_writes_none(tmp_path: Path) -> None:
    k = 7
    for mode, expected in ((DataAccessMode.FULL, k), (DataAccessMode.OFF, 0)):
        (tmp_path / mode.value).mkdir()
        async with audited(tmp_path / mode.value, mode) as env:
            await _key_with_two_versions(env)
            before = len(await env.records())
            for _ in range(k):
                await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"dek", b""),
                               resource=KEY)
            assert await env.auditor.aggregator.flush(everything=True) == 0
            new = (await env.records())[before:]
            assert len(new) == expected
            for record in new:
                assert (record.kind, record.rpc, record.target, record.status, record.peer) == (
                    RecordKind.DATA_ACCESS, "Encrypt", f"{KEY}/cryptoKeyVersions/1", "OK", PEER)


async def test_a_failed_flush_keeps_the_counts_for_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with audited(tmp_path) as env:
        await _key_with_two_versions(env)
        for _ in range(5):
            await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        real_write = env.log.write

        async def unavailable(entries: list[audit.AuditEntry], **kwargs: Any) -> Any:
            raise StorageError("injected: storage unavailable")

        monkeypatch.setattr(env.log, "write", unavailable)
        with pytest.raises(StorageError):
            await env.auditor.aggregator.flush(everything=True)
        await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        monkeypatch.setattr(env.log, "write", real_write)
        assert await env.auditor.aggregator.flush(everything=True) == 1
        assert (await env.records())[-1].count == 6


async def test_the_flusher_writes_what_is_left_when_it_stops(tmp_path: Path) -> None:
    import asyncio

    async with audited(tmp_path) as env:
        await _key_with_two_versions(env)
        stop = asyncio.Event()
        task = asyncio.create_task(env.auditor.aggregator.run(stop, interval_s=3600))
        for _ in range(4):
            await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""), resource=KEY)
        stop.set()
        await task
        assert (await env.records())[-1].count == 4


async def test_records_never_hold_data_or_key_bytes(tmp_path: Path) -> None:
    plaintext = b"TOP-SECRET-PLAINTEXT-0123456789"
    aad = b"AAD-MARKER-42"
    async with audited(tmp_path, DataAccessMode.FULL) as env:
        await _key_with_two_versions(env)

        async def encrypt() -> None:
            ciphertexts.append((await env.ks.encrypt(KEY, plaintext, aad)).ciphertext)

        ciphertexts: list[bytes] = []
        # The summary the call guard makes (valv.central.calls.describe_request).
        summary = {"name": KEY, "plaintext_bytes": len(plaintext),
                   "additional_authenticated_data_bytes": len(aad)}
        await env.call("Encrypt", encrypt, resource=KEY, summary=summary)
        await env.call("Decrypt", lambda: env.ks.decrypt(KEY, ciphertexts[0], aad),
                       resource=KEY, summary={"name": KEY, "ciphertext_bytes": 99})
        text = json.dumps([record_to_json(r) for r in await env.records()])
        raw_values = b"".join(bytes(r) for r in await env.records())
        for secret in (plaintext, aad, ciphertexts[0]):
            for form in (secret, base64.b64encode(secret), secret.hex().encode()):
                assert form.decode("latin-1") not in text
                assert form not in raw_values


async def test_oversized_fields_are_cut_to_fit_a_value(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        huge = {"labels": {f"l{i}": "v" * 60 for i in range(3000)}}
        ctx = CallContext(rpc="UpdateCryptoKey", principal=DEV_PRINCIPAL, peer=PEER,
                          request_id="r", resource="x" * 500_000)
        ctx.summary = huge
        await env.auditor.finished(ctx, GRPCError(Status.INVALID_ARGUMENT, "m" * 200_000))
        (record,) = await env.records()
        assert record.truncated
        assert len(bytes(record)) < MAX_VALUE_BYTES // 2
        assert "request_text" in record_to_json(record)
        assert (await env.log.verify()).ok


# ---- reading and verifying -----------------------------------------------------------


async def _log_of(env: Env, n: int) -> None:
    await env.ks.create_key_ring(LOCATION, "r")
    await env.ks.create_crypto_key(RING, "k", NewCryptoKey(purpose=1))
    for _ in range(n - 2):
        env.clock.advance(timedelta(seconds=1))
        await env.ks.create_crypto_key_version(KEY)


async def test_an_intact_log_verifies_reading_in_chunks(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        await _log_of(env, 10)
        reads = env.counter.reads
        report = await env.log.verify(chunk=3)
        assert report.ok and report.checked == 10
        assert report.head is not None and report.head.seq == 10
        assert env.counter.reads - reads >= 4  # several small transactions, not one big read
        assert [r.seq for r in await env.log.last(3)] == [8, 9, 10]
        assert await env.log.last(0) == []
        anchors = {5: bytes((await env.log.last(6))[0].hash)}
        assert (await env.log.verify(anchors=anchors)).ok


@pytest.mark.parametrize(("tamper", "message"), [
    ("delete-5", "record 5 is missing"),
    ("delete-5-6", "records 5..6 are missing"),
    ("swap-3-4", "record 3: failed authentication"),
    ("edit-2", "record 2: failed authentication"),
    ("truncate", "the tail was truncated: the head names record 10 but the log ends at 9"),
    ("truncate-3", "the head names record 10 but the log ends at 7"),
    ("delete-head", "the head is missing"),
    ("edit-head", "the head: failed authentication"),
    ("seq-0", "a record at seq 0"),
])
async def test_verify_detects_storage_level_tampering(tmp_path: Path, tamper: str,
                                                      message: str) -> None:
    async with audited(tmp_path) as env:
        await _log_of(env, 10)

        def body(tr: Transaction) -> None:
            if tamper.startswith("delete-") and tamper[7:].replace("-", "").isdigit():
                for number in tamper[7:].split("-"):
                    tr.clear(record_key(int(number)))
            elif tamper == "swap-3-4":
                three, four = tr.get(record_key(3)), tr.get(record_key(4))
                assert three is not None and four is not None
                tr.set(record_key(3), four)
                tr.set(record_key(4), three)
            elif tamper == "edit-2":
                value = tr.get(record_key(2))
                assert value is not None
                tr.set(record_key(2), value[:40] + bytes([value[40] ^ 0x20]) + value[41:])
            elif tamper.startswith("truncate"):
                count = int(tamper.split("-")[1]) if "-" in tamper else 1
                for seq in range(11 - count, 11):
                    tr.clear(record_key(seq))
            elif tamper == "delete-head":
                tr.clear(HEAD_KEY)
            elif tamper == "edit-head":
                value = tr.get(HEAD_KEY)
                assert value is not None
                tr.set(HEAD_KEY, value[:-3] + b"xyz")
            elif tamper == "seq-0":
                value = tr.get(record_key(1))
                assert value is not None
                tr.set(record_key(0), value)

        await env.raw.run(body)
        report = await env.log.verify(chunk=4)
        assert not report.ok
        assert any(message in p for p in report.problems), report.problems


async def test_a_rewrite_with_the_root_key_breaks_the_chain_or_the_anchor(tmp_path: Path) -> None:
    """Someone holding the root key can seal new values: the chain still shows an
    edit, and a full rewrite is caught by a head hash noted earlier (an anchor)."""
    async with audited(tmp_path) as env:
        await _log_of(env, 6)
        anchor = {6: (await env.log.head()).hash}  # type: ignore[union-attr]

        def edit_principal(tr: Transaction) -> None:
            value = tr.get(record_key(3))
            assert value is not None
            record = audit.AuditRecord.parse(value)
            record.principal = "user:someone-else"
            tr.set(record_key(3), bytes(record))

        await env.store.run(edit_principal)
        report = await env.log.verify()
        assert any("record 3: its hash does not match its content" in p
                   for p in report.problems), report.problems

        def rehash_from_3(tr: Transaction) -> None:
            prev = audit.AuditRecord.parse(tr.get(record_key(2)) or b"").hash
            for seq in range(3, 7):
                record = audit.AuditRecord.parse(tr.get(record_key(seq)) or b"")
                record.prev_hash = prev
                record.hash = audit.compute_hash(record)
                tr.set(record_key(seq), bytes(record))
                prev = record.hash
            tr.set(HEAD_KEY, bytes(audit_pb.AuditHead(schema_version=1, seq=6, hash=prev)))

        await env.store.run(rehash_from_3)
        assert (await env.log.verify()).ok  # self-consistent again...
        rewritten = await env.log.verify(anchors=anchor)
        assert any("differs from the anchor" in p for p in rewritten.problems)  # ...but not that

        def extra(tr: Transaction) -> None:
            tr.set(record_key(8), tr.get(record_key(6)) or b"")

        await env.store.run(extra)
        assert any("record 8: lies beyond the head" in p
                   for p in (await env.log.verify()).problems)


async def test_query_filters(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        ks = env.ks
        alice = Principal("user:alice", "token")
        await env.call("CreateKeyRing", lambda: ks.create_key_ring(LOCATION, "r"),
                       resource=LOCATION)
        env.clock.advance(timedelta(hours=1))
        await env.call("CreateCryptoKey", lambda: ks.create_crypto_key(
            RING, "k", NewCryptoKey(purpose=1)), resource=RING, principal=alice)
        await env.auditor.finished(CallContext(
            rpc="Encrypt", principal=alice, peer=PEER, request_id="d", resource=KEY),
            GRPCError(Status.PERMISSION_DENIED, "no"))
        version = f"{KEY}/cryptoKeyVersions/1"
        env.clock.advance(timedelta(hours=1))
        await env.call("RestoreCryptoKeyVersion", lambda: ks.restore_crypto_key_version(version),
                       resource=version)

        async def rpcs(**filters: Any) -> list[str]:
            return [r.rpc async for r in audit.query(env.log, Query(**filters))]

        assert await rpcs() == ["CreateKeyRing", "CreateCryptoKey", "Encrypt",
                                "RestoreCryptoKeyVersion"]
        assert await rpcs(principal="user:alice") == ["CreateCryptoKey", "Encrypt"]
        assert await rpcs(resource=KEY) == ["CreateCryptoKey", "Encrypt",
                                            "RestoreCryptoKeyVersion"]
        # A KeyRing matches what was created in it and under it.
        assert await rpcs(resource=RING + "/") == ["CreateKeyRing", "CreateCryptoKey",
                                                   "Encrypt", "RestoreCryptoKeyVersion"]
        assert await rpcs(result="DENIED") == ["Encrypt"]
        assert await rpcs(result="FAILED") == ["Encrypt", "RestoreCryptoKeyVersion"]
        assert await rpcs(result="failed_precondition") == ["RestoreCryptoKeyVersion"]
        assert await rpcs(result="OK") == ["CreateKeyRing", "CreateCryptoKey"]
        start = FakeClock().now()
        assert await rpcs(since=start + timedelta(minutes=30),
                          until=start + timedelta(minutes=90)) == ["CreateCryptoKey", "Encrypt"]
        assert await rpcs(rpc="CreateKeyRing") == ["CreateKeyRing"]
