"""The embedded default backend: one SQLite file (DESIGN.md §4).

Layout: a single table ``kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT
ROWID``. SQLite compares BLOBs with memcmp and then by length, which is exactly
FoundationDB's byte order, so range reads are index scans in key order.

Transactions:

- Writers start with ``BEGIN IMMEDIATE``. That takes SQLite's single write
  lock and a read snapshot at the same moment, so writers are serialized and
  each one reads the latest committed data: the schedule is serializable.
  This holds across processes sharing the file, because the lock lives in the
  file (WAL index), not in this process.
- Read-only transactions use plain ``BEGIN``: in WAL mode a reader gets a
  consistent snapshot and never blocks or is blocked by the writer.
- ``SQLITE_BUSY`` / ``SQLITE_LOCKED`` (another connection or process holds the
  lock) first waits in SQLite's busy handler (``busy_timeout``), then the
  whole body is rolled back and run again with bounded, jittered backoff,
  until ``retry_seconds`` have passed.

Blocking calls never run on the event loop: bodies run in a small thread pool,
and every worker thread has its own connection, used by that thread only.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from valv.core.storage import keys
from valv.core.storage.base import (
    MAX_KEY_BYTES,
    MAX_TRANSACTION_BYTES,
    MAX_VALUE_BYTES,
    LimitExceededError,
    ReadOnlyTransactionError,
    StorageError,
    Store,
    Transaction,
)

T = TypeVar("T")

# Keys at or above b"\xff" are FoundationDB's system keyspace. Refusing them
# here keeps every key written to the embedded store migratable to fdb.
_SYSTEM_KEYSPACE = b"\xff"

_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID"
# Only with versionstamps=True: the counter behind emulated versionstamps.
_STAMP_SCHEMA = "CREATE TABLE IF NOT EXISTS stamp (n INTEGER NOT NULL)"


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    # Errors raised without a code (older builds): fall back to the text.
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


class _Busy(StorageError):
    """Internal: a statement hit SQLITE_BUSY/LOCKED; the body will be retried."""


class _SqliteTransaction(Transaction):
    def __init__(self, conn: sqlite3.Connection, *, read_only: bool,
                 versionstamps: bool = False) -> None:
        self._conn = conn
        self._read_only = read_only
        self._versionstamps = versionstamps
        self._stamp: bytes | None = None
        self._stamped = 0
        self._thread = threading.get_ident()
        self._open = True
        self._written = 0
        self._too_large: LimitExceededError | None = None
        self.busy = False

    # -- helpers -----------------------------------------------------------

    def _check_usable(self) -> None:
        if not self._open:
            raise StorageError("transaction used after its body returned")
        # The sqlite3 check_same_thread rule, kept by hand: the connection is
        # opened with check_same_thread=False only so that close() can close
        # it after its thread has exited.
        if threading.get_ident() != self._thread:
            raise StorageError("transaction used from a thread other than its own")

    def _check_write(self, key: bytes, written: int) -> None:
        self._check_usable()
        if self._read_only:
            raise ReadOnlyTransactionError(
                f"write to {keys.describe(key)} in a read-only transaction"
            )
        if self._too_large is not None:
            raise self._too_large
        if self._written + written > MAX_TRANSACTION_BYTES:
            self._too_large = LimitExceededError(
                f"transaction too large: writing {keys.describe(key)} would bring it to "
                f"{self._written + written} bytes (limit {MAX_TRANSACTION_BYTES})"
            )
            raise self._too_large
        self._written += written

    def _execute(self, sql: str, params: tuple[object, ...]) -> list[tuple[bytes, ...]]:
        try:
            # fetchall() inside the try: SQLite may report BUSY on any step.
            rows: list[tuple[bytes, ...]] = self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if _is_busy(exc):
                self.busy = True
                raise _Busy(f"database busy: {exc}") from exc
            raise StorageError(f"sqlite error: {exc}") from exc
        return rows

    # -- Transaction -------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        self._check_usable()
        _check_key(key)
        rows = self._execute("SELECT v FROM kv WHERE k = ?", (key,))
        return bytes(rows[0][0]) if rows else None

    def set(self, key: bytes, value: bytes) -> None:
        _check_key(key)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"value for {keys.describe(key)} must be bytes")
        value = bytes(value)
        if len(value) > MAX_VALUE_BYTES:
            raise LimitExceededError(
                f"value for {keys.describe(key)} is {len(value)} bytes (limit {MAX_VALUE_BYTES})"
            )
        self._check_write(key, len(key) + len(value))
        self._execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

    def clear(self, key: bytes) -> None:
        _check_key(key)
        self._check_write(key, len(key))
        self._execute("DELETE FROM kv WHERE k = ?", (key,))

    def clear_range(self, begin: bytes, end: bytes) -> None:
        _check_range(begin, end)
        if begin > end:
            raise StorageError(
                f"inverted range: begin {keys.describe(begin)} > end {keys.describe(end)}"
            )
        self._check_write(begin, len(begin) + len(end))
        self._execute("DELETE FROM kv WHERE k >= ? AND k < ?", (begin, end))

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        self._check_usable()
        _check_range(begin, end)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        order = "DESC" if reverse else "ASC"
        sql = f"SELECT k, v FROM kv WHERE k >= ? AND k < ? ORDER BY k {order}"  # noqa: S608
        params: tuple[object, ...] = (begin, end)
        if limit:
            sql += " LIMIT ?"
            params = (begin, end, limit)
        rows = self._execute(sql, params)
        return [(bytes(k), bytes(v)) for k, v in rows]

    @property
    def supports_versionstamps(self) -> bool:
        return self._versionstamps

    def set_versionstamped(self, prefix: bytes, value: bytes) -> None:
        if not self._versionstamps:
            super().set_versionstamped(prefix, value)
        # Writers are serialized here, so a counter bumped by each writing
        # transaction orders stamps exactly as commits are ordered: what
        # FoundationDB's versionstamps guarantee. It lives in a table of its
        # own, outside the keyspace.
        self._check_usable()
        if self._read_only:
            raise ReadOnlyTransactionError(
                f"versionstamped write under {keys.describe(prefix)} in a read-only transaction")
        if self._stamp is None:
            rows = self._execute("SELECT n FROM stamp", ())
            counter = int(rows[0][0]) + 1 if rows else 1
            self._execute("DELETE FROM stamp", ())
            self._execute("INSERT INTO stamp (n) VALUES (?)", (counter,))
            self._stamp = counter.to_bytes(keys.STAMP_BYTES, "big")
        key = keys.versionstamped_key(prefix, self._stamp, self._stamped)
        self._stamped += 1
        self.set(key, value)

    def close(self) -> None:
        self._open = False

    def check_commit(self) -> None:
        if self._too_large is not None:
            raise self._too_large


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes):
        raise TypeError(f"storage keys are bytes, not {type(key).__name__}")
    if len(key) > MAX_KEY_BYTES:
        raise LimitExceededError(
            f"key {keys.describe(key)} is {len(key)} bytes (limit {MAX_KEY_BYTES})"
        )
    if key.startswith(_SYSTEM_KEYSPACE):
        raise StorageError(f"key {keys.describe(key)} is in the reserved \\xff keyspace")


def _check_range(begin: bytes, end: bytes) -> None:
    if not isinstance(begin, bytes) or not isinstance(end, bytes):
        raise TypeError("range bounds are bytes")
    if end > _SYSTEM_KEYSPACE:
        raise StorageError(f"range end {keys.describe(end)} is past the \\xff keyspace")


class SqliteStore(Store):
    """A Store in one SQLite file at ``path``.

    Construction does no I/O. The file (mode 0600) and any missing parent
    directories (mode 0700) are created by the first transaction, in a worker
    thread. Several processes may open the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_workers: int = 4,
        busy_timeout_ms: int = 2_000,
        retry_seconds: float = 30.0,
        url: str | None = None,
        versionstamps: bool = False,
    ) -> None:
        self._path = os.path.abspath(os.fspath(path))
        self._url = url or f"sqlite://{self._path}"
        # Emulated versionstamps, so the code that FoundationDB runs with them
        # (valv.core.storage.staging) is tested on a real store. Off by
        # default: SQLite serializes writers anyway, so logs gain nothing.
        self._versionstamps = versionstamps
        self._busy_timeout_ms = busy_timeout_ms
        self._retry_seconds = retry_seconds
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="valv-sqlite"
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._initialized = False
        self._closed = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def path(self) -> str:
        return self._path

    @property
    def supports_versionstamps(self) -> bool:
        return self._versionstamps

    # -- Store -------------------------------------------------------------

    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        # If the awaiting task is cancelled, what happens depends on where the
        # body is: still queued for a worker (all workers busy), it is dropped
        # and never runs; already running, it runs to its end and may commit
        # (cancellation cannot reach into SQLite). So the caller can't tell which,
        # and work that must happen whatever becomes of the caller is run as a
        # task of its own and awaited through asyncio.shield (KeyStore._change,
        # the audit writes).
        return await self._call(self._run_sync, body, read_only)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # shutdown(wait=True) lets queued and running transactions finish and
        # joins every worker thread; only then are their connections closed.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()

    async def checkpoint(self) -> None:
        """Copy the WAL into the database file and truncate the WAL to zero bytes.

        With ``secure_delete`` on, a cleared value is overwritten in the page
        that held it, but until a checkpoint older copies of that page can
        still sit in the WAL. Call this after destroying key material so that
        the erased bytes leave the WAL too. It waits for readers and writers
        (other processes included) to step aside, and raises StorageError if
        it cannot complete within ``retry_seconds``.
        """
        await self._call(self._checkpoint_sync)

    async def erase_freed_space(self) -> None:
        """See Store.erase_freed_space: here, a checkpoint (secure_delete is on)."""
        await self.checkpoint()

    # -- internals ---------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        if self._closed:
            raise StorageError(f"store {self._url} is closed")
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # executor shut down between the check and here
            raise StorageError(f"store {self._url} is closed") from exc
        return await future

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        self._ensure_file()
        try:
            conn = sqlite3.connect(
                self._path,
                # Autocommit mode: this module issues BEGIN/COMMIT itself.
                isolation_level=None,
                # The connection is only ever used by this thread (checked in
                # _SqliteTransaction); False only so close() can close it
                # after this thread has been joined.
                check_same_thread=False,
                timeout=self._busy_timeout_ms / 1000,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {self._path}: {exc}") from exc
        try:
            self._configure(conn)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn
        return conn

    def _ensure_file(self) -> None:
        parent = os.path.dirname(self._path)
        missing: list[str] = []
        d = parent
        while d and not os.path.isdir(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                if os.path.isdir(d):
                    continue  # another thread or process made it meanwhile
                raise StorageError(f"cannot create directory {d}: a file is in the way") from None
            except OSError as exc:
                raise StorageError(f"cannot create directory {d}: {exc}") from exc
            os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise StorageError(f"cannot create {self._path}: {exc}") from exc
        try:
            # SQLite creates the -wal and -shm files with the database file's
            # permissions, so they are 0600 as well.
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)

    def _configure(self, conn: sqlite3.Connection) -> None:
        def setup() -> None:
            # The database file is untrusted input: no code from its schema.
            conn.execute("PRAGMA trusted_schema=OFF")
            # Durability: in WAL mode, synchronous=NORMAL does not fsync the
            # WAL at commit, so a transaction we acknowledged can vanish on
            # power loss. For a KMS that can mean a key version whose
            # ciphertexts are already out in the world, lost forever. FULL
            # fsyncs the WAL on every commit, so an acknowledged write
            # survives power loss.
            conn.execute("PRAGMA synchronous=FULL")
            # Destruction must erase key material from the file: with
            # secure_delete on, SQLite overwrites deleted content (cells and
            # freed pages) with zeros instead of just unlinking it. Older
            # copies can linger in the WAL until checkpoint() runs.
            conn.execute("PRAGMA secure_delete=ON")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            if not self._initialized:
                # journal_mode=WAL is persistent in the file; setting it again
                # is a no-op. It needs a moment with no other writer.
                row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if row is None or str(row[0]).lower() != "wal":
                    raise StorageError(f"cannot put {self._path} in WAL mode (got {row!r})")
                conn.execute(_SCHEMA)
                if self._versionstamps:
                    conn.execute(_STAMP_SCHEMA)
                self._initialized = True

        self._retrying(setup, f"opening {self._path}")

    def _retrying(self, fn: Callable[[], None], what: str) -> None:
        deadline = time.monotonic() + self._retry_seconds
        attempt = 0
        while True:
            try:
                fn()
                return
            except _Busy as exc:
                attempt += 1
                self._backoff(attempt, deadline, what, exc)
            except sqlite3.Error as exc:
                if not _is_busy(exc):
                    raise StorageError(f"{what}: sqlite error: {exc}") from exc
                attempt += 1
                self._backoff(attempt, deadline, what, exc)

    def _backoff(self, attempt: int, deadline: float, what: str, exc: BaseException) -> None:
        if time.monotonic() >= deadline:
            raise StorageError(
                f"{what}: database {self._path} stayed busy for {self._retry_seconds}s "
                f"({attempt} attempts): {exc}"
            ) from exc
        # Exponential backoff with full jitter, 1 ms doubling up to 100 ms.
        # This sleeps a worker thread, never the event loop.
        time.sleep(random.uniform(0, min(0.1, 0.001 * 2 ** min(attempt, 10))))  # noqa: S311

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                # A failed ROLLBACK leaves nothing committed; SQLite rolls the
                # transaction back itself when it cannot continue it.
                pass

    def _run_sync(self, body: Callable[[Transaction], T], read_only: bool) -> T:
        conn = self._connection()
        deadline = time.monotonic() + self._retry_seconds
        attempt = 0
        what = f"transaction on {self._path}"
        while True:
            try:
                conn.execute("BEGIN" if read_only else "BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._rollback(conn)
                if not _is_busy(exc):
                    raise StorageError(f"{what}: sqlite error: {exc}") from exc
                attempt += 1
                self._backoff(attempt, deadline, what, exc)
                continue
            tx = _SqliteTransaction(conn, read_only=read_only, versionstamps=self._versionstamps)
            try:
                try:
                    result = body(tx)
                finally:
                    tx.close()
                if not tx.busy:
                    tx.check_commit()
                    # A read-only transaction has nothing to commit.
                    conn.execute("ROLLBACK" if read_only else "COMMIT")
                    return result
                retry_exc: BaseException = _Busy("database busy")
            except _Busy as exc:
                retry_exc = exc
            except sqlite3.Error as exc:  # from COMMIT
                self._rollback(conn)
                if not _is_busy(exc):
                    raise StorageError(f"{what}: sqlite error: {exc}") from exc
                retry_exc = exc
            except Exception:
                self._rollback(conn)
                if not tx.busy:
                    raise
                # The body hit SQLITE_BUSY and then failed because of it
                # (e.g. wrapped the error): run it again.
                retry_exc = _Busy("database busy")
            except BaseException:
                self._rollback(conn)
                raise
            self._rollback(conn)
            attempt += 1
            self._backoff(attempt, deadline, what, retry_exc)

    def _checkpoint_sync(self) -> None:
        conn = self._connection()

        def checkpoint() -> None:
            row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if row is not None and row[0] != 0:
                # busy=1: a reader or writer prevented a full checkpoint.
                raise _Busy("checkpoint incomplete: another connection is using the WAL")

        self._retrying(checkpoint, f"checkpoint of {self._path}")
