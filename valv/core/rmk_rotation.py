"""Online root-key (RMK) rotation: move everything over to the newest RMK.

After the operator has added a new RMK as the newest one in the configuration
(and restarted every central, so new writes already use it), ``valv rmk
rotate`` runs :class:`RmkRotation`. It walks the whole keyspace in key order,
in bounded transactions (at most ``batch_size`` records and about 4 MB of
writes each, far inside FoundationDB's 10 MB / 5 s), and for each record:

- **reseals** a value sealed under an older RMK: it opens it and seals the
  identical plaintext under the newest RMK (only the seal changes, so every
  value, the audit chain's included, stays byte-for-byte the same);
- **rewraps** key material (``("km", ...)`` records) wrapped under an older
  RMK: it unwraps the KEK and wraps it again under the newest RMK, with the
  same AAD binding (version name and algorithm, read from the version record
  in the same transaction). The KEK itself does not change, so ciphertexts
  and every cache of unwrapped KEKs stay valid.

Each record is read and rewritten in one serializable transaction, so a
central writing the same record at the same moment either goes first (and
the rotation sees its value) or after (and sees the rotation's): nothing is
lost and nothing is ever half-written. Records already under the newest RMK
are skipped, so the rotation is idempotent: after a crash (or ``kill -9``),
run it again and it finishes the job, with no progress state to keep.

A record that cannot be opened (sealed under an RMK that is not configured,
or tampered with) is left exactly as it is and reported; the rotation goes on
with the others and reports failure at the end.

When the walk is done, the rotation appends a ``root_keys`` entry to the
change log (valv.core.changelog), in a transaction of its own: every central
sees it within its poll interval and passes it to the sidecars' Watch
streams, which drop every cached KEK and fetch again. A run that crashes
appends nothing; the run that finishes the job does.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from valv.core import changelog, records
from valv.core.clock import Clock, SystemClock, to_micros
from valv.core.crypto.errors import KeyUnwrapError, UnknownRootKeyError
from valv.core.crypto.rootkey import RootKeyring
from valv.core.errors import DataLoss
from valv.core.faults import fault_point
from valv.core.model import Algorithm, enum_name
from valv.core.names import CryptoKeyVersionName
from valv.core.storage.base import Transaction
from valv.core.storage.keys import describe, unpack
from valv.core.storage.sealed import (
    SealedStore,
    SealedTransaction,
    TamperedRecordError,
    rmk_id_of,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MAX_BATCH_SIZE",
    "Census",
    "Progress",
    "RmkRotation",
    "census",
]

DEFAULT_BATCH_SIZE = 256
MAX_BATCH_SIZE = 500
# Stop adding records to a batch once this much has been written: a tenth of
# FoundationDB's 10 MB transaction limit, leaving room for the reads.
MAX_BATCH_WRITE_BYTES = 1_000_000
_MAX_PROBLEMS = 100
_CENSUS_CHUNK = 1000

# The whole user keyspace: fdb.tuple keys start below 0xff (FDB's system keys).
_BEGIN = b""
_END = b"\xff"

# Test-only: SIGKILL in the middle of a batch (after at least one batch has
# committed), between records rewritten and not yet rewritten.
FAULT_MID_BATCH = "rmk-rotate.mid-batch"


@dataclass(slots=True)
class Progress:
    total: int = 0  # records in the store when the run started
    pending: int = 0  # of those, sealed under an older RMK at the start
    scanned: int = 0
    resealed: int = 0  # values written again under the newest RMK
    rewrapped: int = 0  # of those, KEKs wrapped again under the newest RMK
    batches: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    started: float = field(default_factory=time.monotonic)

    def problem(self, key: bytes, issue: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(f"{describe(key)}: {issue}")


@dataclass(slots=True)
class Census:
    """Which RMK each record needs: by seal, and (key material) by KEK wrap."""

    total: int = 0
    sealed: Counter[str] = field(default_factory=Counter)
    wrapped: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0  # key material records that did not open

    def outside(self, rmk_id: str) -> int:
        """How many seals and wraps name an RMK other than ``rmk_id``."""
        return (sum(n for k, n in self.sealed.items() if k != rmk_id)
                + sum(n for k, n in self.wrapped.items() if k != rmk_id) + self.unreadable)


def _is_material(key: bytes) -> bool:
    try:
        return bool(unpack(key)[0] == "km")
    except (ValueError, IndexError):
        return False


async def census(store: SealedStore, *, open_material: bool = True) -> Census:
    """Count records by the RMK they are sealed (and their KEKs wrapped) under.

    Reads the keyspace in chunks, each in its own read-only transaction, so it
    is safe on a live store (the counts are then approximate for records
    written meanwhile). With ``open_material``, key material records are
    opened to learn which RMK wraps their KEK.
    """
    result = Census()
    sealer = store.sealer
    begin = _BEGIN
    while True:
        def body(tr: Transaction, begin: bytes = begin) -> list[tuple[bytes, bytes]]:
            return tr.get_range(begin, _END, limit=_CENSUS_CHUNK)

        pairs = await store.inner.run(body, read_only=True)
        for key, raw in pairs:
            result.total += 1
            try:
                seal_id = rmk_id_of(raw, key)
            except TamperedRecordError:
                result.sealed["(malformed)"] += 1
                continue
            result.sealed[seal_id] += 1
            if open_material and _is_material(key):
                try:
                    wrap_id, _ = records.decode_material(key, sealer.open(key, raw))
                except (TamperedRecordError, DataLoss):
                    result.unreadable += 1
                    continue
                result.wrapped[wrap_id] += 1
        if len(pairs) < _CENSUS_CHUNK:
            return result
        begin = pairs[-1][0] + b"\x00"


@dataclass(slots=True)
class _BatchResult:
    next_begin: bytes | None
    scanned: int = 0
    resealed: int = 0
    rewrapped: int = 0
    problems: list[tuple[bytes, str]] = field(default_factory=list)


class RmkRotation:
    """Reseal and rewrap every record still under an older RMK (see the module doc)."""

    def __init__(self, store: SealedStore, keyring: RootKeyring, *,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 on_progress: Callable[[Progress], None] | None = None,
                 clock: Clock | None = None) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch size must be between 1 and {MAX_BATCH_SIZE}")
        self._store = store
        self._keyring = keyring
        self._batch_size = batch_size
        self._on_progress = on_progress
        self._clock: Clock = clock or SystemClock()
        self.newest_id = keyring.newest_id
        # The change log seq of the root_keys entry the finished run appended.
        self.change_seq: int | None = None

    async def run(self) -> Progress:
        """Rotate everything; returns the counts (``problems`` lists what was left)."""
        start = await census(self._store, open_material=False)
        progress = Progress(total=start.total,
                            pending=sum(n for k, n in start.sealed.items()
                                        if k != self.newest_id))
        self._report(progress)
        begin: bytes | None = _BEGIN
        while begin is not None:
            def body(tr: Transaction, begin: bytes = begin,
                     crash_allowed: bool = progress.batches > 0) -> _BatchResult:
                return self._batch(tr, begin, crash_allowed=crash_allowed)

            result = await self._store.inner.run(body)
            progress.batches += 1
            progress.scanned += result.scanned
            progress.resealed += result.resealed
            progress.rewrapped += result.rewrapped
            for key, issue in result.problems:
                progress.problem(key, issue)
            self._report(progress)
            begin = result.next_begin
        # Done: tell every central (and through them the sidecars) to drop cached KEKs.
        now_us = to_micros(self._clock.now())
        self.change_seq = await self._store.run(
            lambda tr: changelog.append(tr, now_us, changelog.ROOT_KEYS, ""))
        return progress

    def _report(self, progress: Progress) -> None:
        if self._on_progress is not None:
            self._on_progress(progress)

    def _batch(self, tr: Transaction, begin: bytes, *, crash_allowed: bool) -> _BatchResult:
        """One transaction: up to batch_size records from ``begin`` on."""
        sealer = self._store.sealer
        sealed_tr = SealedTransaction(tr, sealer)
        newest = self.newest_id
        pairs = tr.get_range(begin, _END, limit=self._batch_size)
        result = _BatchResult(next_begin=None)
        written = 0
        for key, raw in pairs:
            if written >= MAX_BATCH_WRITE_BYTES:
                result.next_begin = key
                return result
            result.scanned += 1
            try:
                seal_id = rmk_id_of(raw, key)
                material = _is_material(key)
                if seal_id == newest and not material:
                    continue
                value = sealer.open(key, raw)
                changed = seal_id != newest
                if material:
                    rewrapped = self._rewrap(sealed_tr, key, value)
                    if rewrapped is not None:
                        value = rewrapped
                        changed = True
                        result.rewrapped += 1
                if not changed:
                    continue
                sealed_tr.set(key, value)
            except (TamperedRecordError, DataLoss, KeyUnwrapError, UnknownRootKeyError) as exc:
                # Left as it is: an unreadable record stays exactly as unreadable.
                result.problems.append((key, str(exc)))
                continue
            result.resealed += 1
            written += len(key) + len(raw)
            if crash_allowed:
                fault_point(FAULT_MID_BATCH)
        if len(pairs) == self._batch_size:
            result.next_begin = pairs[-1][0] + b"\x00"
        return result

    def _rewrap(self, tr: SealedTransaction, key: bytes, value: bytes) -> bytes | None:
        """The key material record ``value`` with its KEK wrapped under the newest
        RMK, or None if it already is."""
        wrap_id, wrapped = records.decode_material(key, value)
        if wrap_id == self.newest_id:
            return None
        name = CryptoKeyVersionName(*unpack(key)[1:])
        version_key = records.version_key(name)
        version_value = tr.get(version_key)
        if version_value is None:
            raise DataLoss(
                "key material without a version record: its KEK can't be rewrapped, since the "
                "wrap is bound to the version's algorithm (valv fsck reports it too)")
        version = records.decode_version(name, version_key, version_value)
        new_id, new_wrapped = self._keyring.rewrap_kek(
            wrap_id, wrapped, version_name=str(name),
            algorithm=enum_name(Algorithm, version.algorithm))
        return records.encode_material(new_id, new_wrapped)
