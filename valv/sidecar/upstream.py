"""The sidecar's calls to central's private service (valv.sidecar.v1.KeyMaterial).

- ``fetch``: a version's KEK, sealed to this process's X25519 key, opened here.
- ``Watcher``: follows central's Watch stream and drops what changed from the
  caches; reconnects with backoff, resumes after the last seq it saw, and drops
  everything on a RESET (central can't say what changed) or when it can't
  resume.
- ``UsageReporter``: sends the per-minute use counts of local Encrypt/Decrypt
  calls so central's audit log still shows every use.

Every call carries the sidecar's own credentials (``Credentials``). Errors
that central returns are relayed to the local caller unchanged (status,
message, details); a central that can't be reached is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import StreamTerminatedError

from valv._proto.valv.sidecar import v1 as sidecar_v1
from valv.core.clock import Clock, SystemClock, to_micros
from valv.core.material import MaterialError, open_sealed
from valv.sidecar.cache import FetchedKek, KekCache
from valv.sidecar.forward import TokenFile

log = logging.getLogger("valv.sidecar")

_SERVICE = "/valv.sidecar.v1.KeyMaterial/"
FETCH_TIMEOUT_S = 10.0
REPORT_TIMEOUT_S = 10.0
_PURPOSE = {"ENCRYPT": sidecar_v1.Purpose.ENCRYPT, "DECRYPT": sidecar_v1.Purpose.DECRYPT}
# Transport failures: central is unreachable (or went away mid-call).
_UNREACHABLE = (OSError, StreamTerminatedError, ConnectionError)


class Credentials:
    """The sidecar's own identity for central: a bearer token from a file (if any);
    a client certificate, if any, is on the channel's TLS context."""

    def __init__(self, token: TokenFile | None) -> None:
        self._token = token

    def metadata(self) -> list[tuple[str, str]]:
        if self._token is None:
            return []
        return [("authorization", f"Bearer {self._token.token()}")]


