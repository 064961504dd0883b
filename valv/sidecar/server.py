"""The sidecar process: local listeners, one channel to central, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

from grpclib.client import Channel
from grpclib.server import Server

from valv.core.authn import is_loopback
from valv.netutil import (
    CallTracker,
    bind_unix_socket,
    bound_port,
    drain_and_close,
    remove_unix_socket,
    write_ready_file,
)
from valv.sidecar.forward import Forwarder, TokenFile, client_ssl_context, raw_codecs

log = logging.getLogger("valv.sidecar")


class SidecarConfigError(ValueError):
    """A configuration the sidecar refuses to start with."""


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    central_host: str
    central_port: int
    host: str = "127.0.0.1"
    port: int = 50052
    unix_socket: Path | None = None
    token_file: Path | None = None
    central_ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    ready_file: Path | None = None
    drain_timeout_s: float = 10.0

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
        tcp = Server([forwarder], **raw_codecs())
        await tcp.start(config.host, config.port)
        self._servers.append(tcp)
        self.tcp_address = (config.host, bound_port(tcp))
        if config.unix_socket is not None:
            unix = Server([forwarder], **raw_codecs())
            await unix.start(sock=bind_unix_socket(config.unix_socket))
            self._servers.append(unix)
        log.info("valv sidecar serving", extra={"fields": {
            "addr": f"{self.tcp_address[0]}:{self.tcp_address[1]}",
            "unix_socket": str(config.unix_socket) if config.unix_socket else None,
            "central": config.central, "tls": self.ssl_context is not None,
            "token_file": str(config.token_file) if config.token_file else None}})
        if config.ready_file is not None:
            write_ready_file(config.ready_file, self.tcp_address, config.unix_socket)

    async def stop(self) -> None:
        """Drain in-flight calls (bounded), then stop listening and close the channel."""
        await drain_and_close(self._servers, self.tracker, self.config.drain_timeout_s, log)
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
