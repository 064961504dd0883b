"""The FoundationDB backend.

Two halves:

- Against a real cluster: the conformance suite, plain and sealed, plus
  watches, prefix isolation and a keystore smoke test. Skipped unless
  ``VALV_FDB_CLUSTER_FILE`` names a cluster file (each test works under a
  prefix of its own and clears it afterwards).
- Everywhere, without libfdb_c: the pure parts of the backend (key prefixing,
  range translation, limits, URL parsing, the error table), that a fdb: URL
  without the client library fails clearly, and the change follower's use of
  watches, through a test Store (not a faked FDB transaction).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fdb.tuple
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.storage_conformance import (
    StaticSealKeys,
    StoreConformance,
    StoreOpener,
    all_pairs,
    get,
    put,
)
from valv.core import changelog, records
from valv.core.clock import FakeClock
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.storage import (
    MAX_KEY_BYTES,
    MAX_TRANSACTION_BYTES,
    MAX_VALUE_BYTES,
    LimitExceededError,
    StorageError,
    Store,
    Transaction,
    keys,
    open_store,
)
from valv.core.storage import fdb as fdb_backend
from valv.core.storage.fdb import (
    FdbClientMissingError,
    FdbCommitUnknownError,
    FdbConfig,
    FdbErrorKind,
    FdbInternalError,
    FdbLimitExceededError,
    FdbStore,
    FdbUnavailableError,
    KeyCodec,
    TransactionBudget,
    check_value,
    classify,
    error_for,
    parse_url,
)
from valv.core.storage.journal import journaled_store
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

CLUSTER_FILE = os.environ.get("VALV_FDB_CLUSTER_FILE", "")
needs_cluster = pytest.mark.skipif(
    not CLUSTER_FILE,
    reason="VALV_FDB_CLUSTER_FILE is not set: no FoundationDB cluster to test against",
)


def _client_library_loads() -> bool:
    try:
        importlib.import_module("fdb.impl")
    except Exception:
        return False
    return True


def _cluster_url(prefix: str) -> str:
    return f"fdb://{quote(os.path.abspath(CLUSTER_FILE))}?prefix={prefix}"


@pytest.fixture
async def cluster_prefix() -> AsyncIterator[str]:
    """A prefix no other test uses; everything under it is cleared afterwards."""
    prefix = f"valv-test-{uuid.uuid4().hex[:16]}"
    yield prefix
    store = await open_store(_cluster_url(prefix))
    try:
        await store.run(lambda tx: tx.clear_range(b"", b"\xff"))
    finally:
        await store.close()


def _raw(store: Store) -> FdbStore:
    inner = store.inner if isinstance(store, SealedStore) else store
    assert isinstance(inner, FdbStore)
    return inner


class _FdbLimits:
    """The key limit on FoundationDB leaves room for the deployment's prefix."""

    async def test_key_limit(self, store: Store) -> None:
        limit = _raw(store).max_key_bytes
        assert limit == MAX_KEY_BYTES - len(fdb.tuple.pack((_raw(store).config.prefix,)))
        ok = b"k" * limit
        await put(store, (ok, b"v"))
        assert await get(store, ok) == b"v"

        def body(tx: Transaction) -> None:
            tx.set(keys.pack("sibling"), b"v")
            tx.set(ok + b"k", b"v")

        with pytest.raises(LimitExceededError, match="prefix"):
            await store.run(body)
        assert await all_pairs(store) == [(ok, b"v")]


@needs_cluster
class TestFdbStore(_FdbLimits, StoreConformance):
    @pytest.fixture
    def store_opener(self, cluster_prefix: str) -> StoreOpener:
        async def open_() -> Store:
            return await open_store(_cluster_url(cluster_prefix))

        return open_


@needs_cluster
class TestSealedFdbStore(_FdbLimits, StoreConformance):
    @pytest.fixture
    def store_opener(self, cluster_prefix: str) -> StoreOpener:
        sealer = Sealer(StaticSealKeys(("0123456789abcdef", bytes(range(32)))))

        async def open_() -> Store:
            return SealedStore(await open_store(_cluster_url(cluster_prefix)), sealer)

        return open_


# -- against a cluster: watches, prefixes, the keystore --------------------------------


@needs_cluster
async def test_a_watch_reports_a_change(cluster_prefix: str) -> None:
    store = await open_store(_cluster_url(cluster_prefix))
    key = keys.pack("watched")
    try:
        assert store.supports_watches
        waiting = asyncio.ensure_future(store.wait_for_change(key, 30))
        # The watch compares against the value when it was set, which may be
        # after a first write: keep writing until it fires.
        n = 0
        while not waiting.done():
            n += 1
            await put(store, (key, b"%d" % n))
            await asyncio.wait({waiting}, timeout=0.05)
        assert waiting.result() is True
    finally:
        await store.close()


