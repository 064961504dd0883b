"""valv.sidecar.v1.KeyMaterial/Watch: change-log events for sidecars, as they happen.

A stream (``WatchStream.events``) is the change log (valv.core.changelog) seen
from ``after_seq`` on, with live entries from central's ChangeHub
(valv.core.changehub), which the ChangeFollower feeds: within milliseconds for
changes through this central (KeyStore.after_change wakes the follower), and
within the follower's poll interval (0.2 s) for changes through another
central sharing the store.

Events, in this order:

- HELLO first, with ``seq``: after_seq, or the log's head when after_seq is 0;
  and ``heartbeat_seconds``.
- CHANGE for each entry after that, in seq order, each once: ``kind`` and
  ``resource`` as in the log. Seqs of entries the stream does not send
  (filtered, below) are skipped, so seqs need not be consecutive.
- RESET, with ``seq``, when central can't say what changed: after_seq is older
  than the retained log (trimmed) or newer than its head (the store went back,
  or another store); the follower missed entries; the stream fell more than
  the hub's bound (10,000 entries) behind; an entry of a kind this central does
  not know. The client drops everything and resumes after ``seq``, which may
  be lower than seqs it saw before (the store went back).
- HEARTBEAT when nothing else was sent for ``heartbeat_seconds``; its ``seq``
  is the stream's position (every entry up to it was sent or filtered), which
  a client may resume after as well.

The stream ends with UNAVAILABLE when central shuts down (ChangeHub.close,
before the drain: a Watch never holds the shutdown) or can't read the log; the
client reconnects with after_seq = the last seq it got.

Resume without races: the stream subscribes to the hub first, then reads the
log from after_seq (paged, ``read_since``), then takes live entries, skipping
those at or below the last seq it reached. An entry the hub brings after a
hole (seq above last + 1) sends the stream back to the log for the missing
ones; a hub reset makes it read the head H, send RESET(H) and go on from H
(entries it missed are at or below H; later ones come through the hub).

Filtering. CRYPTO_KEY and CRYPTO_KEY_VERSION events go to a stream only if its
principal holds, at the time the event is sent, cloudkms.cryptoKeyVersions.
useToEncrypt or useToDecrypt on the CryptoKey (the same cached IAM evaluation
as every call, valv.core.iam; in dev mode everything goes). IAM_POLICY,
KEY_RING, ROOT_KEYS and RESET go to every stream: a revocation must reach the
sidecar although afterwards its principal no longer has access to the key, and
those events name at most a KeyRing or CryptoKey, not its state. The price:
any principal that may call Watch learns the names of KeyRings and CryptoKeys
whose policies change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from grpclib import GRPCError
from grpclib.const import Status

from valv._proto.valv.sidecar import v1 as sidecar_v1
from valv.central.authz import is_dev
from valv.core import changelog, iam
from valv.core.calls import CallContext
from valv.core.changehub import ChangeHub, HubClosed, Reset
from valv.core.errors import InvalidArgument
from valv.core.iam import IamPolicies
from valv.core.names import CryptoKeyName, parse_crypto_key, parse_crypto_key_version
from valv.core.storage.base import Store

log = logging.getLogger("valv.watch")

DEFAULT_HEARTBEAT_S = 5
MAX_HEARTBEAT_S = 3600
# Log entries read per transaction while catching up.
PAGE = changelog.READ_LIMIT

Event = sidecar_v1.WatchEvent
EventType = sidecar_v1.WatchEventType
Kind = sidecar_v1.ChangeKind

KINDS: dict[str, Kind] = {
    changelog.CRYPTO_KEY: Kind.CRYPTO_KEY,
    changelog.VERSION: Kind.CRYPTO_KEY_VERSION,
    changelog.IAM: Kind.IAM_POLICY,
    changelog.KEY_RING: Kind.KEY_RING,
    changelog.ROOT_KEYS: Kind.ROOT_KEYS,
}
# Events about a key's own state: sent only to principals that may use the key.
_KEY_KINDS = frozenset({changelog.CRYPTO_KEY, changelog.VERSION})
_USE = (iam.USE_TO_ENCRYPT, iam.USE_TO_DECRYPT)

SHUTTING_DOWN = "central is shutting down; reconnect (resume after the last seq received)"


@dataclass(frozen=True, slots=True)
class WatchSettings:
    heartbeat_s: int = DEFAULT_HEARTBEAT_S
    page: int = PAGE


class Watches:
    """Central's Watch streams: one ``events`` generator per call."""

    def __init__(self, store: Store, hub: ChangeHub, policies: IamPolicies | None,
                 settings: WatchSettings | None = None) -> None:
        self._store = store
        self.hub = hub
        self._policies = policies
        self.settings = settings or WatchSettings()

    def events(self, call: CallContext | None, after_seq: int,
               epoch: bytes = b"") -> AsyncGenerator[Event, None]:
        return _Stream(self, call, after_seq, epoch).run()

    async def visible(self, call: CallContext | None, change: changelog.Change) -> bool:
        """Whether ``call``'s principal gets ``change`` (see the module doc)."""
        if change.kind not in _KEY_KINDS or call is None or is_dev(call):
            return True
        if self._policies is None:
            return False
        try:
            key: CryptoKeyName = (parse_crypto_key(change.resource)
                                  if change.kind == changelog.CRYPTO_KEY
                                  else parse_crypto_key_version(change.resource).parent)
        except InvalidArgument:
            return True  # not a name this central knows: over-telling is the safe side
        member = call.principal.member
        for permission in _USE:
            if await self._policies.allowed(member, key, permission):
                return True
        return False


