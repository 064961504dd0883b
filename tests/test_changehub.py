"""The change hub (fan-out to Watch streams), the follower's wake-up, and the Watch
stream's resume logic, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.keystore_fixtures import open_keystore
from valv._proto.valv.sidecar import v1 as pb
from valv.central.watch import Watches, WatchSettings
from valv.core import changehub, changelog
from valv.core.changehub import ChangeHub, HubClosed, Reset
from valv.core.changelog import Change
from valv.core.clock import FakeClock
from valv.core.keystore import KeyStore, NewCryptoKey
from valv.core.model import VersionState

LOCATION = "projects/p/locations/global"
RING = f"{LOCATION}/keyRings/r"
KEY = f"{RING}/cryptoKeys/k"
V1 = f"{KEY}/cryptoKeyVersions/1"
HELLO, CHANGE, RESET, HEARTBEAT = (pb.WatchEventType.HELLO, pb.WatchEventType.CHANGE,
                                   pb.WatchEventType.RESET, pb.WatchEventType.HEARTBEAT)


def change(seq: int) -> Change:
    return Change(seq, 0, changelog.VERSION, f"{KEY}/cryptoKeyVersions/{seq}")


# ---- the hub ----------------------------------------------------------------------


async def test_every_subscriber_gets_every_change_in_order() -> None:
    hub = ChangeHub()
    a, b = hub.subscribe(), hub.subscribe()
    for seq in (1, 2, 3):
        hub.changed(change(seq))
    for sub in (a, b):
        assert [await sub.get(0) for _ in range(3)] == [change(1), change(2), change(3)]
        assert await sub.get(0) is None and sub.get_nowait() is None


async def test_get_waits_for_a_change_or_times_out() -> None:
    hub = ChangeHub()
    sub = hub.subscribe()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await sub.get(timeout=0.05) is None
    assert loop.time() - started >= 0.04
    waiter = asyncio.ensure_future(sub.get(timeout=10))
    await asyncio.sleep(0)
    hub.changed(change(1))
    assert await asyncio.wait_for(waiter, 1) == change(1)


async def test_overflow_drops_the_queue_for_one_reset() -> None:
    hub = ChangeHub(max_pending=3)
    slow, fast = hub.subscribe(), hub.subscribe()
    for seq in (1, 2, 3):
        hub.changed(change(seq))
        assert await fast.get(0) == change(seq)
    assert slow.pending == 3 and slow.overflows == 0
    hub.changed(change(4))  # one too many: everything queued is replaced by a reset
    assert slow.pending == 1 and slow.overflows == 1
    hub.changed(change(5))
    assert [await slow.get(0), await slow.get(0), await slow.get(0)] == [
        changehub.OVERFLOW, change(5), None]
    assert [await fast.get(0), await fast.get(0)] == [change(4), change(5)]
    # However far behind, the queue stays bounded.
    for seq in range(6, 1000):
        hub.changed(change(seq))
        assert slow.pending <= 3
    assert slow.overflows > 1


async def test_a_follower_reset_replaces_what_is_queued() -> None:
    hub = ChangeHub()
    sub = hub.subscribe()
    hub.changed(change(1))
    hub.reset()
    hub.changed(change(7))
    assert [await sub.get(0), await sub.get(0)] == [Reset("gap"), change(7)]


async def test_unsubscribe_and_close() -> None:
    hub = ChangeHub()
    with hub.subscribe() as sub:
        assert hub.subscribers == 1
    assert hub.subscribers == 0 and sub.closed
    hub.changed(change(1))
    assert sub.pending == 0
    sub.close()  # idempotent
    live = hub.subscribe()
    waiter = asyncio.ensure_future(live.get(timeout=10))
    await asyncio.sleep(0)
    hub.changed(change(2))
    hub.close()
    # Closing wins over queued items, for waiters and new gets alike.
    with pytest.raises(HubClosed):
        await asyncio.wait_for(waiter, 1)
    with pytest.raises(HubClosed):
        live.get_nowait()
    with pytest.raises(HubClosed):
        hub.subscribe()


# ---- the follower's wake-up -------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.arrived = asyncio.Event()

    def changed(self, change: Change) -> None:
        self.changes.append(change)
        self.arrived.set()

    def reset(self) -> None:
        pass


async def _setup(ks: KeyStore) -> None:
    await ks.create_key_ring(LOCATION, "r")
    await ks.create_crypto_key(RING, "k", NewCryptoKey(purpose=1))


async def test_wake_polls_at_once(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        recorder = Recorder()
        follower = changelog.ChangeFollower(store, clock, [recorder], poll_interval_s=3600)
        await follower.start()
        ks.after_change = follower.wake
        stop = asyncio.Event()
        task = asyncio.create_task(follower.run(stop))
        try:
            await _setup(ks)
            # An hour's poll interval: only the wake-ups explain a prompt arrival.
            async with asyncio.timeout(5):
                while len(recorder.changes) < 2:
                    recorder.arrived.clear()
                    await recorder.arrived.wait()
            assert [c.seq for c in recorder.changes] == [1, 2]
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)  # stop ends the hour's wait too


# ---- the Watch stream's logic, on a real log ----------------------------------------


class Stream:
    """One Watch stream's events, as central makes them (dev mode: no filtering).
    A resumed one sends the store's change-log epoch, as a sidecar does."""

    def __init__(self, watches: Watches, after_seq: int) -> None:
        self._watches = watches
        self._after_seq = after_seq
        self.events: AsyncGenerator[pb.WatchEvent, None] | None = None

    async def next(self, timeout: float = 5) -> pb.WatchEvent:
        if self.events is None:
            epoch = await changelog.ensure_epoch(self._watches._store)
            self.events = self._watches.events(None, self._after_seq, epoch)
        return await asyncio.wait_for(anext(self.events), timeout)

    async def take(self, n: int) -> list[tuple[pb.WatchEventType, int, str]]:
        return [(e.type, e.seq, e.resource) for e in [await self.next() for _ in range(n)]]