@needs_cluster
@pytest.mark.parametrize("snapshot", [True, False])
async def test_a_snapshot_read_is_not_aborted_by_a_writer_in_its_range(
        cluster_prefix: str, snapshot: bool) -> None:
    """What the versionstamp sequencers rely on: a reader of a staging range that
    another transaction writes into meanwhile commits at once if its read was a
    snapshot read, and is run again (a conflict) if it was not."""
    store = await open_store(_cluster_url(cluster_prefix))
    begin, end = keys.range_of("stage")
    runs = 0
    read_done, written = threading.Event(), threading.Event()

    def reader(tx: Transaction) -> int:
        nonlocal runs
        runs += 1
        pairs = (tx.get_range_snapshot(begin, end) if snapshot
                 else tx.get_range(begin, end))
        if runs == 1:
            read_done.set()
            assert written.wait(30)
        tx.set(keys.pack("head"), b"%d" % len(pairs))
        return len(pairs)

    try:
        reading = asyncio.ensure_future(store.run(reader))
        await asyncio.to_thread(read_done.wait, 30)
        await put(store, (keys.pack("stage", 1), b"staged meanwhile"))
        written.set()
        await reading
        assert runs == (1 if snapshot else 2)
    finally:
        await store.close()


@needs_cluster
async def test_a_watch_times_out_without_a_change(cluster_prefix: str) -> None:
    store = await open_store(_cluster_url(cluster_prefix))
    try:
        assert await store.wait_for_change(keys.pack("quiet"), 0.3) is False
    finally:
        await store.close()


@needs_cluster
async def test_prefixes_share_a_cluster_without_seeing_each_other(cluster_prefix: str) -> None:
    # "p" and "p2": one prefix is a string prefix of the other.
    other_prefix = cluster_prefix + "2"
    a = await open_store(_cluster_url(cluster_prefix))
    b = await open_store(_cluster_url(other_prefix))
    try:
        k = keys.pack("ck", "p", "l", "r", "k")
        await put(a, (k, b"from a"))
        await put(b, (k, b"from b"), (keys.pack("only-b"), b"b"))
        assert await all_pairs(a) == [(k, b"from a")]
        await a.run(lambda tx: tx.clear_range(b"", b"\xff"))
        assert await all_pairs(a) == []
        assert await all_pairs(b) == sorted([(k, b"from b"), (keys.pack("only-b"), b"b")])
    finally:
        await b.run(lambda tx: tx.clear_range(b"", b"\xff"))
        await a.close()
        await b.close()