class _Stream:
    def __init__(self, watches: Watches, call: CallContext | None, after_seq: int,
                 epoch: bytes = b"") -> None:
        self._w = watches
        self._call = call
        self._after = after_seq
        self._epoch = epoch
        # The position: every entry up to it was sent or filtered out.
        self.last = 0
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._loop.time()

    def _sent(self, event: Event) -> Event:
        self._last_sent = self._loop.time()
        return event

    async def run(self) -> AsyncGenerator[Event, None]:
        w = self._w
        try:
            subscription = w.hub.subscribe()  # before reading the log: nothing falls between
        except HubClosed:
            raise GRPCError(Status.UNAVAILABLE, SHUTTING_DOWN) from None
        with subscription:
            head, epoch = await changelog.head_and_epoch(w._store)
            if not epoch:  # central could not make it at startup: make it now
                epoch = await changelog.ensure_epoch(w._store)
            self.last = self._after or head
            yield self._sent(Event(type=EventType.HELLO, seq=self.last,
                                   heartbeat_seconds=w.settings.heartbeat_s, epoch=epoch))
            # An empty epoch proves nothing: only the same, known epoch resumes.
            if self._after and (not self._epoch or self._epoch != epoch):
                yield await self._reset("after_seq is from another epoch of the change log "
                                        "(the store was restored)")
            elif self._after > head:
                yield await self._reset("after_seq is past the log's head")
            else:
                async for event in self._catch_up():
                    yield event
            while True:
                timeout = self._last_sent + w.settings.heartbeat_s - self._loop.time()
                try:
                    item = await subscription.get(timeout=max(timeout, 0.0))
                except HubClosed:
                    raise GRPCError(Status.UNAVAILABLE, SHUTTING_DOWN) from None
                if item is None:
                    yield self._sent(Event(type=EventType.HEARTBEAT, seq=self.last))
                elif isinstance(item, Reset):
                    yield await self._reset(item.reason)
                elif item.seq <= self.last:
                    continue  # already sent while catching up
                else:
                    if item.seq > self.last + 1:
                        # A hole: read what the hub did not bring from the log.
                        async for event in self._catch_up():
                            yield event
                        if item.seq <= self.last:
                            continue
                    live = await self._event(item)
                    if live is not None:
                        yield live

    async def _catch_up(self) -> AsyncGenerator[Event, None]:
        """The log's entries after ``last``, a page per read-only transaction."""
        page = self._w.settings.page
        while True:
            batch = await changelog.read_since(self._w._store, self.last, limit=page)
            if batch.gap:
                yield await self._reset("entries after the stream's position were trimmed")
                return
            for change in batch.changes:
                event = await self._event(change)
                if event is not None:
                    yield event
            self.last = max(self.last, batch.last_seq)
            if len(batch.changes) < page:
                return

    async def _event(self, change: changelog.Change) -> Event | None:
        """The event for ``change`` (None: filtered out); the position moves past it."""
        self.last = change.seq
        kind = KINDS.get(change.kind)
        if kind is None:  # written by a newer central: drop everything to be safe
            return self._sent(Event(type=EventType.RESET, seq=change.seq))
        if not await self._w.visible(self._call, change):
            return None
        return self._sent(Event(type=EventType.CHANGE, seq=change.seq, kind=kind,
                                resource=change.resource))

    async def _reset(self, reason: str) -> Event:
        """RESET at the log's head, read now: whatever was missed is at or below it."""
        self.last = await changelog.head(self._w._store)
        log.info("watch stream reset", extra={"fields": {
            "reason": reason, "seq": self.last,
            "principal": self._call.principal.member if self._call else None}})
        return self._sent(Event(type=EventType.RESET, seq=self.last))
