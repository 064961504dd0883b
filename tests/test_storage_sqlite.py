"""The sqlite backend: the conformance suite, plain and sealed, plus sqlite specifics."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.storage_conformance import (
    StaticSealKeys,
    StoreConformance,
    StoreOpener,
    all_pairs,
    get,
    put,
    raw_bytes,
)
from valv.core.storage import StorageError, Store, Transaction, keys, open_store
from valv.core.storage import sqlite as sqlite_backend
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

REPO_ROOT = Path(__file__).resolve().parent.parent


class TestSqliteStore(StoreConformance):
    @pytest.fixture
    def store_opener(self, tmp_path: Path) -> StoreOpener:
        path = tmp_path / "data" / "valv.db"

        async def open_() -> Store:
            return SqliteStore(path)

        return open_


class TestSealedSqliteStore(StoreConformance):
    @pytest.fixture
    def store_opener(self, tmp_path: Path) -> StoreOpener:
        path = tmp_path / "data" / "valv.db"
        sealer = Sealer(StaticSealKeys(("0123456789abcdef", bytes(range(32)))))

        async def open_() -> Store:
            return SealedStore(SqliteStore(path), sealer)

        return open_


# -- sqlite specifics --------------------------------------------------------


async def test_file_and_directory_modes(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "valv.db"
    store = SqliteStore(path)
    try:
        await put(store, (keys.pack("k"), b"v"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(Path(str(path) + "-wal")).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path.parent.parent).st_mode) == 0o700
    finally:
        await store.close()


async def test_schema_and_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "valv.db"
    store = SqliteStore(path)
    try:
        await put(store, (keys.pack("k"), b"v"))
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            (sql,) = raw.execute("SELECT sql FROM sqlite_master WHERE name = 'kv'").fetchone()
            assert "WITHOUT ROWID" in sql
            assert raw.execute("SELECT k, v FROM kv").fetchall() == [(keys.pack("k"), b"v")]
        finally:
            raw.close()
    finally:
        await store.close()


async def test_construction_does_no_io(tmp_path: Path) -> None:
    path = tmp_path / "lazy" / "valv.db"
    store = SqliteStore(path)
    assert not path.parent.exists()
    await store.close()
    assert not path.parent.exists()


async def test_url(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    assert store.url == f"sqlite://{tmp_path}/valv.db"
    await store.close()


async def test_inverted_clear_range_is_an_error(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    try:
        with pytest.raises(StorageError, match="inverted"):
            await store.run(lambda tx: tx.clear_range(b"b", b"a"))
    finally:
        await store.close()


async def test_busy_database_gives_up_after_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "valv.db"
    k = keys.pack("k")
    store = SqliteStore(path, busy_timeout_ms=10, retry_seconds=0.2)
    try:
        await put(store, (k, b"committed"))
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            holder.execute("UPDATE kv SET v = ? WHERE k = ?", (b"uncommitted", k))
            # Readers are not blocked by the writer and see the last commit.
            assert await get(store, k) == b"committed"
            with pytest.raises(StorageError, match="busy"):
                await put(store, (k, b"blocked"))
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        await put(store, (k, b"after"))
        assert await get(store, k) == b"after"
    finally:
        await store.close()


async def test_secure_delete_and_checkpoint_erase_cleared_values(tmp_path: Path) -> None:
    path = tmp_path / "valv.db"
    canary = b"CANARY-key-material-0123456789-" * 3
    k = keys.pack("km", "p", "l", "r", "k", 1)
    store = SqliteStore(path)
    try:
        await put(store, (k, canary), (keys.pack("other"), b"stays"))
        await store.checkpoint()
        assert canary in path.read_bytes()  # control: the grep finds it
        await store.run(lambda tx: tx.clear(k))
        await store.checkpoint()
        assert canary not in raw_bytes(path)
        assert os.path.getsize(str(path) + "-wal") == 0
        assert await all_pairs(store) == [(keys.pack("other"), b"stays")]
    finally:
        await store.close()


def _busy_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the first statement of the next transaction report SQLITE_BUSY."""
    real = sqlite_backend._SqliteTransaction._execute
    state = {"fired": False}

    def execute(
        self: sqlite_backend._SqliteTransaction, sql: str, params: tuple[object, ...]
    ) -> list[tuple[bytes, ...]]:
        if not state["fired"]:
            state["fired"] = True
            self.busy = True
            raise sqlite_backend._Busy("database busy (simulated)")
        return real(self, sql, params)

    monkeypatch.setattr(sqlite_backend._SqliteTransaction, "_execute", execute)


async def test_busy_inside_the_body_reruns_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    k = keys.pack("k")
    calls = 0

    def body(tx: Transaction) -> int:
        nonlocal calls
        calls += 1
        tx.set(k, b"%d" % calls)
        return calls

    try:
        _busy_once(monkeypatch)
        assert await store.run(body) == 2
        assert calls == 2
        assert await get(store, k) == b"2"
    finally:
        await store.close()


async def test_busy_swallowed_by_the_body_still_reruns_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    a, b = keys.pack("a"), keys.pack("b")
    calls = 0

    def body(tx: Transaction) -> None:
        nonlocal calls
        calls += 1
        try:
            tx.set(a, b"%d" % calls)  # fails with BUSY on the first run
        except StorageError:
            pass
        tx.set(b, b"%d" % calls)

    try:
        _busy_once(monkeypatch)
        await store.run(body)
        assert calls == 2
        assert await all_pairs(store) == [(a, b"2"), (b, b"2")]
    finally:
        await store.close()


# -- open_store ----------------------------------------------------------------


async def test_open_store_absolute(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/sub/valv.db"
    store = await open_store(url)
    try:
        assert store.url == url
        assert (tmp_path / "sub" / "valv.db").exists()  # opened eagerly
        await put(store, (keys.pack("k"), b"v"))
    finally:
        await store.close()


async def test_open_store_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = await open_store("sqlite:rel/valv.db")
    try:
        assert (tmp_path / "rel" / "valv.db").exists()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("fdb://host/fdb.cluster", "no host"),
        ("postgres://db/valv", "unknown scheme"),
        ("/just/a/path.db", "unknown scheme"),
        ("sqlite://host/valv.db", "no host"),
        ("sqlite:", "no database file"),
        ("sqlite:///dir/", "no database file"),
        ("sqlite::memory:", "only a database file"),
        ("sqlite:///x.db?mode=ro", "no query"),
    ],
)
async def test_open_store_rejects(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        await open_store(url)


async def test_open_store_unusable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StorageError):
        await open_store(f"sqlite://{blocker}/valv.db")


# -- several processes on one file ---------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from valv.core.storage import keys
    from valv.core.storage.sqlite import SqliteStore

    async def main(path, n):
        store = SqliteStore(path)
        counter = keys.pack("meta", "counter")

        def increment(tx):
            tx.set(counter, str(int(tx.get(counter) or b"0") + 1).encode())

        await store.run(lambda tx: None, read_only=True)
        print("ready", flush=True)
        sys.stdin.readline()  # wait until every process is ready
        await asyncio.gather(*(store.run(increment) for _ in range(n)))
        await store.close()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


async def test_increments_from_several_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    n, procs = 40, 3
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        for _ in range(procs)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n", child.communicate()[1].decode()
        for child in children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err.decode()
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    store = SqliteStore(path)
    try:
        counter = keys.pack("meta", "counter")
        assert await get(store, counter) == str(n * procs).encode()
    finally:
        await store.close()