@needs_cluster
async def test_the_keystore_and_the_change_follower_on_fdb(cluster_prefix: str) -> None:
    from valv.core.keystore import KeyStore, KeystoreSettings, NewCryptoKey

    ring = RootKeyring([RootKey(b"\x01" * 32)])
    store = journaled_store(await open_store(_cluster_url(cluster_prefix)), Sealer(ring),
                            lambda: 0)
    clock = FakeClock()
    ks = KeyStore(store, ring, clock, KeystoreSettings(use_cache_ttl=timedelta(0)))
    recorder = _Recorder()
    # A poll interval of an hour: only the watch can bring the change in time.
    follower = changelog.ChangeFollower(store, clock, [recorder], poll_interval_s=3600)
    stop = asyncio.Event()
    try:
        location = "projects/p/locations/global"
        await ks.create_key_ring(location, "r")
        await ks.create_crypto_key(f"{location}/keyRings/r", "k", NewCryptoKey(purpose=1))
        name = f"{location}/keyRings/r/cryptoKeys/k"
        encrypted = await ks.encrypt(name, b"secret", b"aad")
        assert (await ks.decrypt(name, encrypted.ciphertext, b"aad")).plaintext == b"secret"
        await follower.start()
        task = asyncio.create_task(follower.run(stop))
        # A change committed before the follower's watch is set is only seen
        # at the next poll (an hour here): keep changing until one arrives.
        seen = asyncio.ensure_future(recorder.seen.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not seen.done() and loop.time() < deadline:
            await ks.create_crypto_key_version(name)
            await asyncio.wait({seen}, timeout=0.1)
        assert seen.done()
        assert recorder.changes[0].kind in (changelog.VERSION, changelog.CRYPTO_KEY)
        stop.set()
        await task
    finally:
        await store.close()


# -- key prefixing and ranges (pure) ----------------------------------------------------------

prefixes = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
logical_keys = st.binary(max_size=40).filter(lambda k: not k.startswith(b"\xff"))


def test_the_prefix_is_a_packed_tuple_computed_once() -> None:
    codec = KeyCodec("valv")
    assert codec.raw_prefix == fdb.tuple.pack(("valv",)) == b"\x02valv\x00"
    assert codec.pack(keys.pack("kr", "p")) == b"\x02valv\x00" + keys.pack("kr", "p")
    assert codec.max_key_bytes == MAX_KEY_BYTES - 6


@given(prefix=prefixes, key=logical_keys)
def test_packing_and_stripping_round_trip(prefix: str, key: bytes) -> None:
    codec = KeyCodec(prefix)
    stored = codec.pack(key)
    assert stored.startswith(codec.raw_prefix)
    assert codec.unpack(stored) == key


@given(prefix=prefixes, a=logical_keys, b=logical_keys)
def test_packing_keeps_key_order(prefix: str, a: bytes, b: bytes) -> None:
    codec = KeyCodec(prefix)
    assert (a < b) == (codec.pack(a) < codec.pack(b))


def test_unpacking_a_key_from_elsewhere_is_an_error() -> None:
    with pytest.raises(StorageError, match="outside the prefix"):
        KeyCodec("valv").unpack(KeyCodec("valv2").pack(b"k"))
    with pytest.raises(StorageError, match="outside the prefix"):
        KeyCodec("valv").unpack(b"\x02val")


@pytest.mark.parametrize(("mine", "theirs"), [
    ("valv", "valv2"), ("valv", "valv-"), ("valv", "valv.x"), ("a", "a0"), ("a", "b"),
    ("valv2", "valv"),
])
@given(mine_key=logical_keys, their_key=logical_keys)
def test_a_subspace_holds_its_keys_and_none_of_another_prefix(
    mine: str, theirs: str, mine_key: bytes, their_key: bytes
) -> None:
    a, b = KeyCodec(mine), KeyCodec(theirs)
    begin, end = a.subspace()
    assert begin <= a.pack(mine_key) < end
    assert not begin <= b.pack(their_key) < end


@given(mine=prefixes, theirs=prefixes, mine_key=logical_keys, their_key=logical_keys)
def test_subspaces_of_distinct_prefixes_are_disjoint(
    mine: str, theirs: str, mine_key: bytes, their_key: bytes
) -> None:
    a, b = KeyCodec(mine), KeyCodec(theirs)
    begin, end = a.subspace()
    assert begin <= a.pack(mine_key) < end
    assert (begin <= b.pack(their_key) < end) == (mine == theirs)


def test_whole_keyspace_bounds_translate_to_the_subspace() -> None:
    codec = KeyCodec("valv")
    assert codec.range(b"", b"\xff") == (b"\x02valv\x00", b"\x02valv\x00\xff")
    assert codec.range(b"", b"\xff") == codec.subspace()
    begin, end = keys.range_of("kr", "p")
    assert codec.range(begin, end) == (codec.raw_prefix + begin, codec.raw_prefix + end)


@given(prefix=prefixes, key=logical_keys, lo=st.binary(max_size=40), hi=st.binary(max_size=40))
def test_range_translation_keeps_membership(prefix: str, key: bytes, lo: bytes,
                                            hi: bytes) -> None:
    codec = KeyCodec(prefix)
    hi = min(hi, b"\xff")
    begin, end = codec.range(lo, hi)
    assert (lo <= key < hi) == (begin <= codec.pack(key) < end)


def test_range_bounds_are_checked() -> None:
    codec = KeyCodec("valv")
    with pytest.raises(StorageError, match="past the"):
        codec.range(b"", b"\xff\x00")
    with pytest.raises(TypeError):
        codec.range("a", b"b")  # type: ignore[arg-type]


# -- limits (pure) --------------------------------------------------------------------------


def test_the_key_limit_counts_the_prefix() -> None:
    codec = KeyCodec("valv")
    biggest = b"k" * codec.max_key_bytes
    assert len(codec.pack(biggest)) == MAX_KEY_BYTES
    with pytest.raises(LimitExceededError, match=r"limit 9994 here.*6 for the key prefix 'valv'"):
        codec.pack(biggest + b"k")
    # A key sqlite accepts but that cannot fit behind the prefix.
    with pytest.raises(LimitExceededError):
        codec.pack(b"k" * MAX_KEY_BYTES)


@given(prefix=prefixes)
def test_every_accepted_key_fits_foundationdb(prefix: str) -> None:
    codec = KeyCodec(prefix)
    assert len(codec.pack(b"k" * codec.max_key_bytes)) == MAX_KEY_BYTES
    with pytest.raises(LimitExceededError):
        codec.check_key(b"k" * (codec.max_key_bytes + 1))


def test_keys_are_bytes_outside_the_system_keyspace() -> None:
    codec = KeyCodec("valv")
    with pytest.raises(StorageError, match="reserved"):
        codec.pack(b"\xff/system")
    with pytest.raises(TypeError):
        codec.pack("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.pack(bytearray(b"k"))  # type: ignore[arg-type]


def test_the_value_limit() -> None:
    k = keys.pack("big")
    assert check_value(k, b"x" * MAX_VALUE_BYTES) == b"x" * MAX_VALUE_BYTES
    assert check_value(k, bytearray(b"v")) == b"v"
    with pytest.raises(LimitExceededError, match=re.escape(keys.describe(k))):
        check_value(k, b"x" * (MAX_VALUE_BYTES + 1))
    with pytest.raises(TypeError):
        check_value(k, "text")  # type: ignore[arg-type]


def test_write_costs_count_the_prefix_and_conflict_ranges() -> None:
    codec = KeyCodec("valv")
    k, v = keys.pack("k"), b"value"
    stored = codec.pack(k)
    assert fdb_backend.set_cost(stored, v) == 3 * len(stored) + len(v) + 1
    assert fdb_backend.set_cost(stored, v) - fdb_backend.set_cost(k, v) == 3 * 6
    assert fdb_backend.clear_cost(stored) == 2 * (2 * len(stored) + 1)
    begin, end = codec.range(b"", b"\xff")
    assert fdb_backend.clear_range_cost(begin, end) == 2 * (6 + 7)
    assert fdb_backend.read_cost(stored) == 2 * len(stored) + 1
    assert fdb_backend.range_read_cost(begin, end) == 13


def test_the_transaction_budget() -> None:
    budget = TransactionBudget()
    assert budget.limit == MAX_TRANSACTION_BYTES
    codec = KeyCodec("valv")
    chunk = b"z" * (MAX_VALUE_BYTES - 100)
    i = 0
    with pytest.raises(LimitExceededError, match=r"writing \('bulk', \d+\) would bring it"):
        while True:
            k = keys.pack("bulk", i)
            budget.charge(fdb_backend.set_cost(codec.pack(k), chunk), f"writing {keys.describe(k)}")
            i += 1
    assert i == MAX_TRANSACTION_BYTES // fdb_backend.set_cost(codec.pack(keys.pack("bulk", 0)),
                                                             chunk)
    assert budget.used <= MAX_TRANSACTION_BYTES
    # Over once, over for good: a body that catches the error cannot commit.
    with pytest.raises(LimitExceededError):
        budget.charge(1, "writing a little more")
    with pytest.raises(LimitExceededError):
        budget.check_commit()


def test_a_budget_exactly_at_the_limit_commits() -> None:
    budget = TransactionBudget(limit=100)
    budget.charge(60, "a")
    budget.charge(40, "b")
    budget.check_commit()
    with pytest.raises(LimitExceededError, match="101 bytes"):
        budget.charge(1, "c")


# -- URLs (pure) -------------------------------------------------------------------------


def test_default_url_forms() -> None:
    assert parse_url("fdb://") == FdbConfig()
    assert parse_url("fdb:") == FdbConfig()
    assert parse_url("FDB://") == FdbConfig()
    assert FdbConfig() == FdbConfig(None, 730, "valv", 5000, 100)
    assert FdbConfig().to_url() == "fdb://"


def test_cluster_file_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_url("fdb:///etc/foundationdb/fdb.cluster").cluster_file == (
        "/etc/foundationdb/fdb.cluster")
    assert parse_url("fdb:/etc/foundationdb/fdb.cluster").cluster_file == (
        "/etc/foundationdb/fdb.cluster")
    assert parse_url("fdb:///srv/my%20cluster/fdb.cluster").cluster_file == (
        "/srv/my cluster/fdb.cluster")
    monkeypatch.chdir(tmp_path)
    assert parse_url("fdb:conf/fdb.cluster").cluster_file == str(tmp_path / "conf/fdb.cluster")


def test_parameters() -> None:
    config = parse_url("fdb:///etc/fdb.cluster?prefix=valv-prod&api_version=710"
                       "&timeout_ms=15000&retry_limit=0")
    assert config == FdbConfig("/etc/fdb.cluster", 710, "valv-prod", 15000, 0)
    assert config.to_url() == ("fdb:///etc/fdb.cluster?prefix=valv-prod&api_version=710"
                               "&timeout_ms=15000&retry_limit=0")
    assert parse_url("fdb://?api_version=0730").api_version == 730


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite:///x.db", "not an fdb: URL"),
    ("fdb://host/fdb.cluster", "no host"),
    ("fdb://user@host", "no host"),
    ("fdb://[::1", "malformed"),
    ("fdb:///etc/fdb.cluster#x", "no fragment"),
    ("fdb:///etc/fdb.cluster#", "no fragment"),
    ("fdb:///etc/fdb.cluster?", "empty query"),
    ("fdb:///etc/", "is a directory"),
    ("fdb:///etc/fdb%00.cluster", "NUL"),
    ("fdb://?tenant=t", "unknown parameter 'tenant'"),
    ("fdb://?Prefix=x", "unknown parameter 'Prefix'"),
    ("fdb://?=x", "unknown parameter ''"),
    ("fdb://?prefix", "malformed parameters"),
    ("fdb://?prefix=a&&api_version=730", "malformed parameters"),
    ("fdb://?prefix=a&prefix=b", "given twice"),
    ("fdb://?prefix=", "prefix is empty"),
    ("fdb://?prefix=a/b", "prefix 'a/b' is not valid"),
    ("fdb://?prefix=-valv", "is not valid"),
    ("fdb://?prefix=v%C3%A4lv", "is not valid"),
    ("fdb://?prefix=a+b", "is not valid"),
    ("fdb://?prefix=" + "v" * 65, "is not valid"),
    ("fdb://?api_version=", "api_version='' is not valid"),
    ("fdb://?api_version=abc", "api_version='abc' is not valid: an integer from 630"),
    ("fdb://?api_version=520", "from 630 to"),
    ("fdb://?api_version=99999", "is not valid"),
    ("fdb://?api_version=%20730", "is not valid"),
    ("fdb://?api_version=7_30", "is not valid"),
    ("fdb://?api_version=%D9%A7%D9%A3%D9%A0", "is not valid"),  # Arabic-Indic digits
    ("fdb://?api_version=-730", "is not valid"),
    ("fdb://?timeout_ms=0", "timeout_ms='0' is not valid"),
    ("fdb://?timeout_ms=600001", "is not valid"),
    ("fdb://?retry_limit=-1", "retry_limit='-1' is not valid"),
])
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=re.escape(message)):
        parse_url(url)