class CentralUnavailable(GRPCError):
    """Central could not be reached for something the sidecar can't serve alone."""

    def __init__(self, central: str, what: str, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        super().__init__(
            Status.UNAVAILABLE,
            f"central at {central} is unreachable ({reason}) and {what}; the sidecar never "
            "serves key material past its TTL. Retry with backoff")


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class CentralLink:
    """One HTTP/2 channel to central for fetches, the watch and usage reports."""

    def __init__(self, channel: Channel, credentials: Credentials, central: str) -> None:
        self.channel = channel
        self.credentials = credentials
        self.central = central
        # This process's sealing key: material is sealed to it end to end. It
        # never leaves memory and dies with the process.
        self._private = X25519PrivateKey.generate()
        self._public = _raw_public(self._private)
        self.fetches = 0
        self.fetch_failures = 0

    async def _unary(self, method: str, request: Any, reply_type: type[Any],
                     timeout: float) -> Any:
        async with self.channel.request(
                _SERVICE + method, Cardinality.UNARY_UNARY, type(request), reply_type,
                timeout=timeout, metadata=self.credentials.metadata()) as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        if reply is None:
            raise GRPCError(Status.UNAVAILABLE, f"central at {self.central} sent no reply to "
                            f"{method}; retry")
        return reply

    async def fetch(self, key_name: str, version_id: int, purpose: str, *,
                    timeout: float = FETCH_TIMEOUT_S) -> FetchedKek:
        """``version_id`` of ``key_name`` (0: its primary) with its KEK, for ``purpose``
        ("ENCRYPT" or "DECRYPT"). Central's refusals are raised as its GRPCError."""
        self.fetches += 1
        request = sidecar_v1.FetchVersionRequest(
            crypto_key=key_name, version_id=version_id, purpose=_PURPOSE[purpose],
            recipient_public_key=self._public)
        try:
            # The channel's codec is the pass-through one (the forwarder's), so
            # encode and decode here.
            raw = await self._unary("FetchVersion", bytes(request), bytes, timeout)
        except GRPCError:
            self.fetch_failures += 1
            raise
        except TimeoutError as exc:
            self.fetch_failures += 1
            raise CentralUnavailable(self.central, f"fetching {key_name} timed out", exc) \
                from None
        except _UNREACHABLE as exc:
            self.fetch_failures += 1
            what = (f"{key_name} version {version_id}" if version_id
                    else f"the primary version of {key_name}")
            raise CentralUnavailable(self.central, f"{what} is not cached", exc) from None
        response = sidecar_v1.FetchVersionResponse.parse(raw)
        version_id_got = int(response.version.rsplit("/", 1)[-1]) \
            if "/cryptoKeyVersions/" in response.version else 0
        if not response.version.startswith(key_name + "/cryptoKeyVersions/") or (
                version_id and version_id_got != version_id):
            self.fetch_failures += 1
            raise GRPCError(Status.UNAVAILABLE, f"central answered a fetch of {key_name} with "
                            f"material for {response.version!r}; refusing it")
        try:
            kek = open_sealed(response.sealed_material, self._private,
                              version_name=response.version, purpose=purpose)
        except MaterialError as exc:
            self.fetch_failures += 1
            log.error("sealed material from central did not open", extra={"fields": {
                "version": response.version, "error": str(exc)}})
            raise GRPCError(Status.UNAVAILABLE, f"the key material central sent for "
                            f"{response.version} did not verify; retry") from None
        return FetchedKek(version_id_got, kek, bool(response.is_primary),
                          ttl_s=float(response.ttl_seconds) or None)

    async def report_usage(self, counts: Sequence[sidecar_v1.UsageCount]) -> None:
        request = sidecar_v1.ReportUsageRequest(counts=list(counts))
        await self._unary("ReportUsage", bytes(request), bytes, REPORT_TIMEOUT_S)


# ---- the watch stream -----------------------------------------------------------------------

@dataclass(slots=True)
class WatchStats:
    connected: bool = False
    connects: int = 0
    events: int = 0
    resets: int = 0
    last_seq: int = 0
    last_error: str = ""  # why the stream last failed or ended (for /readyz)


class Watcher:
    """Follows central's Watch stream and invalidates ``caches`` as changes arrive.

    Ordering: the stream's seqs say where to resume. After a (re)connect with
    nothing to resume from (first start), when central sends RESET, or when
    the log's epoch changed (the store was restored), everything cached is
    dropped, because changes may have been missed. Otherwise a reconnect is a
    revalidation by replay: central sends every change after the last seq
    this sidecar saw, so each cached entry is checked against all it missed,
    and only what changed is dropped.
    Changes through any central reach here because every central follows the
    shared change log.

    A stream silent for 3 heartbeats is treated as dead and reconnected.
    Reconnects back off exponentially (with jitter) up to ``max_backoff_s``.
    """

    def __init__(self, link: CentralLink, caches: Sequence[KekCache], *,
                 min_backoff_s: float = 0.05, max_backoff_s: float = 5.0,
                 on_change: Callable[[], None] | None = None) -> None:
        self.link = link
        self.caches = list(caches)
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        self.stats = WatchStats()
        self._seq = 0  # 0: nothing to resume from
        self._epoch = b""  # the change log's epoch _seq belongs to (from HELLO)
        self._on_change = on_change
        self._failing = False
        self.connected = asyncio.Event()

    def _drop_all(self) -> None:
        for cache in self.caches:
            cache.invalidate_all()

    def apply(self, event: sidecar_v1.WatchEvent) -> None:
        """Apply one CHANGE event to the caches."""
        kind, resource = event.kind, event.resource
        kinds = sidecar_v1.ChangeKind
        for cache in self.caches:
            if kind == kinds.CRYPTO_KEY:
                cache.invalidate_key(resource)
            elif kind == kinds.CRYPTO_KEY_VERSION:
                key_name, _, version = resource.rpartition("/cryptoKeyVersions/")
                if key_name and version.isdigit():
                    # Also drops the key's primary pointer if it points here.
                    cache.invalidate_version(key_name, int(version))
                else:
                    cache.invalidate_all()
            elif kind in (kinds.IAM_POLICY, kinds.KEY_RING):
                if "/cryptoKeys/" in resource:
                    cache.invalidate_key(resource)
                else:
                    cache.invalidate_prefix(resource)
            else:  # ROOT_KEYS, or a kind this sidecar does not know: drop everything
                cache.invalidate_all()
        if self._on_change is not None:
            self._on_change()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = self.min_backoff_s
        while not stop.is_set():
            started = time.monotonic()
            try:
                await self._follow(stop)
            except asyncio.CancelledError:
                raise
            except GRPCError as exc:
                self._disconnected(f"{exc.status.name}: {exc.message}")
            except (*_UNREACHABLE, TimeoutError) as exc:
                self._disconnected(f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # never let the watch die silently
                log.exception("watch stream failed")
                self._disconnected(f"{type(exc).__name__}: {exc}")
            if stop.is_set():
                break
            if time.monotonic() - started > 10 * self.max_backoff_s:
                backoff = self.min_backoff_s  # it had been up for a while
            delay = backoff * (0.5 + random.random())  # noqa: S311 (jitter, not crypto)
            backoff = min(backoff * 2, self.max_backoff_s)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
        self.stats.connected = False
        self.connected.clear()

    def _disconnected(self, reason: str) -> None:
        if self.stats.connected:
            log.warning("watch stream to central lost; cached material keeps serving until "
                        "its TTL, reconnecting", extra={"fields": {"reason": reason}})
        elif not self._failing:  # once per streak of failed attempts, not every retry
            log.warning("cannot open the watch stream to central; retrying with backoff "
                        "(revocations reach this sidecar only through it)",
                        extra={"fields": {"reason": reason}})
        self._failing = True
        self.stats.last_error = reason
        self.stats.connected = False
        self.connected.clear()

    async def _follow(self, stop: asyncio.Event) -> None:
        request = sidecar_v1.WatchRequest(after_seq=self._seq, epoch=self._epoch)
        async with self.link.channel.request(
                _SERVICE + "Watch", Cardinality.UNARY_STREAM, bytes, bytes,
                metadata=self.link.credentials.metadata()) as stream:
            await stream.send_message(bytes(request), end=True)
            silence_limit = 15.0  # until HELLO says how often heartbeats come
            stopping = asyncio.ensure_future(stop.wait())
            try:
                while True:
                    receive = asyncio.ensure_future(stream.recv_message())
                    done, _ = await asyncio.wait({receive, stopping}, timeout=silence_limit,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if receive not in done:
                        receive.cancel()
                        if stopping in done:
                            # Reset the stream: leaving the block without it would wait
                            # for central's trailers, which a Watch never sends.
                            await stream.cancel()
                            return
                        raise TimeoutError(f"no event or heartbeat for {silence_limit:.0f} s")
                    raw = receive.result()
                    if raw is None:  # central ended the stream
                        await stream.recv_trailing_metadata()
                        raise GRPCError(Status.UNAVAILABLE, "central ended the watch stream")
                    event = sidecar_v1.WatchEvent.parse(raw)
                    silence_limit = self._handle(event, silence_limit)
            finally:
                stopping.cancel()

    def _handle(self, event: sidecar_v1.WatchEvent, silence_limit: float) -> float:
        types = sidecar_v1.WatchEventType
        if event.type == types.HELLO:
            resumed = self._seq != 0 and bool(event.epoch) and event.epoch == self._epoch
            if not resumed:
                # Material fetched before the stream was up may have changed
                # since (or the seqs it came with belong to a store since
                # restored: a new epoch): start clean. Central also sends RESET
                # for another epoch; this does not depend on it.
                self._drop_all()
            self._epoch = bytes(event.epoch)
            self._seq = event.seq
            self.stats.connects += 1
            self.stats.connected = True
            self._failing = False
            self.connected.set()
            log.info("watching central for changes", extra={"fields": {
                "seq": event.seq, "resumed": resumed}})
            if event.heartbeat_seconds:
                return 3.0 * event.heartbeat_seconds
        elif event.type == types.CHANGE:
            self.stats.events += 1
            self.apply(event)
            self._seq = max(self._seq, event.seq)
        elif event.type == types.RESET:
            self.stats.resets += 1
            log.warning("central could not say what changed while this sidecar was away; "
                        "dropping every cached key")
            self._drop_all()
            self._seq = event.seq
        self.stats.last_seq = self._seq
        return silence_limit


# ---- usage reports --------------------------------------------------------------------------

_WINDOW_US = 60_000_000
MAX_PENDING_BUCKETS = 100_000
MAX_COUNTS_PER_REPORT = 5_000


class UsageReporter:
    """Counts local Encrypt/Decrypt uses per version x RPC x status x minute and sends
    them to central (ReportUsage). Counts that can't be sent are kept for the next
    report, up to MAX_PENDING_BUCKETS buckets; beyond that new buckets are dropped
    and counted (``dropped``) and an error is logged, so memory stays bounded."""

    def __init__(self, link: CentralLink, clock: Clock | None = None, *,
                 interval_s: float = 10.0) -> None:
        self.link = link
        self.clock = clock or SystemClock()
        self.interval_s = interval_s
        self._buckets: dict[tuple[str, str, str, int], int] = {}
        self.reported = 0
        self.dropped = 0
        self._window = -1
        self._window_ends = 0.0

    def count(self, version_name: str, rpc: str, status: str = "OK") -> None:
        now = time.monotonic()
        if now >= self._window_ends:  # the wall clock is read once a second at most
            now_us = to_micros(self.clock.now())
            self._window = now_us - now_us % _WINDOW_US
            self._window_ends = now + 1.0
        key = (version_name, rpc, status, self._window)
        count = self._buckets.get(key)
        if count is not None:
            self._buckets[key] = count + 1
        elif len(self._buckets) < MAX_PENDING_BUCKETS:
            self._buckets[key] = 1
        else:
            if self.dropped == 0:
                log.error("usage counts can't reach central and the buffer is full; new "
                          "counts are dropped from the audit log until central is back")
            self.dropped += 1

    @property
    def pending(self) -> int:
        return sum(self._buckets.values())

    async def flush(self) -> int:
        """Send every count; what could not be sent stays. Returns counts sent."""
        sent = 0
        while self._buckets:
            batch = list(self._buckets.items())[:MAX_COUNTS_PER_REPORT]
            for key, _ in batch:
                del self._buckets[key]
            counts = [sidecar_v1.UsageCount(crypto_key_version=version, rpc=rpc, status=status,
                                            window_start_us=window, count=count)
                      for (version, rpc, status, window), count in batch]
            try:
                await self.link.report_usage(counts)
            except BaseException:
                for key, count in batch:  # back, merged with anything counted meanwhile
                    self._buckets[key] = self._buckets.get(key, 0) + count
                raise
            sent += sum(count for _, count in batch)
        self.reported += sent
        return sent

    async def run(self, stop: asyncio.Event) -> None:
        """Report every ``interval_s`` until ``stop``; the owner sends the last counts."""
        failing = False
        while True:
            try:
                await asyncio.wait_for(stop.wait(), self.interval_s)
                return
            except TimeoutError:
                pass
            try:
                await self.flush()
                failing = False
            except (GRPCError, *_UNREACHABLE, TimeoutError) as exc:
                if not failing:
                    log.warning("usage report to central failed; keeping the counts",
                                extra={"fields": {"error": str(exc),
                                                  "pending": self.pending}})
                failing = True
