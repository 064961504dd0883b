"""Deleting (or rolling back) the audit log as a whole is detected and refused.

The attacker has write access to the storage but not the root key: they can
delete rows and put back older sealed values at the same key, not forge one.
Tampering is done with raw SQLite edits of ``valv.db`` (table kv(k, v)), with
central stopped ("restart": a new auditor on the same file, as central's start
makes) or running (the same auditor).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import fdb.tuple
import pytest
from grpclib import GRPCError
from grpclib.const import Status

from tests.test_audit import KEY, LOCATION, PEER, RING, Env, audited
from valv.core.audit import GENESIS_KEY, HEAD_KEY, AuditEntry, AuditLog, RecordKind, record_key
from valv.core.calls import CallContext, Principal
from valv.core.clock import FakeClock
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.errors import DataLoss, NotFound
from valv.core.keystore import NewCryptoKey
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

AUDIT_KEYS = ("k = ? OR k = ? OR (k >= ? AND k < ?)",
              (HEAD_KEY, GENESIS_KEY, bytes(fdb.tuple.range(("audit",)).start),
               bytes(fdb.tuple.range(("audit",)).stop)))


def sql(db: Path, statement: str, *params: object) -> int:
    with closing(sqlite3.connect(db)) as conn, conn:
        return conn.execute(statement, params).rowcount


def value(db: Path, key: bytes) -> bytes | None:
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
    return None if row is None else bytes(row[0])


def delete_records_and_head(db: Path) -> None:
    where, params = AUDIT_KEYS
    assert sql(db, f"DELETE FROM kv WHERE ({where}) AND k != ?", *params, GENESIS_KEY) > 1


def delete_whole_log(db: Path) -> None:
    where, params = AUDIT_KEYS
    assert sql(db, f"DELETE FROM kv WHERE {where}", *params) > 2


def delete_genesis(db: Path) -> None:
    assert sql(db, "DELETE FROM kv WHERE k = ?", GENESIS_KEY) == 1


def edit_genesis(db: Path) -> None:
    sealed = value(db, GENESIS_KEY)
    assert sealed is not None
    sql(db, "UPDATE kv SET v = ? WHERE k = ?", sealed[:-1] + bytes([sealed[-1] ^ 1]),
        GENESIS_KEY)


async def build(env: Env) -> None:
    await env.call("CreateKeyRing", lambda: env.ks.create_key_ring(LOCATION, "r"),
                   resource=LOCATION)
    await env.call("CreateCryptoKey", lambda: env.ks.create_crypto_key(
        RING, "k", NewCryptoKey(purpose=1)), resource=RING)


async def refused_changes(env: Env) -> None:
    """What a store whose log is gone does: no audited change, no new chain."""
    status = await env.call("CreateCryptoKeyVersion",
                            lambda: env.ks.create_crypto_key_version(KEY), resource=KEY)
    assert status == "DATA_LOSS"
    with pytest.raises(NotFound):
        await env.ks.get_crypto_key_version(f"{KEY}/cryptoKeyVersions/2")
    failures = env.auditor.write_failures
    await env.auditor.finished(CallContext(
        rpc="Encrypt", principal=Principal("user:eve", "token"), peer=PEER, request_id="d",
        resource=KEY), GRPCError(Status.PERMISSION_DENIED, "no"))
    assert env.auditor.write_failures == failures + 1  # refused too, and logged
    entry = AuditEntry(kind=RecordKind.ADMIN_ACTIVITY, principal="user:dev",
                       auth_method="dev", rpc="CreateKeyRing")
    with pytest.raises(DataLoss):
        await env.store.run(lambda tr: env.log.append(tr, [entry]))
    # Using the keys goes on: only what would need a record is refused.
    assert await env.call("Encrypt", lambda: env.ks.encrypt(KEY, b"x", b""),
                          resource=KEY) == "OK"


async def test_a_new_store_gets_a_genesis_marker_and_an_empty_head(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        genesis = await env.log.genesis()
        assert genesis is not None and genesis.first_hash == b""
        head = await env.log.head()
        assert head is not None and head.seq == 0
        report = await env.log.verify()
        assert report.ok and report.checked == 0
        await build(env)
        genesis = await env.log.genesis()
        first = (await env.records())[0]
        assert genesis is not None and genesis.first_hash == bytes(first.hash)
        assert (await env.log.verify()).ok
    async with audited(tmp_path) as env:  # a restart changes nothing
        assert await env.log.genesis() == genesis
        assert (await env.log.verify()).ok


async def test_an_empty_store_without_a_log_verifies(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        pass
    sql(tmp_path / "valv.db", "DELETE FROM kv")  # as if central had never run
    ring = RootKeyring([RootKey(b"\x01" * 32)])
    store = SealedStore(SqliteStore(str(tmp_path / "valv.db")), Sealer(ring))
    try:
        report = await AuditLog(store, FakeClock()).verify()  # `valv audit verify`
        assert report.ok and report.head is None and report.genesis is None
    finally:
        await store.close()
    async with audited(tmp_path) as env:  # central's first start: a new log, not a refusal
        await build(env)
        assert (await env.log.verify()).ok


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "records and head deleted": (
        delete_records_and_head, "the whole log was deleted: its genesis marker (created "),
    "records, head and genesis deleted": (
        delete_whole_log, "the store holds records (key rings, keys...) but no audit log"),
    "genesis deleted": (delete_genesis, "the genesis marker is missing"),
    "genesis edited": (edit_genesis, "the genesis marker: failed authentication"),
}


@pytest.mark.parametrize("name", sorted(TAMPERING))
async def test_deleting_the_log_is_detected_and_refused_after_a_restart(
        tmp_path: Path, name: str) -> None:
    tamper, message = TAMPERING[name]
    async with audited(tmp_path) as env:
        await build(env)
    tamper(tmp_path / "valv.db")
    async with audited(tmp_path) as env:  # central restarts on the tampered store
        report = await env.log.verify()
        assert not report.ok
        assert any(message in p for p in report.problems), report.problems
        await refused_changes(env)
        # Nothing was appended over the evidence.
        assert any(message in p for p in (await env.log.verify()).problems)


async def test_deleting_the_whole_log_while_central_runs_is_refused(tmp_path: Path) -> None:
    async with audited(tmp_path) as env:
        await build(env)
        delete_whole_log(tmp_path / "valv.db")
        await refused_changes(env)
        assert any("no audit log" in p for p in (await env.log.verify()).problems)


async def test_a_head_rolled_back_to_the_empty_log_is_detected_and_refused(
        tmp_path: Path) -> None:
    db = tmp_path / "valv.db"
    async with audited(tmp_path) as env:
        empty_head = value(db, HEAD_KEY)  # sealed, as central wrote it
        await build(env)
    assert empty_head is not None
    sql(db, "UPDATE kv SET v = ? WHERE k = ?", empty_head, HEAD_KEY)
    async with audited(tmp_path) as env:
        problems = (await env.log.verify()).problems
        assert any("the head was rolled back" in p for p in problems), problems
        status = await env.call("CreateCryptoKeyVersion",
                                lambda: env.ks.create_crypto_key_version(KEY), resource=KEY)
        assert status == "DATA_LOSS"  # record 1 is not overwritten
        assert [r.rpc for r in await env.records()] == ["CreateKeyRing", "CreateCryptoKey"]


async def test_a_head_rolled_back_by_some_records_refuses_to_overwrite_them(
        tmp_path: Path) -> None:
    db = tmp_path / "valv.db"
    async with audited(tmp_path) as env:
        await build(env)
        old_head = value(db, HEAD_KEY)
        await env.call("CreateCryptoKeyVersion", lambda: env.ks.create_crypto_key_version(KEY),
                       resource=KEY)
    assert old_head is not None
    sql(db, "UPDATE kv SET v = ? WHERE k = ?", old_head, HEAD_KEY)
    async with audited(tmp_path) as env:
        assert any("lies beyond the head" in p for p in (await env.log.verify()).problems)
        assert await env.call("CreateCryptoKeyVersion",
                              lambda: env.ks.create_crypto_key_version(KEY),
                              resource=KEY) == "DATA_LOSS"
        assert value(db, record_key(3)) is not None
        assert [r.rpc async for r in env.log.records(1, 3)][-1] == "CreateCryptoKeyVersion"


async def test_a_log_put_in_place_of_another_is_detected(tmp_path: Path) -> None:
    """Both stores sealed under the same root key: record 1 of the other log opens
    fine, but it is not the record this log's genesis names."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a", "b"):
        async with audited(tmp_path / name) as env:
            await build(env)
    where, params = AUDIT_KEYS
    a, b = tmp_path / "a" / "valv.db", tmp_path / "b" / "valv.db"
    with closing(sqlite3.connect(b)) as conn:
        rows = conn.execute(f"SELECT k, v FROM kv WHERE ({where}) AND k != ?",
                            (*params, GENESIS_KEY)).fetchall()
    for k, v in rows:
        sql(a, "UPDATE kv SET v = ? WHERE k = ?", v, k)
    async with audited(tmp_path / "a") as env:
        problems = (await env.log.verify()).problems
        assert any("record 1: is not the record the genesis marker names" in p
                   for p in problems), problems