def test_the_newest_api_version_is_the_bindings() -> None:
    newest = fdb_backend.MAX_API_VERSION
    assert newest == fdb.LATEST_API_VERSION
    assert parse_url(f"fdb://?api_version={newest}").api_version == newest
    with pytest.raises(StorageError, match="api_version"):
        parse_url(f"fdb://?api_version={newest + 1}")


path_text = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00"),  # utf-8: no surrogates
    min_size=1, max_size=30,
).filter(lambda p: not p.endswith("/"))
configs = st.builds(
    FdbConfig,
    cluster_file=st.none() | path_text.map(lambda p: os.path.abspath("/" + p)),
    api_version=st.integers(fdb_backend.MIN_API_VERSION, fdb_backend.MAX_API_VERSION),
    prefix=prefixes,
    timeout_ms=st.integers(1, fdb_backend.MAX_TIMEOUT_MS),
    retry_limit=st.integers(0, fdb_backend.MAX_RETRY_LIMIT),
)


@settings(max_examples=300)
@given(config=configs)
def test_urls_round_trip(config: FdbConfig) -> None:
    assert parse_url(config.to_url()) == config


@settings(max_examples=500)
@given(url=st.text(max_size=60) | st.text(max_size=60).map(lambda t: "fdb:" + t)
       | st.text(max_size=60).map(lambda t: "fdb://?" + t))
