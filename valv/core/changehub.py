"""Fan-out of change-log entries to many subscribers (central's Watch streams).

A ``ChangeHub`` is one more listener of central's ChangeFollower
(valv.core.changelog): the follower reads each entry once and the hub hands
it to every ``Subscription``, in seq order. Each subscription is a bounded
queue of ``Change`` entries and ``Reset`` markers:

- ``Reset`` says changes were missed and the subscriber must drop everything
  it derived from earlier ones: the follower found a gap (entries trimmed, or
  the store went back), or the subscription overflowed. A reset replaces
  whatever was still queued (it covers it), so it is never behind them.
- Bounded: past ``max_pending`` queued items (a subscriber that does not keep
  up, e.g. a stalled network peer) the queue is dropped and replaced by one
  ``Reset``; entries after it queue again. Memory per subscriber stays bounded
  however slow it is, and it still learns that it missed something.
- A reset carries no seq: the follower's position is not the subscriber's.
  A subscriber that needs one reads the log's head *after* taking the reset
  (valv.central.watch does): every entry it missed is at or below that head,
  and every entry above it still comes through the queue.

``close()`` (central shutting down) ends every subscription: ``get`` raises
``HubClosed`` at once, even with items queued, and ``subscribe`` refuses.

Nothing here depends on where entries come from: the follower polls (and is
woken by local commits); an FDB backend could feed the same hub from a watch.
Event-loop only: not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from valv.core.changelog import Change

# Items queued per subscription before it is reset instead.
DEFAULT_MAX_PENDING = 10_000


@dataclass(frozen=True, slots=True)
class Reset:
    """Changes were missed: drop everything. ``reason``: "gap" or "overflow"."""

    reason: str


GAP = Reset("gap")
OVERFLOW = Reset("overflow")

Item = Change | Reset


class HubClosed(Exception):
    """The hub was closed (central is shutting down)."""


class Subscription:
    """One subscriber's queue. Use as a context manager, or call ``close()``."""

    def __init__(self, hub: ChangeHub, max_pending: int) -> None:
        self._hub = hub
        self._max_pending = max_pending
        self._items: deque[Item] = deque()
        self._ready = asyncio.Event()
        self.closed = False
        # How often the queue overflowed (each time replaced by a Reset).
        self.overflows = 0

    @property
    def pending(self) -> int:
        return len(self._items)

    def _put(self, item: Item) -> None:
        if isinstance(item, Reset):
            self._items.clear()  # a reset covers whatever was queued before it
        elif len(self._items) >= self._max_pending:
            self.overflows += 1
            self._items.clear()
            item = OVERFLOW
        self._items.append(item)
        self._ready.set()

    def _wake(self) -> None:
        self._ready.set()

    def get_nowait(self) -> Item | None:
        """The next item, or None if none is queued. Raises HubClosed once the hub is."""
        if self._hub.closed:
            raise HubClosed("the change hub is closed")
        if not self._items:
            self._ready.clear()
            return None
        return self._items.popleft()

    async def get(self, timeout: float | None = None) -> Item | None:
        """The next item; None if none came within ``timeout`` seconds.

        Raises HubClosed once the hub is closed (queued items are dropped).
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._ready.wait(), remaining)
            except TimeoutError:
                pass

    def close(self) -> None:
        """Unsubscribe (idempotent); nothing more is queued."""
        if not self.closed:
            self.closed = True
            self._items.clear()
            self._hub._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChangeHub:
    """Hands every change-log entry to every subscriber; a ChangeFollower listener."""

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        self._max_pending = max_pending
        self._subscriptions: set[Subscription] = set()
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self) -> Subscription:
        """A new subscription: it gets every entry the hub is given from now on."""
        if self.closed:
            raise HubClosed("the change hub is closed")
        subscription = Subscription(self, self._max_pending)
        self._subscriptions.add(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)

    # ---- the ChangeListener protocol (valv.core.changelog) ------------------------

    def changed(self, change: Change) -> None:
        for subscription in self._subscriptions:
            subscription._put(change)

    def reset(self) -> None:
        for subscription in self._subscriptions:
            subscription._put(GAP)

    # ---- shutdown ------------------------------------------------------------------

    def close(self) -> None:
        """End every subscription now (their ``get`` raises HubClosed); refuse new ones."""
        self.closed = True
        for subscription in list(self._subscriptions):
            subscription._wake()
