"""The sidecar process: local listeners, one channel to central, clean shutdown.

Encrypt and Decrypt are answered locally (valv.sidecar.local) from two
caches of KEK versions (valv.sidecar.cache), one per purpose; every other
method is forwarded (valv.sidecar.forward). Background tasks: the watch
stream (invalidations), usage reports, and a timer that wipes expired
material even when no call comes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from grpclib.client import Channel
from grpclib.server import Server

from valv.core.addresses import is_loopback
from valv.core.crypto.ciphertext import CiphertextCodec
from valv.netutil import (
    CallTracker,
    bind_unix_socket,
    bound_port,
    drain_and_close,
    remove_unix_socket,
    write_ready_file,
)
from valv.sidecar.cache import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_USES, DEFAULT_TTL_SECONDS, KekCache
from valv.sidecar.forward import Forwarder, TokenFile, client_ssl_context, raw_codecs
from valv.sidecar.local import LocalCrypto
from valv.sidecar.upstream import CentralLink, Credentials, UsageReporter, Watcher

if TYPE_CHECKING:
    from valv.sidecar.metrics import MetricsServer

log = logging.getLogger("valv.sidecar")


# Derived subkeys kept ready per sidecar (see LocalCrypto's codec below).
SUBKEY_CACHE_ENTRIES = 256

class SidecarConfigError(ValueError):
    """A configuration the sidecar refuses to start with."""


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    central_host: str
    central_port: int
    host: str = "127.0.0.1"
    port: int = 50052
    unix_socket: Path | None = None
    unix_socket_mode: int = 0o600  # or 0o660 (its group too); never others
    token_file: Path | None = None
    central_ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ready_file: Path | None = None
    drain_timeout_s: float = 10.0
    cache_ttl_s: float = DEFAULT_TTL_SECONDS
    cache_max_uses: int = DEFAULT_MAX_USES
    cache_max_entries: int = DEFAULT_MAX_ENTRIES
    usage_report_interval_s: float = 10.0
    watch_max_backoff_s: float = 5.0
    metrics_host: str | None = None
    metrics_port: int = 0

    @property
    def central(self) -> str:
        return f"{self.central_host}:{self.central_port}"

    @property
    def tls(self) -> bool:
        return bool(self.central_ca_file or self.client_cert_file)

    def check(self) -> None:
        if not is_loopback(self.host):
            raise SidecarConfigError(
                f"the sidecar listens on loopback only (and the unix socket); {self.host!r} is "
                "not a loopback address: local callers act with the sidecar's identity")
        if (self.client_key_file is None) != (self.client_cert_file is None):
            raise SidecarConfigError(
                "--client-cert-file and --client-key-file go together")
        if self.cache_ttl_s <= 0 or self.cache_max_uses < 1 or self.cache_max_entries < 1:
            raise SidecarConfigError(
                "--cache-ttl must be positive, --cache-max-uses and --cache-max-entries >= 1")
        if self.usage_report_interval_s <= 0 or self.watch_max_backoff_s <= 0:
            raise SidecarConfigError(
                "--usage-report-interval and the watch backoff must be positive")


class SidecarServer:
    def __init__(self, config: SidecarConfig) -> None:
        config.check()
        self.config = config
        self.token = TokenFile(config.token_file) if config.token_file else None
        self.ssl_context = (client_ssl_context(config.central_ca_file, config.client_cert_file,
                                               config.client_key_file)
                            if config.tls else None)
        self.tracker = CallTracker()
        self.channel: Channel | None = None
        self._servers: list[Server] = []
        self.tcp_address: tuple[str, int] | None = None
        # Subkeys derived from a KEK are dropped when it is wiped (on_wipe
        # below), and live no longer than the KEK's TTL in any case. A few hot
        # ones only: each is an AESGCM object of ~1.4 KB (OpenSSL context), and a
        # miss costs one HKDF and one AESGCM set-up, microseconds against a
        # ~0.8 ms call. With 4096 of them 10k cached versions took the RSS to 84 MB.
        self.codec = CiphertextCodec(cache_ttl_seconds=config.cache_ttl_s,
                                     cache_maxsize=SUBKEY_CACHE_ENTRIES)
        # A busy version is fetched again in the last fifth of its TTL, so it
        # doesn't run out under its callers (valv.sidecar.cache, "Refresh ahead").
        self.encrypt_cache, self.decrypt_cache = (
            KekCache(ttl_s=config.cache_ttl_s, max_uses=config.cache_max_uses,
                     max_entries=config.cache_max_entries,
                     refresh_ahead_s=config.cache_ttl_s / 5,
                     on_wipe=self.codec.cache.evict_version)
            for _ in range(2))
        self.link: CentralLink | None = None
        self.forwarder: Forwarder | None = None
        self.local: LocalCrypto | None = None
        self.watcher: Watcher | None = None
        self.usage: UsageReporter | None = None
        self.metrics: MetricsServer | None = None  # only with --metrics-addr
        self._stop_background = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        config = self.config
        if self.token is not None and self.ssl_context is None \
                and not is_loopback(config.central_host):
            log.warning("sending the bearer token to central without TLS; use "
                        "--central-ca-file unless a proxy on this host adds TLS",
                        extra={"fields": {"central": config.central}})
        # grpclib captures the running loop when a Channel or Server is built: build here.
        self.channel = Channel(config.central_host, config.central_port,
                               ssl=self.ssl_context, **raw_codecs())
        forwarder = Forwarder(self.channel, token=self.token, tracker=self.tracker,
                              central=config.central)
        link = CentralLink(self.channel, Credentials(self.token), config.central)
        caches = (self.encrypt_cache, self.decrypt_cache)
        self.usage = UsageReporter(link, interval_s=config.usage_report_interval_s)
        self.watcher = Watcher(link, caches, max_backoff_s=config.watch_max_backoff_s)
        local = LocalCrypto(link=link, forwarder=forwarder, tracker=self.tracker,
                            encrypt_cache=self.encrypt_cache, decrypt_cache=self.decrypt_cache,
                            usage=self.usage, codec=self.codec)
        self.link, self.forwarder, self.local = link, forwarder, local
        stop = self._stop_background
        self._background = [asyncio.create_task(self.watcher.run(stop)),
                            asyncio.create_task(self.usage.run(stop)),
                            asyncio.create_task(self._expire_caches(stop))]
        # grpclib's Server looks methods up in the servables' merged mappings,
        # later ones winning: the local Encrypt/Decrypt replace the forwarder's.
        tcp = Server([forwarder, local], **raw_codecs())
        await tcp.start(config.host, config.port)
        self._servers.append(tcp)
        self.tcp_address = (config.host, bound_port(tcp))
        if config.unix_socket is not None:
            unix = Server([forwarder, local], **raw_codecs())
            await unix.start(sock=bind_unix_socket(config.unix_socket,
                                                   config.unix_socket_mode))
            self._servers.append(unix)
        metrics_address = None
        if config.metrics_host is not None:
            # Imported only when asked for: aiohttp adds ~10 MB to a process
            # that runs in every pod.
            from valv.sidecar.metrics import MetricsServer

            self.metrics = MetricsServer(self.samples, self.readiness)
            await self.metrics.start(config.metrics_host, config.metrics_port)
            metrics_address = self.metrics.address
        log.info("valv sidecar serving", extra={"fields": {
            "addr": f"{self.tcp_address[0]}:{self.tcp_address[1]}",
            "unix_socket": str(config.unix_socket) if config.unix_socket else None,
            "central": config.central, "tls": self.ssl_context is not None,
            "token_file": str(config.token_file) if config.token_file else None,
            "cache_ttl_s": config.cache_ttl_s, "cache_max_entries": config.cache_max_entries,
            "metrics": f"{metrics_address[0]}:{metrics_address[1]}" if metrics_address
            else None}})
        if config.ready_file is not None:
            write_ready_file(config.ready_file, self.tcp_address, config.unix_socket,
                             metrics=metrics_address)

    async def _expire_caches(self, stop: asyncio.Event) -> None:
        """Wipe expired material about once a second, even when no call comes."""
        interval = min(1.0, self.config.cache_ttl_s / 4)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
            self.encrypt_cache.expire()
            self.decrypt_cache.expire()

    def readiness(self) -> tuple[bool, str]:
        if self.tracker.draining:
            return False, "shutting down"
        if self.watcher is None or not self.watcher.stats.connected:
            why = self.watcher.stats.last_error if self.watcher is not None else ""
            return False, "the watch stream to central is not connected" + (
                f" ({why})" if why else "")
        return True, "ready"

    def samples(self) -> list[tuple[str, str, str, float]]:
        """Counters and gauges for /metrics (counts only: no names, no key bytes)."""
        enc, dec = self.encrypt_cache.stats, self.decrypt_cache.stats
        link, watch, usage = self.link, self.watcher, self.usage
        return [
            ("valv_sidecar_local_calls_total", "counter",
             "Encrypt/Decrypt calls answered in the sidecar",
             self.local.local_calls if self.local else 0),
            ("valv_sidecar_forwarded_calls_total", "counter",
             "calls forwarded to central", self.forwarder.forwarded if self.forwarder else 0),
            ("valv_sidecar_central_fetches_total", "counter",
             "FetchVersion calls to central", link.fetches if link else 0),
            ("valv_sidecar_central_fetch_failures_total", "counter",
             "FetchVersion calls that failed", link.fetch_failures if link else 0),
            ("valv_sidecar_cache_hits_total", "counter", "cache hits", enc.hits + dec.hits),
            ("valv_sidecar_cache_misses_total", "counter", "cache misses",
             enc.misses + dec.misses),
            ("valv_sidecar_cache_entries", "gauge", "KEK versions cached (both purposes)",
             len(self.encrypt_cache) + len(self.decrypt_cache)),
            ("valv_sidecar_cache_expirations_total", "counter", "entries expired (TTL)",
             enc.expirations + dec.expirations),
            ("valv_sidecar_cache_exhausted_total", "counter", "entries used up (max uses)",
             enc.exhausted + dec.exhausted),
            ("valv_sidecar_cache_evictions_total", "counter", "entries evicted for size",
             enc.evictions + dec.evictions),
            ("valv_sidecar_cache_invalidations_total", "counter",
             "entries dropped by the watch stream", enc.invalidations + dec.invalidations),
            ("valv_sidecar_watch_connected", "gauge", "1 while the watch stream is up",
             1 if watch and watch.stats.connected else 0),
            ("valv_sidecar_watch_events_total", "counter", "change events received",
             watch.stats.events if watch else 0),
            ("valv_sidecar_watch_resets_total", "counter", "RESET events received",
             watch.stats.resets if watch else 0),
            ("valv_sidecar_usage_reported_total", "counter",
             "uses reported to central's audit log", usage.reported if usage else 0),
            ("valv_sidecar_usage_pending", "gauge", "uses counted, not yet reported",
             usage.pending if usage else 0),
            ("valv_sidecar_usage_dropped_total", "counter",
             "uses that could not be kept for reporting", usage.dropped if usage else 0),
        ]

    async def stop(self) -> None:
        """Drain in-flight calls (bounded), then stop listening and close the channel."""
        await drain_and_close(self._servers, self.tracker, self.config.drain_timeout_s, log)
        self._stop_background.set()
        if self._background:
            # They all watch the stop event; one stuck on central (a call to
            # a central that is itself shutting down) must not hold the exit.
            _, stuck = await asyncio.wait(self._background, timeout=1.0)
            for task in stuck:
                task.cancel()
            results = await asyncio.gather(*self._background, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    log.error("background task failed", exc_info=result)
        self._background = []
        if self.usage is not None and self.usage.pending:
            try:  # the last counts, so the audit log misses none
                await asyncio.wait_for(self.usage.flush(), 3.0)
            except Exception as exc:
                log.error("could not report the last usage counts to central",
                          extra={"fields": {"pending": self.usage.pending,
                                            "error": f"{type(exc).__name__}: {exc}"}})
        if self.metrics is not None:
            await self.metrics.stop()
        self.encrypt_cache.invalidate_all()  # wipe all material now
        self.decrypt_cache.invalidate_all()
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.config.unix_socket is not None:
            remove_unix_socket(self.config.unix_socket)
        log.info("valv sidecar stopped")


async def run_sidecar(config: SidecarConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = SidecarServer(config)
    await server.start()
    try:
        await stop.wait()
        log.info("shutdown requested")
    finally:
        await server.stop()