def test_the_parser_only_ever_raises_storage_error(url: str) -> None:
    try:
        config = parse_url(url)
    except StorageError:
        return
    assert isinstance(config, FdbConfig)
    assert config.cluster_file is None or os.path.isabs(config.cluster_file)


@given(prefix=st.text(max_size=70))
def test_a_prefix_is_accepted_exactly_when_it_is_valid(prefix: str) -> None:
    valid = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", prefix) is not None
    try:
        config = parse_url("fdb://?prefix=" + quote(prefix, safe=""))
    except StorageError:
        assert not valid
    else:
        assert valid and config.prefix == prefix


@given(name=st.text(st.characters(codec="ascii"), min_size=1, max_size=12).filter(
    lambda n: n not in ("api_version", "prefix", "retry_limit", "timeout_ms")))
def test_unknown_parameters_are_refused(name: str) -> None:
    with pytest.raises(StorageError):
        parse_url(f"fdb://?{quote(name, safe='')}=1")


@given(value=st.integers(-10**6, 10**6))
def test_api_versions_are_range_checked(value: int) -> None:
    ok = fdb_backend.MIN_API_VERSION <= value <= fdb_backend.MAX_API_VERSION
    try:
        config = parse_url(f"fdb://?api_version={value}")
    except StorageError:
        assert not ok
    else:
        assert ok and config.api_version == value


# -- the error table (pure) --------------------------------------------------------------

RETRYABLE_NOT_COMMITTED = {1007, 1009, 1020, 1037, 1038, 1042, 1051, 1078, 1213, 1223, 1235}


def test_retryable_codes_follow_foundationdb() -> None:
    for code in RETRYABLE_NOT_COMMITTED:
        info = classify(code)
        assert info.kind is FdbErrorKind.RETRYABLE and info.retryable, code
        assert not info.maybe_committed
    for code in (1021, 1039):
        info = classify(code)
        assert info.kind is FdbErrorKind.MAYBE_COMMITTED and info.retryable
        assert info.maybe_committed
    retryable = {c for c in fdb_backend._ERRORS if classify(c).retryable}
    assert retryable == RETRYABLE_NOT_COMMITTED | {1021, 1039}
    # commit_unknown_result_fatal: not retried, and unknown if raised by a commit.
    assert not classify(1022).retryable
    assert 1022 in fdb_backend._UNKNOWN_IF_COMMITTING


