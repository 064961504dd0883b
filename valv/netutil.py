"""Small helpers around grpclib's server that several commands share."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

from grpclib.server import Server


def bound_port(server: Server) -> int:
    """The TCP port a started grpclib server listens on (useful after port 0)."""
    # grpclib keeps the asyncio server private and exposes no address API.
    inner = server._server
    if not isinstance(inner, asyncio.base_events.Server) or not inner.sockets:
        raise RuntimeError("server is not listening on a TCP socket")
    return int(inner.sockets[0].getsockname()[1])


def bind_unix_socket(path: Path) -> socket.socket:
    """A unix socket bound at ``path``, mode 0600 from the start.

    A stale socket file left by a dead process is replaced; anything else at
    ``path`` (a regular file, a live server's socket) is refused, so a
    mistyped path can never delete data.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
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
    os.chmod(path, 0o600)
    return sock


def remove_unix_socket(path: Path) -> None:
    """Remove our socket file at shutdown, and nothing that isn't a socket."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
