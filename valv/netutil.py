"""What central and the sidecar share about serving gRPC with grpclib: the
listen sockets, the ready file, counting and draining calls, and the request
size bound."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.server import Server


def bound_port(server: Server) -> int:
    """The TCP port a started grpclib server listens on (useful after port 0)."""
    # grpclib keeps the asyncio server private and exposes no address API.
    inner = server._server
    if not isinstance(inner, asyncio.base_events.Server) or not inner.sockets:
        raise RuntimeError("server is not listening on a TCP socket")
    return int(inner.sockets[0].getsockname()[1])


def bind_unix_socket(path: Path, mode: int = 0o600) -> socket.socket:
    """A unix socket bound at ``path``, mode 0600 from the start, then ``mode``
    (e.g. 0660, to let the socket's group in: an application container running
    as another user of a shared group). Access for others is refused: anyone who
    can connect acts with the server's identity.

    A stale socket file left by a dead process is replaced; anything else at
    ``path`` (a regular file, a live server's socket) is refused, so a
    mistyped path can never delete data.
    """
    if mode & ~0o660:
        raise ValueError(f"unix socket mode {mode:04o} is refused: only the owner and its "
                         "group may connect (0600 or 0660)")
    try:
        existing = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: a stale socket from a process that died
        else:
            raise FileExistsError(f"another process is already serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a restrictive umask so there is no moment the socket is open
    # to other users (the umask is process-wide, and only ever tightened here).
    previous = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(previous)
    os.chmod(path, mode)
    return sock


def remove_unix_socket(path: Path) -> None:
    """Remove our socket file at shutdown, and nothing that isn't a socket."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass


# The largest request message accepted. The biggest valid KMS request is an
# Encrypt with 64 KiB of plaintext and 64 KiB of AAD; gRPC's own default is 4 MiB.
MAX_REQUEST_BYTES = 1024 * 1024


def limit_request_size(stream: Any) -> None:
    """Refuse a request message longer than MAX_REQUEST_BYTES before reading it.

    grpclib reads a whole length-prefixed message into memory before decoding
    it and has no size limit, so one huge request could exhaust memory. Its
    reader asks the HTTP/2 stream for the 5-byte prefix and then for exactly
    the announced length; we refuse that second read when it is too large.
    (This reaches into grpclib's private stream object: covered by a test.)
    """
    protocol_stream = stream._stream
    read = protocol_stream.recv_data

    async def bounded_read(size: int) -> bytes:
        if size > MAX_REQUEST_BYTES:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED,
                f"the request message is {size} bytes; the limit is {MAX_REQUEST_BYTES} bytes",
            )
        data: bytes = await read(size)
        return data

    protocol_stream.recv_data = bounded_read


def release_request_limit(stream: Any) -> None:
    """Undo :func:`limit_request_size` once a call is over.

    That guard puts a closure on grpclib's protocol stream which holds the
    stream's own bound ``recv_data``: a reference cycle. Left alone, every
    call's stream (with its buffer, queues and events, about 5 KB) is freed
    only by the cycle collector, typically long after the call, since it gets
    promoted past the young generations while the call is in flight: with 64
    calls in flight that was about 5 MB of the sidecar's RSS. Dropping the
    closure when the handler is done lets reference counting free it at once.
    """
    attributes = getattr(getattr(stream, "_stream", None), "__dict__", None)
    if attributes is not None:
        attributes.pop("recv_data", None)  # the class's own recv_data again


class CallTracker:
    """Counts calls in flight, so shutdown can drain them before closing."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def write_ready_file(path: Path, tcp_address: tuple[str, int], unix_socket: Path | None, *,
                     metrics: tuple[str, int] | None = None) -> None:
    """Tell supervisors and tests that the server accepts calls: {addr, unix_socket, pid}
    (and metrics, the HTTP address, when there is one), written atomically."""
    info: dict[str, object] = {"addr": f"{tcp_address[0]}:{tcp_address[1]}",
                               "unix_socket": str(unix_socket) if unix_socket else None,
                               "pid": os.getpid()}
    if metrics is not None:
        info["metrics"] = f"{metrics[0]}:{metrics[1]}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def drain_and_close(servers: list[Server], tracker: CallTracker, timeout_s: float,
                          log: logging.Logger) -> None:
    """Stop accepting calls, let those in flight finish (up to ``timeout_s``), then
    close the servers (which cancels whatever is still running)."""
    tracker.draining = True
    for server in servers:
        # Stop accepting connections now; grpclib's close() would also cancel
        # the calls in flight, which we first let finish.
        if server._server is not None:
            server._server.close()
    if tracker.in_flight:
        log.info("draining calls", extra={"fields": {"in_flight": tracker.in_flight}})
        try:
            await asyncio.wait_for(tracker.wait_idle(), timeout_s)
        except TimeoutError:
            log.warning("drain timed out; cancelling remaining calls",
                        extra={"fields": {"in_flight": tracker.in_flight}})
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()
    servers.clear()
