"""The Encrypt/Decrypt use cache: bounded staleness, never stale for local changes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.api_core import exceptions
from google.cloud import kms_v1
from google.protobuf import field_mask_pb2

from tests.helpers import CALL, CentralProcess, wait_for
from valv.core.crypto.secrets import SecretBytes
from valv.core.model import CryptoKeyVersion, VersionState
from valv.core.names import parse_crypto_key_version
from valv.core.usecache import UsableVersion, UseCache

KEY = "projects/p/locations/global/keyRings/r/cryptoKeys/k"


class FakeTimer:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def usable(version: int, primary: int = 1) -> UsableVersion:
    name = parse_crypto_key_version(f"{KEY}/cryptoKeyVersions/{version}")
    meta = CryptoKeyVersion(name=name, state=VersionState.ENABLED, algorithm=1,
                            protection_level=1, create_time=datetime(2030, 1, 1, tzinfo=UTC))
    return UsableVersion(meta, SecretBytes(bytes([version]) * 32), primary)


def test_entries_expire_after_the_ttl() -> None:
    timer = FakeTimer()
    cache = UseCache(ttl_s=1.0, timer=timer)
    cache.put(KEY, cache.begin_load(), usable(1), as_primary=True)
    assert cache.get(KEY, 0) is not None and cache.get(KEY, 1) is not None
    timer.now += 0.99
    assert cache.get(KEY, 0) is not None
    timer.now += 0.02
    assert cache.get(KEY, 0) is None and cache.get(KEY, 1) is None


def test_a_version_loaded_by_id_does_not_become_the_primary_entry() -> None:
    cache = UseCache(ttl_s=5.0, timer=FakeTimer())
    cache.put(KEY, cache.begin_load(), usable(2), as_primary=False)
    assert cache.get(KEY, 2) is not None
    assert cache.get(KEY, 0) is None


def test_invalidate_drops_every_entry_of_that_key_only() -> None:
    cache = UseCache(ttl_s=5.0, timer=FakeTimer())
    other = KEY.replace("/k", "/other")
    cache.put(KEY, cache.begin_load(), usable(1), as_primary=True)
    cache.put(KEY, cache.begin_load(), usable(2), as_primary=False)
    cache.put(other, cache.begin_load(), usable(1), as_primary=True)
    cache.invalidate(KEY)
    assert cache.get(KEY, 0) is None and cache.get(KEY, 1) is None and cache.get(KEY, 2) is None
    assert cache.get(other, 0) is not None


def test_a_load_that_raced_with_an_invalidation_is_not_cached() -> None:
    timer = FakeTimer()
    cache = UseCache(ttl_s=5.0, timer=timer)
    ticket = cache.begin_load()  # a reader starts reading the old state...
    cache.invalidate(KEY)  # ...a writer commits a change and invalidates...
    cache.put(KEY, ticket, usable(1), as_primary=True)  # ...the reader's old state arrives
    assert cache.get(KEY, 0) is None
    timer.now += 0.5
    cache.put(KEY, cache.begin_load(), usable(1), as_primary=True)  # a later load is fine
    assert cache.get(KEY, 0) is not None


def test_zero_ttl_disables_the_cache() -> None:
    cache = UseCache(ttl_s=0, timer=FakeTimer())
    assert not cache.enabled
    cache.put(KEY, cache.begin_load(), usable(1), as_primary=True)
    assert cache.get(KEY, 0) is None


def test_size_is_bounded() -> None:
    cache = UseCache(ttl_s=5.0, maxsize=3, timer=FakeTimer())
    for version in range(1, 10):
        cache.put(KEY, cache.begin_load(), usable(version), as_primary=False)
    assert sum(cache.get(KEY, v) is not None for v in range(1, 10)) == 3


# ---- through real processes sharing one store ----------------------------------


def _disable(kms: kms_v1.KeyManagementServiceClient, version: str) -> None:
    kms.update_crypto_key_version(
        request={"crypto_key_version": {"name": version, "state": "DISABLED"},
                 "update_mask": field_mask_pb2.FieldMask(paths=["state"])}, **CALL)


def _setup(kms: kms_v1.KeyManagementServiceClient) -> str:
    ring = kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                        "key_ring_id": "r", "key_ring": {}}, **CALL)
    key = kms.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                         "crypto_key": {"purpose": "ENCRYPT_DECRYPT"}}, **CALL)
    return str(key.name)


def test_a_change_through_the_same_central_applies_at_once(fresh_central: CentralProcess) -> None:
    kms = fresh_central.client()
    key = _setup(kms)
    ciphertext = kms.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL).ciphertext
    kms.decrypt(request={"name": key, "ciphertext": ciphertext}, **CALL)  # now cached
    _disable(kms, f"{key}/cryptoKeyVersions/1")
    with pytest.raises(exceptions.FailedPrecondition):
        kms.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)
    with pytest.raises(exceptions.FailedPrecondition):
        kms.decrypt(request={"name": key, "ciphertext": ciphertext}, **CALL)


@pytest.mark.parametrize("ttl", ["1s", "0"])
def test_a_change_through_another_central_arrives_within_the_ttl(tmp_path: Path,
                                                                 ttl: str) -> None:
    data = tmp_path / "shared"
    first = CentralProcess(data, "--key-cache-ttl", ttl).start()
    second_dir = tmp_path / "second"
    second = CentralProcess(second_dir, "--key-cache-ttl", ttl, "--store",
                            f"sqlite://{data / 'valv.db'}", "--master-key-file",
                            str(data / "master.key")).start()
    try:
        a, b = first.client(), second.client()
        key = _setup(a)
        b.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)  # b caches the key
        _disable(a, f"{key}/cryptoKeyVersions/1")

        def b_refuses() -> bool:
            try:
                b.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)
            except exceptions.FailedPrecondition:
                return True
            return False

        if ttl == "0":
            assert b_refuses()
        else:
            wait_for(b_refuses, deadline_s=10, what="the other central to see the disable")
    finally:
        second.stop()
        first.stop()


async def test_a_change_whose_caller_was_cancelled_still_invalidates(tmp_path: Path) -> None:
    """A deadline or disconnect cancels the caller, not the transaction: once it
    commits, the cache must not keep serving the old state (TTL here: 1 hour)."""
    import asyncio
    from datetime import timedelta

    from tests.keystore_fixtures import open_keystore
    from valv.core.clock import FakeClock
    from valv.core.errors import FailedPrecondition
    from valv.core.keystore import NewCryptoKey

    async with open_keystore(tmp_path / "v.db", FakeClock(),
                             use_cache_ttl=timedelta(hours=1)) as (ks, _):
        await ks.create_key_ring("projects/p/locations/global", "r")
        key = str((await ks.create_crypto_key("projects/p/locations/global/keyRings/r", "k",
                                              NewCryptoKey(purpose=1))).name)
        await ks.encrypt(key, b"dek", b"")  # cached
        change = asyncio.ensure_future(ks.update_crypto_key_version(
            f"{key}/cryptoKeyVersions/1", ["state"], int(VersionState.DISABLED)))
        await asyncio.sleep(0)  # let it start
        change.cancel()
        with pytest.raises(asyncio.CancelledError):
            await change

        async def refused() -> bool:
            try:
                await ks.encrypt(key, b"dek", b"")
            except FailedPrecondition:
                return True
            return False

        deadline = asyncio.get_running_loop().time() + 10
        while not await refused():
            assert asyncio.get_running_loop().time() < deadline, "the cache kept old state"
            await asyncio.sleep(0.01)


def test_clear_refuses_loads_that_started_before_it() -> None:
    cache = UseCache(ttl_s=5.0, timer=FakeTimer())
    ticket = cache.begin_load()
    cache.clear()  # e.g. the change log had a gap: everything may be stale
    cache.put(KEY, ticket, usable(1), as_primary=True)
    assert cache.get(KEY, 0) is None
    cache.put(KEY, cache.begin_load(), usable(1), as_primary=True)
    assert cache.get(KEY, 0) is not None