async def test_catch_up_then_live_without_duplicates_or_holes(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)  # seqs 1, 2
        hub = ChangeHub()
        watches = Watches(store, hub, None, WatchSettings(heartbeat_s=3600, page=2))
        stream = Stream(watches, 0)
        assert await stream.take(1) == [(HELLO, 2, "")]
        await ks.update_crypto_key_version(V1, ["state"], VersionState.DISABLED)  # seq 3
        # The hub brings seq 4 before 3 ever came: the stream reads 3 (and 4) from the log.
        await ks.create_crypto_key_version(KEY)  # seq 4
        v2 = f"{KEY}/cryptoKeyVersions/2"
        hub.changed(Change(4, 0, changelog.VERSION, v2))
        assert await stream.take(2) == [(CHANGE, 3, V1), (CHANGE, 4, v2)]
        # Entries already sent come again through the hub (the follower was behind): skipped.
        hub.changed(Change(3, 0, changelog.VERSION, V1))
        hub.changed(Change(4, 0, changelog.VERSION, v2))
        await ks.update_crypto_key_version(V1, ["state"], VersionState.ENABLED)  # seq 5
        hub.changed(Change(5, 0, changelog.VERSION, V1))
        assert await stream.take(1) == [(CHANGE, 5, V1)]

        # Resuming after 2 replays 3, 4, 5 from the log, paged (2 per read).
        resumed = Stream(watches, 2)
        assert await resumed.take(4) == [(HELLO, 2, ""), (CHANGE, 3, V1), (CHANGE, 4, v2),
                                         (CHANGE, 5, V1)]
        # Overflow or a follower gap: RESET at the head, then only what follows it.
        hub.reset()
        await ks.create_crypto_key_version(KEY)  # seq 6
        hub.changed(Change(6, 0, changelog.VERSION, f"{KEY}/cryptoKeyVersions/3"))
        assert await resumed.take(1) == [(RESET, 6, "")]
        await ks.create_crypto_key_version(KEY)  # seq 7
        hub.changed(Change(7, 0, changelog.VERSION, f"{KEY}/cryptoKeyVersions/4"))
        assert await resumed.take(1) == [(CHANGE, 7, f"{KEY}/cryptoKeyVersions/4")]
        for events in (stream.events, resumed.events):
            assert events is not None
            await events.aclose()
        assert hub.subscribers == 0


async def test_resets_for_a_trimmed_or_future_position(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)
        clock.advance(timedelta(hours=2))
        await ks.create_crypto_key_version(KEY)  # seq 3
        await changelog.trim(store, clock)  # 1 and 2 are gone
        watches = Watches(store, ChangeHub(), None, WatchSettings(heartbeat_s=3600))
        assert await Stream(watches, 1).take(2) == [(HELLO, 1, ""), (RESET, 3, "")]
        assert await Stream(watches, 2).take(2) == [
            (HELLO, 2, ""), (CHANGE, 3, f"{KEY}/cryptoKeyVersions/2")]
        assert await Stream(watches, 99).take(2) == [(HELLO, 99, ""), (RESET, 3, "")]


async def test_unknown_kinds_reset_and_heartbeats_carry_the_position(tmp_path: Path) -> None:
    clock = FakeClock()
    async with open_keystore(tmp_path / "db", clock) as (ks, store):
        await _setup(ks)
        await store.run(lambda tr: changelog.append(tr, 0, "from_the_future", "x"))  # seq 3
        await store.run(lambda tr: changelog.append(tr, 0, changelog.ROOT_KEYS, ""))  # seq 4
        watches = Watches(store, ChangeHub(), None, WatchSettings(heartbeat_s=1))
        stream = Stream(watches, 2)
        events = [await stream.next() for _ in range(3)]
        assert [(e.type, e.seq) for e in events] == [(HELLO, 2), (RESET, 3), (CHANGE, 4)]
        assert events[0].heartbeat_seconds == 1
        assert events[2].kind == pb.ChangeKind.ROOT_KEYS and events[2].resource == ""
        heartbeat = await stream.next(timeout=3)
        assert (heartbeat.type, heartbeat.seq) == (HEARTBEAT, 4)
        assert stream.events is not None
        await stream.events.aclose()
