"""The storage interface every backend implements.

Storage is an ordered, transactional key-value store with FoundationDB's
semantics (DESIGN.md §4): serializable transactions, byte-ordered keys, range
reads and retry on conflict. Keys are tuples packed with ``fdb.tuple`` (see
``valv.core.storage.keys``), so every backend shares one layout.

Transaction bodies are plain synchronous functions. A backend runs them off
the event loop (in a worker thread) and may run a body more than once when it
hits a conflict, so a body must not have side effects outside the
transaction it is given.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# FoundationDB's limits, enforced by every backend so that data written to the
# embedded store can always be migrated to FoundationDB.
MAX_KEY_BYTES = 10_000
MAX_VALUE_BYTES = 100_000
MAX_TRANSACTION_BYTES = 10_000_000


class StorageError(Exception):
    """A storage operation failed."""


class LimitExceededError(StorageError):
    """A key, value or transaction is larger than FoundationDB allows."""


class ReadOnlyTransactionError(StorageError):
    """A write was attempted inside a read-only transaction."""


class Transaction(abc.ABC):
    """One serializable transaction. Only valid inside the body it was given to."""

    @abc.abstractmethod
    def get(self, key: bytes) -> bytes | None:
        """The value at ``key``, or None."""

    @abc.abstractmethod
    def set(self, key: bytes, value: bytes) -> None:
        """Write ``value`` at ``key``."""

    @abc.abstractmethod
    def clear(self, key: bytes) -> None:
        """Remove ``key`` if present."""

    @abc.abstractmethod
    def clear_range(self, begin: bytes, end: bytes) -> None:
        """Remove every key k with begin <= k < end."""

    @abc.abstractmethod
    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        """Pairs with begin <= key < end in key order (descending if ``reverse``).

        ``limit`` > 0 caps the number of pairs returned.
        """

    def get_range_snapshot(
        self, begin: bytes, end: bytes, *, limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        """``get_range``, read without a read conflict (FoundationDB's snapshot read).

        For readers that must not be aborted by concurrent writers into the
        range: the versionstamp sequencers, which read the staging prefixes that
        every writer appends to. (FDB gives each versionstamped key a write
        conflict range reaching to the end of the prefix, so an ordinary read
        there would conflict with every concurrent writer.) Safe for them: what
        commits later gets a larger versionstamp and sorts after what was read.
        Backends whose writers are serialized read as usual (the default).
        """
        return self.get_range(begin, end, limit=limit)

    @property
    def supports_versionstamps(self) -> bool:
        """True if ``set_versionstamped`` works here (FoundationDB)."""
        return False

    def set_versionstamped(self, prefix: bytes, value: bytes) -> None:
        """Write ``value`` at ``keys.versionstamped_key(prefix, stamp, n)``.

        ``stamp`` is 10 bytes the store fills in at commit, ordered like the
        commits: a transaction that commits after another gets a larger one,
        so keys under ``prefix`` sort in commit order. ``n`` counts this
        transaction's calls (0, 1, 2...), ordering them within it. The point:
        an append-only log written this way needs no shared counter, so
        appends by concurrent transactions never conflict. ``prefix`` is a
        packed tuple. Only where ``supports_versionstamps``.
        """
        raise StorageError("this store has no versionstamped keys")


class Store(abc.ABC):
    """A transactional key-value store."""

    @abc.abstractmethod
    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        """Run ``body`` in one transaction, committing if it returns normally.

        If ``body`` raises, nothing it wrote is committed and the exception
        propagates. Conflicts are retried by running ``body`` again.
        """

    async def erase_freed_space(self) -> None:  # noqa: B027 - optional, no-op by default
        """Make values removed by committed transactions unrecoverable from the
        backend's own files, as far as the backend can (DESIGN.md §2:
        destruction erases key material). Backends without such files do
        nothing."""

    @property
    def supports_versionstamps(self) -> bool:
        """True if transactions offer ``set_versionstamped``: logs then append
        without a shared counter (valv.core.storage.staging)."""
        return False

    @property
    def supports_watches(self) -> bool:
        """True if ``wait_for_change`` really watches keys (FoundationDB).

        False (the default, and the sqlite backend): it returns False at once,
        and callers poll instead.
        """
        return False

    async def wait_for_change(self, key: bytes, timeout_s: float, *,
                              armed: asyncio.Event | None = None) -> bool:
        """Wait until the value at ``key`` changes, for at most ``timeout_s`` seconds.

        True: it changed (perhaps spuriously: the caller re-reads to see what
        changed). False: ``timeout_s`` passed with no change seen, or the
        store cannot watch (``supports_watches`` is False), in which case it
        returns at once. The watch is set during the call, so a change
        committed just before that is not reported: ``armed`` is set once the
        watch is in place, after which the caller reads the key once more to
        miss nothing. Raises StorageError if the watch cannot be set or fails.

        A store that wraps another without changing keys (sealing,
        journaling) should forward both this and ``supports_watches``.
        """
        return False

    @abc.abstractmethod
    async def close(self) -> None:
        """Release resources. No transaction may run afterwards."""

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """The storage URL this store was opened from (no secrets)."""