@pytest.mark.parametrize(("code", "name", "kind"), [
    (1020, "not_committed", FdbErrorKind.RETRYABLE),
    (1021, "commit_unknown_result", FdbErrorKind.MAYBE_COMMITTED),
    (1007, "transaction_too_old", FdbErrorKind.RETRYABLE),
    (1009, "future_version", FdbErrorKind.RETRYABLE),
    (1031, "transaction_timed_out", FdbErrorKind.UNAVAILABLE),
    (1037, "process_behind", FdbErrorKind.RETRYABLE),
    (1213, "tag_throttled", FdbErrorKind.RETRYABLE),
    (1515, "no_cluster_file_found", FdbErrorKind.UNAVAILABLE),
    (2104, "connection_string_invalid", FdbErrorKind.UNAVAILABLE),
    (2101, "transaction_too_large", FdbErrorKind.LIMIT),
    (2102, "key_too_large", FdbErrorKind.LIMIT),
    (2103, "value_too_large", FdbErrorKind.LIMIT),
    (2005, "inverted_range", FdbErrorKind.BUG),
    (4100, "internal_error", FdbErrorKind.BUG),
])
def test_known_codes(code: int, name: str, kind: FdbErrorKind) -> None:
    info = classify(code)
    assert (info.code, info.name, info.kind) == (code, name, kind)
    assert info.hint


def test_the_table_is_well_formed() -> None:
    names = [name for name, _, _ in fdb_backend._ERRORS.values()]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z_]+", n) for n in names)
    # Hints are spliced into sentences: no trailing full stop.
    assert all(hint and not hint.endswith(".") for _, _, hint in fdb_backend._ERRORS.values())


@pytest.mark.parametrize(("code", "kind"), [
    (1999, FdbErrorKind.UNAVAILABLE), (1599, FdbErrorKind.UNAVAILABLE),
    (2999, FdbErrorKind.BUG), (4999, FdbErrorKind.BUG), (9999, FdbErrorKind.UNAVAILABLE),
])
def test_unknown_codes_are_classified_by_range(code: int, kind: FdbErrorKind) -> None:
    info = classify(code)
    assert info.name == "unknown" and info.kind is kind and not info.retryable


@given(code=st.integers(0, 10_000), during_commit=st.booleans(), attempts=st.integers(1, 200))
def test_every_error_becomes_a_storage_error(code: int, during_commit: bool,
                                             attempts: int) -> None:
    exc = error_for(code, what="transaction on x", during_commit=during_commit,
                    attempts=attempts)
    assert isinstance(exc, StorageError)
    assert exc.code == code
    assert str(exc).startswith("transaction on x: FoundationDB error ")
    assert f"({code})" in str(exc)


def test_error_messages() -> None:
    timeout = error_for(1031, what="transaction on c", description="Operation aborted")
    assert type(timeout) is FdbUnavailableError
    assert "transaction_timed_out (1031) [Operation aborted]" in str(timeout)
    assert "timeout_ms" in str(timeout) and "fdbcli --exec status" in str(timeout)

    conflicts = error_for(1020, what="t", attempts=101)
    assert type(conflicts) is FdbUnavailableError
    assert "still failing after 101 attempt(s)" in str(conflicts)

    for code in (1021, 1031, 1039):
        unknown = error_for(code, what="t", during_commit=True)
        assert isinstance(unknown, FdbCommitUnknownError)
        assert isinstance(unknown, FdbUnavailableError)
        assert "may or may not have been committed" in str(unknown)
        assert "not run again" in str(unknown)
    # The same timeout while reading is just a timeout.
    assert type(error_for(1031, what="t")) is FdbUnavailableError

    too_large = error_for(2101, what="t")
    assert isinstance(too_large, FdbLimitExceededError)
    assert isinstance(too_large, LimitExceededError)

    bug = error_for(2005, what="t")
    assert isinstance(bug, FdbInternalError)
    assert "bug" in str(bug)

    missing = error_for(1515, what="t")
    assert "FDB_CLUSTER_FILE" in str(missing)


# -- without libfdb_c ---------------------------------------------------------------------


@pytest.mark.skipif(_client_library_loads(), reason="libfdb_c is installed on this host")
@pytest.mark.parametrize("url", ["fdb://", "fdb:///etc/foundationdb/fdb.cluster?prefix=valv"])
async def test_opening_fdb_without_the_client_library(url: str) -> None:
    for _ in range(2):  # the failed load leaves nothing half-done behind
        with pytest.raises(FdbClientMissingError) as info:
            await open_store(url)
        message = str(info.value)
        assert "FoundationDB client library (libfdb_c) is not installed" in message
        assert "foundationdb-clients" in message and "releases" in message
        assert "sqlite:" in message and "embedded default" in message
        assert "docs/foundationdb.md" in message


@pytest.mark.skipif(_client_library_loads(), reason="libfdb_c is installed on this host")
async def test_a_watch_without_the_client_library() -> None:
    store = FdbStore(parse_url("fdb://"))
    try:
        with pytest.raises(FdbClientMissingError):
            await store.wait_for_change(keys.pack("k"), 1)
    finally:
        await store.close()


async def test_an_fdb_store_does_no_io_until_used() -> None:
    store = FdbStore(parse_url("fdb:///nonexistent/fdb.cluster?prefix=p1"))
    assert store.url == "fdb:///nonexistent/fdb.cluster?prefix=p1"
    assert store.supports_watches
    assert store.max_key_bytes == MAX_KEY_BYTES - len(b"\x02p1\x00")
    assert await store.wait_for_change(keys.pack("k"), 0) is False
    await store.close()
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        await store.run(lambda tx: None)
    with pytest.raises(StorageError, match="closed"):
        await store.wait_for_change(keys.pack("k"), 1)


