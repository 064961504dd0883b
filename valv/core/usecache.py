"""A short-lived, bounded cache of what Encrypt and Decrypt need.

Encrypt and Decrypt are the hot path: batch jobs wrap millions of DEKs. Each
call would otherwise read three records, unseal and decode them, and unwrap
the KEK. This cache keeps that result for a short time (default 1 s).

Consistency:
- Changes made through this process invalidate the affected key once their
  transaction has finished (committed or not; see KeyStore._change), so a
  caller never sees its own change late.
- A change made through another central process sharing the store reaches
  this one within the TTL. Cloud KMS documents state changes as eventually
  consistent too; set the TTL to 0 to read storage on every call.
- A load that raced with an invalidation is never cached: ``begin_load``
  returns a ticket (a counter, not a time), and ``put`` drops a result when
  its key was invalidated after the ticket was taken. Invalidations are
  remembered per key in a bounded map; when one is forgotten, every ticket
  older than it is refused, so forgetting only costs a cache miss.

Secrets: unwrapped KEKs live here for at most the TTL (plus until the
garbage collector frees them); they are not zeroized on eviction because a
call may still be using them, so their lifetime is bounded instead.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from valv.core.crypto.secrets import SecretBytes
from valv.core.model import CryptoKeyVersion


@dataclass(frozen=True, slots=True)
class UsableVersion:
    """A version's metadata and unwrapped KEK, as of one storage read."""

    version: CryptoKeyVersion
    kek: SecretBytes
    # The key's primary version id at the same read.
    primary_version_id: int


class UseCache:
    def __init__(self, ttl_s: float = 1.0, maxsize: int = 10_000,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.enabled = ttl_s > 0
        self._lock = threading.Lock()
        # (key name, version id) -> UsableVersion; version id 0 means "the primary".
        self._entries: TTLCache[tuple[str, int], UsableVersion] = TTLCache(
            maxsize, max(ttl_s, 1e-9), timer=timer)
        self._max_invalidations = maxsize
        self._counter = 0
        # key name -> counter value of its latest invalidation, oldest first.
        self._invalidated: OrderedDict[str, int] = OrderedDict()
        # The newest invalidation that was dropped from _invalidated.
        self._forgotten = 0

    def get(self, key_name: str, version_id: int) -> UsableVersion | None:
        if not self.enabled:
            return None
        with self._lock:
            return self._entries.get((key_name, version_id))

    def begin_load(self) -> int:
        """A ticket to pass to ``put`` with what is about to be read from storage."""
        with self._lock:
            return self._counter

    def put(self, key_name: str, ticket: int, entry: UsableVersion, *,
            as_primary: bool) -> None:
        if not self.enabled:
            return
        with self._lock:
            if ticket < self._forgotten or self._invalidated.get(key_name, -1) >= ticket + 1:
                return  # possibly older than a change to this key
            self._entries[(key_name, entry.version.name.version)] = entry
            if as_primary:
                self._entries[(key_name, 0)] = entry

    def invalidate(self, key_name: str) -> None:
        with self._lock:
            self._counter += 1
            self._invalidated[key_name] = self._counter
            self._invalidated.move_to_end(key_name)
            while len(self._invalidated) > self._max_invalidations:
                _, dropped = self._invalidated.popitem(last=False)
                self._forgotten = max(self._forgotten, dropped)
            for cache_key in [k for k in self._entries if k[0] == key_name]:
                self._entries.pop(cache_key, None)

    def clear(self) -> None:
        """Drop everything, and refuse every load that started before now."""
        with self._lock:
            self._counter += 1
            self._forgotten = self._counter
            self._entries.clear()
