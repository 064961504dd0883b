"""SealedStore over sqlite: nothing in clear on disk; edits and swaps are caught."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.storage_conformance import StaticSealKeys, get, put, raw_bytes, scan
from valv.core.storage import LimitExceededError, keys
from valv.core.storage.sealed import (
    FORMAT_VERSION,
    NONCE_BYTES,
    TAG_BYTES,
    SealedStore,
    Sealer,
    TamperedRecordError,
    rmk_id_of,
    sealed_overhead,
)
from valv.core.storage.sqlite import SqliteStore

KEY_A = ("aaaaaaaaaaaaaaaa", bytes(range(32)))
KEY_B = ("bbbbbbbbbbbbbbbb", bytes(range(100, 132)))

KM1 = keys.pack("km", "p", "global", "ring", "key", 1)
KM2 = keys.pack("km", "p", "global", "ring", "key", 2)
CANARY = b"PLAINTEXT-CANARY-4f1d9a-this-must-never-reach-the-disk"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "valv.db"


@pytest.fixture
async def sealed(db: Path) -> AsyncIterator[SealedStore]:
    store = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_A)))
    yield store
    await store.close()


@contextmanager
def raw(db: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to the file, as an attacker with disk access has."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def raw_value(db: Path, key: bytes) -> bytes:
    with raw(db) as conn:
        row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
    assert row is not None
    return bytes(row[0])


def write_raw(db: Path, key: bytes, value: bytes) -> None:
    with raw(db) as conn:
        conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))


# -- confidentiality ---------------------------------------------------------


async def test_no_plaintext_in_the_database_files(db: Path, sealed: SealedStore) -> None:
    await put(sealed, (KM1, CANARY), (KM2, CANARY * 100))
    assert await get(sealed, KM1) == CANARY
    assert CANARY not in raw_bytes(db)
    assert isinstance(sealed.inner, SqliteStore)
    await sealed.inner.checkpoint()
    assert CANARY not in raw_bytes(db)


async def test_control_plain_store_does_leave_plaintext(db: Path) -> None:
    """Proves the grep above would find the canary if it were there."""
    store = SqliteStore(db)
    try:
        await put(store, (KM1, CANARY))
        assert CANARY in raw_bytes(db)
    finally:
        await store.close()


async def test_sealed_format(db: Path, sealed: SealedStore) -> None:
    await put(sealed, (KM1, b"value"))
    v = raw_value(db, KM1)
    rmk_id = KEY_A[0].encode()
    assert v[0] == FORMAT_VERSION
    assert v[1] == len(rmk_id)
    assert v[2 : 2 + len(rmk_id)] == rmk_id
    assert len(v) == 2 + len(rmk_id) + NONCE_BYTES + len(b"value") + TAG_BYTES
    assert len(v) == len(b"value") + sealed_overhead(KEY_A[0])
    assert rmk_id_of(v) == KEY_A[0]


async def test_same_value_seals_differently_each_time(db: Path, sealed: SealedStore) -> None:
    await put(sealed, (KM1, b"same"))
    first = raw_value(db, KM1)
    await put(sealed, (KM1, b"same"))
    assert raw_value(db, KM1) != first
    assert await get(sealed, KM1) == b"same"


async def test_value_limit_counts_the_seal(sealed: SealedStore) -> None:
    await put(sealed, (KM1, b"x" * sealed.max_value_bytes))
    with pytest.raises(LimitExceededError, match=r"'km'"):
        await put(sealed, (KM2, b"x" * (sealed.max_value_bytes + 1)))
    assert await get(sealed, KM2) is None


# -- integrity ---------------------------------------------------------------


def flip(value: bytes, index: int) -> bytes:
    b = bytearray(value)
    b[index] ^= 0x01
    return bytes(b)


HEADER = 2 + len(KEY_A[0])


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda v: flip(v, 0), id="format-version"),
        pytest.param(lambda v: flip(v, 1), id="id-length"),
        pytest.param(lambda v: flip(v, 2), id="rmk-id"),
        pytest.param(lambda v: flip(v, HEADER), id="nonce"),
        pytest.param(lambda v: flip(v, HEADER + NONCE_BYTES), id="ciphertext"),
        pytest.param(lambda v: flip(v, len(v) - 1), id="tag"),
        pytest.param(lambda v: v[:-1], id="truncated"),
        pytest.param(lambda v: v + b"\x00", id="extended"),
        pytest.param(lambda v: v[:HEADER], id="header-only"),
        pytest.param(lambda v: b"", id="empty"),
        pytest.param(lambda v: b"secret in clear", id="plaintext"),
    ],
)
async def test_edited_value_is_reported_naming_the_record(
    db: Path, sealed: SealedStore, edit: Callable[[bytes], bytes]
) -> None:
    await put(sealed, (KM1, b"key material"), (KM2, b"other"))
    write_raw(db, KM1, edit(raw_value(db, KM1)))
    with pytest.raises(TamperedRecordError) as info:
        await get(sealed, KM1)
    message = str(info.value)
    assert keys.describe(KM1) in message
    assert "modified or moved at the storage level" in message
    assert info.value.key == KM1
    # Range reads check every record too.
    with pytest.raises(TamperedRecordError):
        await scan(sealed, *keys.range_of("km"))
    assert await get(sealed, KM2) == b"other"  # the untouched record still opens


async def test_swapped_values_are_reported_naming_the_record_read(
    db: Path, sealed: SealedStore
) -> None:
    await put(sealed, (KM1, b"material of version 1"), (KM2, b"material of version 2"))
    v1, v2 = raw_value(db, KM1), raw_value(db, KM2)
    write_raw(db, KM1, v2)
    write_raw(db, KM2, v1)
    for key, other in ((KM1, KM2), (KM2, KM1)):
        with pytest.raises(TamperedRecordError) as info:
            await get(sealed, key)
        assert info.value.key == key
        assert keys.describe(key) in str(info.value)
        assert keys.describe(other) not in str(info.value)


async def test_copied_value_is_reported(db: Path, sealed: SealedStore) -> None:
    await put(sealed, (KM1, b"material"))
    km9 = keys.pack("km", "p", "global", "ring", "key", 9)
    write_raw(db, km9, raw_value(db, KM1))
    assert await get(sealed, KM1) == b"material"
    with pytest.raises(TamperedRecordError, match="9"):
        await get(sealed, km9)


async def test_unknown_rmk_id_is_reported(db: Path) -> None:
    store_a = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_A)))
    await put(store_a, (KM1, b"under a"))
    await store_a.close()

    store_b = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_B)))
    try:
        with pytest.raises(TamperedRecordError) as info:
            await get(store_b, KM1)
        assert KEY_A[0] in str(info.value)
        assert "not configured" in str(info.value)
        assert keys.describe(KM1) in str(info.value)
    finally:
        await store_b.close()


async def test_same_id_other_key_fails_authentication(db: Path) -> None:
    store_a = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_A)))
    await put(store_a, (KM1, b"under a"))
    await store_a.close()
    impostor = SealedStore(SqliteStore(db), Sealer(StaticSealKeys((KEY_A[0], KEY_B[1]))))
    try:
        with pytest.raises(TamperedRecordError, match="failed authentication"):
            await get(impostor, KM1)
    finally:
        await impostor.close()


async def test_rmk_rotation_reads_old_and_seals_new_under_newest(db: Path) -> None:
    store_a = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_A)))
    await put(store_a, (KM1, b"old"))
    await store_a.close()

    rotated = SealedStore(SqliteStore(db), Sealer(StaticSealKeys(KEY_A, KEY_B)))
    try:
        assert await get(rotated, KM1) == b"old"
        await put(rotated, (KM2, b"new"))
        assert rmk_id_of(raw_value(db, KM1)) == KEY_A[0]
        assert rmk_id_of(raw_value(db, KM2)) == KEY_B[0]
        # Resealing is just reading and writing back.
        await rotated.run(lambda tx: tx.set(KM1, tx.get(KM1) or b""))
        assert rmk_id_of(raw_value(db, KM1)) == KEY_B[0]
        assert await get(rotated, KM1) == b"old"
    finally:
        await rotated.close()


def test_rmk_id_of_malformed_names_the_record() -> None:
    with pytest.raises(TamperedRecordError) as info:
        rmk_id_of(b"\x01", KM1)
    assert keys.describe(KM1) in str(info.value)


async def test_works_with_the_real_root_keyring(db: Path) -> None:
    rootkey = pytest.importorskip("valv.core.crypto.rootkey")
    old, new = rootkey.RootKey.generate(), rootkey.RootKey.generate()
    store = SealedStore(SqliteStore(db), Sealer(rootkey.RootKeyring([old])))
    await put(store, (KM1, b"v1"))
    await store.close()
    store = SealedStore(SqliteStore(db), Sealer(rootkey.RootKeyring([old, new])))
    try:
        assert await get(store, KM1) == b"v1"
        await put(store, (KM2, b"v2"))
        assert rmk_id_of(raw_value(db, KM1)) == old.key_id
        assert rmk_id_of(raw_value(db, KM2)) == new.key_id
    finally:
        await store.close()
    store = SealedStore(SqliteStore(db), Sealer(rootkey.RootKeyring([new])))
    try:
        with pytest.raises(TamperedRecordError, match=old.key_id):
            await get(store, KM1)
    finally:
        await store.close()
