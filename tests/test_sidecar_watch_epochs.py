"""The sidecar's side of the Watch stream's epochs, on its own event handler.

Central sends RESET when a resumed position belongs to another epoch
(tests/test_watch_service.py); the sidecar also drops everything itself when a
HELLO brings an epoch other than the one its position came from, so a restored
store never keeps stale material alive, whatever central says."""

from __future__ import annotations

from valv._proto.valv.sidecar import v1 as pb
from valv.core.crypto.secrets import SecretBytes
from valv.sidecar.cache import FetchedKek, KekCache
from valv.sidecar.upstream import Watcher

K = "projects/p/locations/l/keyRings/r/cryptoKeys/k"
HELLO = pb.WatchEventType.HELLO


async def cached(cache: KekCache) -> None:
    async def fetch() -> FetchedKek:
        return FetchedKek(1, SecretBytes(bytes([7]) * 32))

    (await cache.get_or_fetch(K, 1, fetch)).release()


async def test_a_hello_of_another_epoch_drops_everything() -> None:
    cache = KekCache()
    watcher = Watcher(None, [cache])  # type: ignore[arg-type]  # no link: events only
    first = b"\x01" * 16
    watcher._handle(pb.WatchEvent(type=HELLO, seq=5, epoch=first), 15.0)
    await cached(cache)
    # Reconnected to the same log: resumed, the cache stays.
    watcher._handle(pb.WatchEvent(type=HELLO, seq=5, epoch=first), 15.0)
    assert len(cache) == 1
    # Reconnected to a restored store (another epoch): start clean.
    watcher._handle(pb.WatchEvent(type=HELLO, seq=5, epoch=b"\x02" * 16), 15.0)
    assert len(cache) == 0
    assert watcher._epoch == b"\x02" * 16
    # A HELLO without an epoch proves nothing about the position: start clean too.
    await cached(cache)
    watcher._handle(pb.WatchEvent(type=HELLO, seq=5), 15.0)
    assert len(cache) == 0