# -- watches and the change follower (no FoundationDB needed) --------------------------------


async def test_sqlite_has_no_watches(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "valv.db")
    try:
        assert not store.supports_watches
        assert await store.wait_for_change(records.CHANGE_HEAD_KEY, 3600) is False
    finally:
        await store.close()


class _WatchingStore(Store):
    """A SqliteStore that claims watches, driven by the test: not an FDB double."""

    def __init__(self, path: Path, *, versionstamps: bool = False) -> None:
        self.inner = SqliteStore(path, versionstamps=versionstamps)
        self.calls: list[tuple[bytes, float]] = []
        self.change = asyncio.Event()
        self.called = asyncio.Event()
        self.answered = asyncio.Event()
        self.behaviour: Callable[[], bool] | None = None

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def supports_watches(self) -> bool:
        return True

    @property
    def supports_versionstamps(self) -> bool:
        return self.inner.supports_versionstamps

    async def run(self, body: Callable[[Transaction], Any], *, read_only: bool = False) -> Any:
        return await self.inner.run(body, read_only=read_only)

    async def wait_for_change(self, key: bytes, timeout_s: float, *,
                              armed: asyncio.Event | None = None) -> bool:
        self.calls.append((key, timeout_s))
        self.called.set()
        if armed is not None:
            armed.set()
        try:
            if self.behaviour is not None:
                return self.behaviour()
            try:
                await asyncio.wait_for(self.change.wait(), timeout_s)
            except TimeoutError:
                return False
            self.change.clear()
            return True
        finally:
            self.answered.set()

    async def close(self) -> None:
        await self.inner.close()


class _Recorder:
    def __init__(self) -> None:
        self.changes: list[changelog.Change] = []
        self.seen = asyncio.Event()

    def changed(self, change: changelog.Change) -> None:
        self.changes.append(change)
        self.seen.set()

    def reset(self) -> None:
        pass


async def _append(store: Store, resource: str) -> None:
    await store.run(lambda tr: changelog.append(tr, 1, changelog.KEY_RING, resource))


@pytest.mark.parametrize("stacked", [False, True], ids=["raw", "sealed-and-journaled"])
async def test_the_follower_waits_on_a_watch_of_the_head(tmp_path: Path, stacked: bool) -> None:
    store = _WatchingStore(tmp_path / "valv.db")
    recorder = _Recorder()
    # As central stacks it: sealing and the journal hand watches through.
    followed: Store = (journaled_store(store, Sealer(RootKeyring([RootKey(b"\x01" * 32)])),
                                       lambda: 0) if stacked else store)
    # An hour between polls: only the watch can bring the change in.
    follower = changelog.ChangeFollower(followed, FakeClock(), [recorder],
                                        poll_interval_s=3600)
    stop = asyncio.Event()
    try:
        await follower.start()
        task = asyncio.create_task(follower.run(stop))
        await asyncio.wait_for(store.called.wait(), 10)
        assert store.calls[0] == (records.CHANGE_HEAD_KEY, 3600)
        await _append(followed, "projects/p/locations/global/keyRings/r")
        store.change.set()
        await asyncio.wait_for(recorder.seen.wait(), 10)
        assert [c.resource for c in recorder.changes] == ["projects/p/locations/global/keyRings/r"]
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await store.close()


async def test_a_watch_timing_out_early_does_not_end_the_wait(tmp_path: Path) -> None:
    store = _WatchingStore(tmp_path / "valv.db")
    store.behaviour = lambda: False  # as if the watch's own timeout had passed
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=3600)
    stop = asyncio.Event()
    try:
        idle = asyncio.create_task(follower._idle(stop))
        await asyncio.wait_for(store.answered.wait(), 10)
        for _ in range(10):
            await asyncio.sleep(0)  # let _idle see the answer
        assert not idle.done()
        follower.wake()
        await asyncio.wait_for(idle, 10)
        assert len(store.calls) == 1
    finally:
        await store.close()


async def test_a_change_before_the_watch_is_armed_is_not_missed(tmp_path: Path) -> None:
    """A change committed after the last poll but before the watch is in place
    never fires the watch: the head, read again once it is armed, shows it."""
    store = _WatchingStore(tmp_path / "valv.db")
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=3600)
    try:
        await follower.start()
        await _append(store, "projects/p/locations/global/keyRings/between")
        # The watch never fires (store.change is never set), the fallback is an hour.
        await asyncio.wait_for(follower._idle(asyncio.Event()), 10)
        assert len(store.calls) == 1
    finally:
        await store.close()


