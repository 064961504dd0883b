"""Small helpers around grpclib's server that several commands share."""

from __future__ import annotations

import asyncio

from grpclib.server import Server


def bound_port(server: Server) -> int:
    """The TCP port a started grpclib server listens on (useful after port 0)."""
    # grpclib keeps the asyncio server private and exposes no address API.
    inner = server._server
    if not isinstance(inner, asyncio.base_events.Server) or not inner.sockets:
        raise RuntimeError("server is not listening on a TCP socket")
    return int(inner.sockets[0].getsockname()[1])
