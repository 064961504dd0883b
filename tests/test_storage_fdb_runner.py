"""The FoundationDB backend's retry loop, without libfdb_c.

libfdb_c and fdbserver can't be installed here, so these tests give FdbStore a
stand-in for the client library's Database and Transaction (``FakeClient``):
an in-memory map with FoundationDB's documented retry-loop contract, where a
test scripts which call fails with which error code. ``on_error`` follows
``fdb_error_predicate``: it returns (after resetting the transaction) for the
retryable and maybe-committed codes while the retry limit allows, and raises
otherwise. What is under test is Valv's own loop around it
(``FdbStore._run_sync``): what is run again, what is never run again (a
commit whose outcome is unknown), what a swallowed error does, which options
every attempt gets, and where snapshot reads go. The same loop against a real
cluster is in tests/test_storage_fdb.py, run when VALV_FDB_CLUSTER_FILE is set.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from valv.core.storage import StorageError, Transaction, keys
from valv.core.storage.fdb import (
    FdbCommitUnknownError,
    FdbConfig,
    FdbLimitExceededError,
    FdbStore,
    FdbUnavailableError,
)

# fdb_error_predicate(RETRYABLE): not committed for sure, or maybe committed.
RETRYABLE = {1007, 1009, 1020, 1037, 1038, 1042, 1051, 1078, 1213, 1223, 1235, 1021, 1039}


class FDBError(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(f"fdb error {code}")
        self.code = code


class Ready:
    """A future that is ready: ``wait()`` returns or raises at once."""

    def __init__(self, value: Any = None, error: FDBError | None = None) -> None:
        self.value = value
        self._error = error

    def wait(self) -> Any:
        if self._error is not None:
            raise self._error
        return self.value


@dataclass
class FakeClient:
    """The database: committed data, and the script of failures to inject."""

    data: dict[bytes, bytes] = field(default_factory=dict)
    fail: dict[str, list[int]] = field(default_factory=dict)  # op -> codes, first first
    commits: int = 0
    options: list[list[str]] = field(default_factory=list)  # per attempt
    snapshot_reads: int = 0

    def next_failure(self, op: str) -> FDBError | None:
        codes = self.fail.get(op)
        return FDBError(codes.pop(0)) if codes else None

    def create_transaction(self) -> FakeTransaction:
        return FakeTransaction(self)


class FakeSnapshot:
    def __init__(self, tr: FakeTransaction) -> None:
        self._tr = tr

    def get_range(self, begin: bytes, end: bytes, **kw: Any) -> list[Any]:
        self._tr.client.snapshot_reads += 1
        return self._tr.get_range(begin, end, **kw)


class FakeTransaction:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.retry_limit = -1
        self.retries = 0
        self.writes: dict[bytes, bytes | None] = {}
        self.options = types.SimpleNamespace(
            set_timeout=lambda ms: self._option(f"timeout={ms}"),
            set_retry_limit=self._set_retry_limit,
            set_automatic_idempotency=lambda: self._option("automatic_idempotency"))
        self.snapshot = FakeSnapshot(self)
        client.options.append([])

    def _option(self, text: str) -> None:
        self.client.options[-1].append(text)

    def _set_retry_limit(self, n: int) -> None:
        self.retry_limit = n
        self._option(f"retry_limit={n}")

    def _view(self) -> dict[bytes, bytes]:
        view = dict(self.client.data)
        for k, v in self.writes.items():
            if v is None:
                view.pop(k, None)
            else:
                view[k] = v
        return view

    def get(self, key: bytes) -> Ready:
        error = self.client.next_failure("get")
        if error is not None:
            raise error
        return Ready(self._view().get(key))

    def set(self, key: bytes, value: bytes) -> None:
        self.writes[key] = value

    def clear(self, key: bytes) -> None:
        self.writes[key] = None

    def clear_range(self, begin: bytes, end: bytes) -> None:
        for k in self._view():
            if begin <= k < end:
                self.writes[k] = None

    def get_range(self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False,
                  streaming_mode: Any = None) -> list[Any]:
        pairs = sorted((k, v) for k, v in self._view().items() if begin <= k < end)
        if reverse:
            pairs.reverse()
        if limit:
            pairs = pairs[:limit]
        return [types.SimpleNamespace(key=k, value=v) for k, v in pairs]

    def commit(self) -> Ready:
        error = self.client.next_failure("commit")
        if error is not None:
            return Ready(error=error)
        for k, v in self.writes.items():
            if v is None:
                self.client.data.pop(k, None)
            else:
                self.client.data[k] = v
        self.client.commits += 1
        return Ready()

    def on_error(self, error: FDBError) -> Ready:
        if error.code not in RETRYABLE or (0 <= self.retry_limit <= self.retries):
            return Ready(error=error)
        self.retries += 1
        self.writes = {}  # reset, as FoundationDB does before the next attempt
        self.client.options.append([])
        return Ready()


@pytest.fixture
def client() -> FakeClient:
    return FakeClient()


@pytest.fixture
def make_store(client: FakeClient) -> Iterator[Any]:
    stores: list[FdbStore] = []

    def make(**config: Any) -> FdbStore:
        store = FdbStore(FdbConfig(cluster_file="/nonexistent/fdb.cluster", **config))
        # The client library, as _database() would have loaded it.
        store._fdb = types.SimpleNamespace(
            FDBError=FDBError,
            StreamingMode=types.SimpleNamespace(exact="exact", want_all="want_all"))
        store._db = client
        stores.append(store)
        return store

    yield make
    for store in stores:
        store._executor.shutdown(wait=True)


K = keys.pack("k")


class Counter:
    def __init__(self) -> None:
        self.runs = 0


class CountingWrite(Counter):
    """A transaction body that writes K and counts how often it ran."""

    def __call__(self, tr: Transaction) -> None:
        self.runs += 1
        tr.set(K, b"v")


async def test_a_conflict_at_commit_runs_the_body_again(client: FakeClient,
                                                        make_store: Any) -> None:
    store = make_store()
    client.fail["commit"] = [1020]  # not_committed
    ran = Counter()

    def body(tr: Transaction) -> str:
        ran.runs += 1
        tr.set(K, b"v%d" % ran.runs)
        return "done"

    assert await store.run(body) == "done"
    assert ran.runs == 2 and client.commits == 1
    assert client.data[store.codec.pack(K)] == b"v2"  # the first attempt's write is gone


@pytest.mark.parametrize("code", [1021, 1022, 1031])
async def test_a_commit_of_unknown_outcome_is_never_run_again(client: FakeClient,
                                                              make_store: Any,
                                                              code: int) -> None:
    """commit_unknown_result (retryable to FDB), commit_unknown_result_fatal, and a
    timeout while committing: the body is not idempotent, so it is not rerun."""
    store = make_store()
    client.fail["commit"] = [code]
    body = ran = CountingWrite()
    with pytest.raises(FdbCommitUnknownError, match="may or may not have been committed"):
        await store.run(body)
    assert ran.runs == 1


async def test_a_swallowed_read_error_still_reruns_the_attempt(client: FakeClient,
                                                               make_store: Any) -> None:
    """The body catches the StorageError of a failed read and goes on: that attempt
    is not committed (it would write what a broken read decided); it is run again."""
    store = make_store()
    client.data[store.codec.pack(K)] = b"41"
    client.fail["get"] = [1007]  # transaction_too_old
    ran = Counter()

    def body(tr: Transaction) -> None:
        ran.runs += 1
        try:
            value = int(tr.get(K) or b"0")
        except StorageError:
            value = 0  # a careless default
        tr.set(K, b"%d" % (value + 1))

    await store.run(body)
    assert ran.runs == 2
    assert client.data[store.codec.pack(K)] == b"42"


async def test_a_limit_error_is_final_and_says_so(client: FakeClient, make_store: Any) -> None:
    store = make_store()
    client.fail["commit"] = [2101]  # transaction_too_large
    body = ran = CountingWrite()
    with pytest.raises(FdbLimitExceededError, match="10 MB"):
        await store.run(body)
    assert ran.runs == 1 and client.commits == 0


async def test_the_retry_limit_ends_a_conflict_storm(client: FakeClient,
                                                     make_store: Any) -> None:
    store = make_store(retry_limit=3)
    client.fail["commit"] = [1020] * 10
    body = ran = CountingWrite()
    with pytest.raises(FdbUnavailableError, match=r"not_committed.*4 attempt"):
        await store.run(body)
    assert ran.runs == 4 and client.commits == 0


@pytest.mark.parametrize("idempotency", [False, True])
async def test_every_attempt_gets_its_options(client: FakeClient, make_store: Any,
                                              idempotency: bool) -> None:
    store = make_store(timeout_ms=1234, retry_limit=7, automatic_idempotency=idempotency)
    client.fail["commit"] = [1020]
    await store.run(lambda tr: tr.set(K, b"v"))
    await store.run(lambda tr: tr.get(K), read_only=True)
    writes = ["timeout=1234", "retry_limit=7"] + (
        ["automatic_idempotency"] if idempotency else [])
    assert client.options == [writes, writes, ["timeout=1234", "retry_limit=7"]]


async def test_snapshot_reads_go_to_the_snapshot_view(client: FakeClient,
                                                      make_store: Any) -> None:
    store = make_store()
    client.data[store.codec.pack(keys.pack("s", 1))] = b"a"
    begin, end = keys.range_of("s")

    def body(tr: Transaction) -> tuple[Any, Any]:
        return tr.get_range_snapshot(begin, end), tr.get_range(begin, end)

    snapshot, plain = await store.run(body, read_only=True)
    assert snapshot == plain == [(keys.pack("s", 1), b"a")]
    assert client.snapshot_reads == 1


def test_automatic_idempotency_is_opt_in_from_the_url() -> None:
    from valv.core.storage.fdb import parse_url

    assert parse_url("fdb://").automatic_idempotency is False
    config = parse_url("fdb://?automatic_idempotency=1")
    assert config.automatic_idempotency is True
    assert parse_url(config.to_url()) == config
    with pytest.raises(StorageError, match="needs api_version 730"):
        parse_url("fdb://?automatic_idempotency=1&api_version=710")
    with pytest.raises(StorageError, match="automatic_idempotency"):
        parse_url("fdb://?automatic_idempotency=yes")
