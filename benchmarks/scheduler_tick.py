"""A scheduler tick costs O(due items), not O(keys).

Builds two real sealed SQLite stores (SqliteStore + SealedStore + Sealer over a
RootKeyring, as central does): one with a small and one with a large number
of CryptoKeys. Every key has a rotation schedule, all of them far in the
future. Then, several times per store, it adds 10 fresh keys that are due,
times ``Scheduler(keystore).tick()`` (which must rotate exactly those 10) and
reports the median. If a tick found its work through the due-time index the
two medians are about equal (ratio ~1); a tick that scanned every key would
be about N_large / N_small times slower.

For comparison it also times one read of every CryptoKey record, which is
what a scan-based scheduler would do at least once per tick.

    /work/venv/bin/python benchmarks/scheduler_tick.py            # 1,000 vs 100,000 keys
    /work/venv/bin/python benchmarks/scheduler_tick.py --small    # 1,000 vs 10,000 keys
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from valv.core import fsck, records
from valv.core.clock import FakeClock
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.keystore import KeyStore, KeystoreSettings, NewCryptoKey
from valv.core.model import Purpose
from valv.core.names import CryptoKeyName
from valv.core.scheduler import Scheduler
from valv.core.storage.base import Transaction
from valv.core.storage.keys import range_of, unpack
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

DUE = 10
PERIOD = timedelta(days=30)
FAR = timedelta(days=3650)  # when the keys that are not due rotate
BATCH = 5_000  # keys per populate transaction (well under FDB's 10 MB limit)
LOCATION = "projects/bench/locations/global"
RING = f"{LOCATION}/keyRings/ring"


class _Deferred:
    """A stand-in store that keeps transaction bodies instead of running them.

    A KeyStore over it builds CreateCryptoKey's own transaction body (key
    record, counters, indexes: whatever the real call writes) without running
    it, so thousands of them can then run in one real transaction.
    """

    def __init__(self) -> None:
        self.bodies: list[Callable[[Transaction], Any]] = []

    async def run(self, body: Callable[[Transaction], Any], *, read_only: bool = False) -> None:
        self.bodies.append(body)


async def _create_keys(store: SealedStore, ring_keys: RootKeyring, clock: FakeClock,
                       ids: range, next_time_offset: timedelta) -> None:
    """CreateCryptoKey (skip_initial_version_creation) for ``ids``, in big transactions."""
    deferred = _Deferred()
    builder = KeyStore(deferred, ring_keys, clock, KeystoreSettings())  # type: ignore[arg-type]
    spec = NewCryptoKey(purpose=int(Purpose.ENCRYPT_DECRYPT), rotation_period=PERIOD,
                        next_rotation_time=clock.now() + next_time_offset)
    for start in range(ids.start, ids.stop, BATCH):
        deferred.bodies.clear()
        for i in range(start, min(start + BATCH, ids.stop)):
            await builder.create_crypto_key(RING, f"k{i:07d}", spec,
                                            skip_initial_version_creation=True)
        bodies = list(deferred.bodies)
        await store.run(lambda tr, bodies=bodies: [body(tr) for body in bodies])


def _read_all_keys(tr: Transaction) -> int:
    """Decode every CryptoKey record: what a scan-based tick would do."""
    count = 0
    begin, end = range_of("ck")
    while True:
        chunk = tr.get_range(begin, end, limit=1000)
        for key, value in chunk:
            records.decode_crypto_key(CryptoKeyName(*unpack(key)[1:]), key, value)
            count += 1
        if len(chunk) < 1000:
            return count
        begin = chunk[-1][0] + b"\x00"


class Bench:
    """One sealed SQLite store with ``n_keys`` CryptoKeys that are not due."""

    def __init__(self, n_keys: int, workdir: Path) -> None:
        self.n_keys = n_keys
        self.clock = FakeClock()
        self.root_keys = RootKeyring([RootKey.generate()])
        self.store = SealedStore(SqliteStore(str(workdir / f"valv-{n_keys}.db")),
                                 Sealer(self.root_keys))
        self.keystore = KeyStore(self.store, self.root_keys, self.clock, KeystoreSettings())
        self.scheduler = Scheduler(self.keystore)
        self.next_id = 0
        self.ticks: list[float] = []
        self.populate_s = 0.0
        self.scan_s = 0.0

    async def populate(self) -> None:
        await self.keystore.create_key_ring(LOCATION, "ring")
        started = time.perf_counter()
        await self._add_keys(self.n_keys, FAR)
        self.populate_s = time.perf_counter() - started
        if (await self.scheduler.tick()).rotated:
            raise SystemExit("bug in the benchmark: a background key was due")

    async def _add_keys(self, count: int, due_in: timedelta) -> None:
        await _create_keys(self.store, self.root_keys, self.clock,
                           range(self.next_id, self.next_id + count), due_in)
        self.next_id += count

    async def measure_tick(self) -> None:
        """Add 10 keys due in an hour, move the clock past it, time one tick."""
        await self._add_keys(DUE, timedelta(hours=1))
        self.clock.advance(timedelta(hours=1, seconds=1))
        started = time.perf_counter()
        report = await self.scheduler.tick()
        self.ticks.append(time.perf_counter() - started)
        if len(report.rotated) != DUE or report.failed:
            raise SystemExit(f"expected {DUE} rotations, got {len(report.rotated)} "
                             f"({report.failed} failed)")

    async def scan(self) -> None:
        started = time.perf_counter()
        scanned = await self.store.run(_read_all_keys, read_only=True)
        self.scan_s = time.perf_counter() - started
        if scanned != self.next_id:
            raise SystemExit(f"expected {self.next_id} keys, read {scanned}")

    async def fsck(self) -> None:
        problems = await fsck.check(self.store)
        if problems:
            raise SystemExit("fsck: " + "; ".join(map(str, problems[:5])))


async def run(sizes: tuple[int, int], repeat: int, check: bool, workdir: Path) -> None:
    benches = [Bench(n, workdir) for n in sizes]
    try:
        for bench in benches:
            print(f"populating {bench.n_keys:,} keys...", flush=True)
            await bench.populate()
        # Alternate between the stores so that load on the machine hits both alike.
        for _ in range(repeat):
            for bench in benches:
                await bench.measure_tick()
        for bench in benches:
            await bench.scan()
            if check:
                await bench.fsck()
            ms = [t * 1000 for t in bench.ticks]
            print(f"{bench.n_keys:>7,} keys, {DUE} due: tick median {statistics.median(ms):6.1f} "
                  f"ms (min {min(ms):.1f}, max {max(ms):.1f}, n={len(ms)}); "
                  f"reading every key once: {bench.scan_s * 1000:,.0f} ms "
                  f"(populated in {bench.populate_s:.1f} s)")
        small, large = benches
        tick_ratio = statistics.median(large.ticks) / statistics.median(small.ticks)
        scan_ratio = large.scan_s / small.scan_s
        print(f"ratio {large.n_keys // 1000}k/{small.n_keys // 1000}k: tick {tick_ratio:.2f}x "
              f"(O(due items) gives ~1x; O(keys) would give ~{large.n_keys // small.n_keys}x, "
              f"as reading every key does: {scan_ratio:.0f}x)")
    finally:
        for bench in benches:
            await bench.store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="1,000 vs 10,000 keys (quick); default 1,000 vs 100,000")
    parser.add_argument("--repeat", type=int, default=9,
                        help="ticks measured per store, each on 10 fresh due keys (default 9)")
    parser.add_argument("--fsck", action="store_true",
                        help="also check each store's invariants afterwards")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    sizes = (1_000, 10_000) if args.small else (1_000, 100_000)
    workdir = Path(tempfile.mkdtemp(prefix="valv-bench-tick-"))
    try:
        asyncio.run(run(sizes, args.repeat, args.fsck, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