async def test_staged_audit_records_are_numbered_without_a_change_to_the_log(
        tmp_path: Path) -> None:
    """On FoundationDB the follower reads the log only when its head moves; audit
    records (data access, denials) don't move it, yet are chained within the poll
    interval. Here the watch never fires and nobody calls wake()."""
    from valv.core.audit import AuditEntry, AuditLog, RecordKind

    raw = _WatchingStore(tmp_path / "valv.db", versionstamps=True)
    store = journaled_store(raw, Sealer(RootKeyring([RootKey(b"\x01" * 32)])), lambda: 0)
    clock = FakeClock()
    log = AuditLog(store, clock)
    follower = changelog.ChangeFollower(store, clock, [], poll_interval_s=0.02,
                                        watch_fallback_s=3600, sequencers=[log.chain])
    stop = asyncio.Event()
    try:
        await log.open()
        await follower.start()
        task = asyncio.create_task(follower.run(stop))
        await asyncio.wait_for(raw.called.wait(), 10)  # idle on the watch
        await log.write([AuditEntry(kind=RecordKind.ADMIN_ACTIVITY, principal="user:a@x.com",
                                    auth_method="token", rpc="Staged", resource="projects/p")])

        async def chained() -> None:
            while True:
                head = await log.head()
                if head is not None and head.seq == 1:
                    return
                await asyncio.sleep(0.01)

        await asyncio.wait_for(chained(), 10)
        assert not raw.change.is_set() and len(raw.calls) == 1  # the watch never fired
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await store.close()


async def test_a_watching_follower_does_not_poll_at_the_poll_interval(tmp_path: Path) -> None:
    store = _WatchingStore(tmp_path / "valv.db")
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=0.2)
    try:
        await follower.start()
        idle = asyncio.create_task(follower._idle(asyncio.Event()))
        await asyncio.wait_for(store.called.wait(), 10)
        # The only bound on the wait is the fallback, not the 0.2 s poll interval.
        assert store.calls == [(records.CHANGE_HEAD_KEY, changelog.WATCH_FALLBACK_S)]
        follower.wake()
        await asyncio.wait_for(idle, 10)
    finally:
        await store.close()


async def test_a_failing_watch_falls_back_to_the_poll_interval(tmp_path: Path) -> None:
    store = _WatchingStore(tmp_path / "valv.db")

    def fail() -> bool:
        raise StorageError("watch refused")

    store.behaviour = fail
    interval = 0.05
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=interval,
                                        watch_fallback_s=interval)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        await asyncio.wait_for(follower._idle(asyncio.Event()), 10)
        # Not a tight loop: one watch, then the rest of the interval.
        assert loop.time() - started >= interval * 0.9
        assert len(store.calls) == 1
    finally:
        await store.close()


async def test_stop_and_wake_still_end_a_wait_on_a_watch(tmp_path: Path) -> None:
    store = _WatchingStore(tmp_path / "valv.db")
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=3600)
    try:
        stop = asyncio.Event()
        idle = asyncio.create_task(follower._idle(stop))
        await asyncio.wait_for(store.called.wait(), 10)
        stop.set()
        await asyncio.wait_for(idle, 10)
        store.called.clear()
        idle = asyncio.create_task(follower._idle(asyncio.Event()))
        await asyncio.wait_for(store.called.wait(), 10)
        follower.wake()
        await asyncio.wait_for(idle, 10)
    finally:
        await store.close()


async def test_the_sqlite_follower_never_asks_for_a_watch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refuse(self: Store, key: bytes, timeout_s: float) -> bool:
        raise AssertionError("wait_for_change called on a store without watches")

    monkeypatch.setattr(SqliteStore, "wait_for_change", refuse)
    store = SqliteStore(tmp_path / "valv.db")
    follower = changelog.ChangeFollower(store, FakeClock(), [], poll_interval_s=3600)
    try:
        stop = asyncio.Event()
        idle = asyncio.create_task(follower._idle(stop))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not idle.done()
        follower.wake()
        await asyncio.wait_for(idle, 10)
    finally:
        await store.close()


# The keystore suite (every test module built on tests/keystore_fixtures.py), run
# again with its KeyStores on the cluster.
KEYSTORE_SUITE = ("tests/test_authz.py", "tests/test_changehub.py", "tests/test_changelog.py",
                  "tests/test_iam.py", "tests/test_lifecycle_stateful.py",
                  "tests/test_scheduler.py", "tests/test_usecache.py")


@needs_cluster
def test_the_keystore_suite_passes_on_foundationdb() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KEYSTORE_SUITE],
        cwd=repo, env={**os.environ, "VALV_TEST_KEYSTORE_BACKEND": "fdb"},
        capture_output=True, text=True, timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-10_000:] + result.stderr[-5_000:]


def test_the_keystore_suite_list_names_every_module_built_on_the_fixture() -> None:
    repo = Path(__file__).resolve().parent.parent
    users = {f"tests/{p.name}" for p in (repo / "tests").glob("test_*.py")
             if "open_keystore" in p.read_text() and p.name != Path(__file__).name}
    # Modules left out open SQLite files of their own on purpose (emulated
    # versionstamps, files read with sqlite3).
    assert users - set(KEYSTORE_SUITE) == {"tests/test_backup_processes.py",
                                           "tests/test_versionstamped_logs.py"}
    assert set(KEYSTORE_SUITE) <= users
