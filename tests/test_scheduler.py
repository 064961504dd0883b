"""Rotation and destruction, in process, on the fake clock: months in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import pytest

from tests.keystore_fixtures import open_keystore
from valv.core import fsck
from valv.core.clock import FakeClock
from valv.core.errors import AlreadyExists, FailedPrecondition
from valv.core.keystore import CryptoKeyUpdate, KeyStore, NewCryptoKey
from valv.core.model import VersionState
from valv.core.scheduler import Scheduler

DAY = timedelta(days=1)
LOCATION = "projects/p/locations/global"
RING = f"{LOCATION}/keyRings/r"


async def make_key(ks: KeyStore, key_id: str = "k", **spec: object) -> str:
    """A key; a rotation_period without next_rotation_time starts one period from now."""
    with contextlib.suppress(AlreadyExists):
        await ks.create_key_ring(LOCATION, "r")
    period = spec.get("rotation_period")
    if isinstance(period, timedelta) and "next_rotation_time" not in spec:
        spec["next_rotation_time"] = ks._clock.now() + period
    key = await ks.create_crypto_key(RING, key_id, NewCryptoKey(purpose=1, **spec))  # type: ignore[arg-type]
    return str(key.name)


async def versions(ks: KeyStore, key: str) -> list[tuple[int, VersionState]]:
    page = await ks.list_crypto_key_versions(key)
    return [(v.name.version, v.state) for v in page.items]


async def assert_consistent(ks: KeyStore) -> None:
    assert await fsck.check(ks._store) == []


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_a_key_rotates_when_due_and_schedules_the_next(tmp_path: Path,
                                                              clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        key = await make_key(ks, rotation_period=DAY)
        created = (await ks.get_crypto_key(key)).create_time
        scheduler = Scheduler(ks)
        clock.advance(DAY - timedelta(microseconds=1))
        assert (await scheduler.tick()).rotated == []
        clock.advance(timedelta(microseconds=1))
        report = await scheduler.tick()
        assert [str(o.name) for o in report.rotated] == [key]
        got = await ks.get_crypto_key(key)
        assert got.primary is not None and got.primary.name.version == 2
        assert got.next_rotation_time == created + 2 * DAY
        assert await versions(ks, key) == [(1, VersionState.ENABLED), (2, VersionState.ENABLED)]
        assert (await scheduler.tick()).rotated == []  # exactly once
        await assert_consistent(ks)


async def test_after_downtime_of_several_periods_it_rotates_once(tmp_path: Path,
                                                                  clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        key = await make_key(ks, rotation_period=DAY)
        created = (await ks.get_crypto_key(key)).create_time
        clock.advance(5 * DAY + timedelta(hours=3))
        report = await Scheduler(ks).tick()
        assert len(report.rotated) == 1
        got = await ks.get_crypto_key(key)
        assert got.next_rotation_time == created + 6 * DAY
        assert len(await versions(ks, key)) == 2
        await assert_consistent(ks)


async def test_default_rotation_applies_and_cleared_rotation_never_rotates(
        tmp_path: Path, clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        default = await make_key(ks, "default")
        cleared = await make_key(ks, "cleared")
        await ks.update_crypto_key(cleared, CryptoKeyUpdate(
            paths=["rotation_period", "next_rotation_time"]))
        clock.advance(timedelta(days=31))
        report = await Scheduler(ks).tick()
        assert [str(o.name) for o in report.rotated] == [default]
        assert len(await versions(ks, cleared)) == 1
        await assert_consistent(ks)


async def test_next_rotation_time_without_a_period_rotates_once(tmp_path: Path,
                                                                 clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock,
                             default_rotation_period=None) as (ks, _):
        key = await make_key(ks, next_rotation_time=clock.now() + DAY)
        clock.advance(2 * DAY)
        assert len((await Scheduler(ks).tick()).rotated) == 1
        got = await ks.get_crypto_key(key)
        assert got.next_rotation_time is None and got.rotation_period is None
        clock.advance(100 * DAY)
        assert (await Scheduler(ks).tick()).rotated == []
        await assert_consistent(ks)


async def test_an_update_takes_effect_at_the_next_tick(tmp_path: Path,
                                                       clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        key = await make_key(ks, rotation_period=30 * DAY)
        scheduler = Scheduler(ks)
        soon = clock.now() + DAY
        await ks.update_crypto_key(key, CryptoKeyUpdate(paths=["next_rotation_time"],
                                                        next_rotation_time=soon))
        clock.advance(DAY)
        assert len((await scheduler.tick()).rotated) == 1
        assert (await ks.get_crypto_key(key)).next_rotation_time == soon + 30 * DAY
        await assert_consistent(ks)


async def test_destruction_erases_the_material_at_destroy_time(tmp_path: Path,
                                                               clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, store):
        key = await make_key(ks, destroy_scheduled_duration=DAY)
        ciphertext = (await ks.encrypt(key, b"secret", b"")).ciphertext
        scheduled = await ks.destroy_crypto_key_version(f"{key}/cryptoKeyVersions/1")
        assert scheduled.destroy_time == clock.now() + DAY
        scheduler = Scheduler(ks)
        clock.advance(DAY - timedelta(seconds=1))
        assert (await scheduler.tick()).destroyed == []
        clock.advance(timedelta(seconds=1))
        report = await scheduler.tick()
        assert [str(o.name) for o in report.destroyed] == [f"{key}/cryptoKeyVersions/1"]
        version = await ks.get_crypto_key_version(f"{key}/cryptoKeyVersions/1")
        assert version.state == VersionState.DESTROYED
        assert version.destroy_event_time == clock.now()
        assert version.destroy_time is None
        assert await versions(ks, key) == [(1, VersionState.DESTROYED)]
        with pytest.raises(FailedPrecondition, match="DESTROYED"):
            await ks.decrypt(key, ciphertext, b"")
        from valv.core import records
        from valv.core.names import parse_crypto_key_version
        material = records.material_key(parse_crypto_key_version(f"{key}/cryptoKeyVersions/1"))
        assert await store.run(lambda tr: tr.get(material), read_only=True) is None
        await assert_consistent(ks)


async def test_restore_before_destroy_time_cancels_destruction(tmp_path: Path,
                                                               clock: FakeClock) -> None:
    async with open_keystore(tmp_path / "v.db", clock) as (ks, _):
        key = await make_key(ks, destroy_scheduled_duration=DAY)
        name = f"{key}/cryptoKeyVersions/1"
        await ks.destroy_crypto_key_version(name)
        clock.advance(DAY / 2)
        await ks.restore_crypto_key_version(name)
        clock.advance(DAY)
        assert (await Scheduler(ks).tick()).destroyed == []
        assert (await ks.get_crypto_key_version(name)).state == VersionState.DISABLED
        await assert_consistent(ks)


async def test_schedulers_sharing_a_store_apply_each_event_once(tmp_path: Path,
                                                                clock: FakeClock) -> None:
    db = tmp_path / "v.db"
    async with open_keystore(db, clock) as (a, _), open_keystore(db, clock) as (b, _):
        keys = [await make_key(a, f"k{i}", rotation_period=DAY) for i in range(20)]
        for _ in range(3):
            clock.advance(DAY)
            reports = await asyncio.gather(Scheduler(a).tick(), Scheduler(b).tick(),
                                           Scheduler(a).tick())
            assert sum(len(r.rotated) for r in reports) == len(keys)
        for key in keys:
            assert [v for v, _ in await versions(a, key)] == [1, 2, 3, 4]
        await assert_consistent(a)
