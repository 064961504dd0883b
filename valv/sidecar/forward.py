"""Forwarding calls to central at the bytes level.

Every method of the services central serves is forwarded unchanged: the
request and reply are never decoded (a pass-through codec), so there is no
parsing cost and no schema drift between sidecar and central. Central's
status code, message, details (grpc-status-details-bin) and metadata come
back to the caller as central sent them, and the caller's deadline goes on
to central.

The sidecar calls central with its own credentials (a bearer token from a
file it re-reads when the file changes, and/or a TLS client certificate):
a local caller's ``authorization`` metadata is dropped, so local callers act
with the sidecar's identity.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpclib.const
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import StreamTerminatedError

from valv.netutil import CallTracker, limit_request_size, release_request_limit

log = logging.getLogger("valv.sidecar")


class RawCodec(CodecBase):
    """Messages stay bytes: what the caller sent is what central receives."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


class RawStatusDetailsCodec(StatusDetailsCodecBase):
    """grpc-status-details-bin stays bytes, in both directions."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        return bytes(details)

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return data


def raw_codecs() -> dict[str, Any]:
    """The ``codec``/``status_details_codec`` of the sidecar's Servers and its Channel."""
    return {"codec": RawCodec(), "status_details_codec": RawStatusDetailsCodec()}


def _service_paths() -> list[str]:
    """Every method path central serves (from the generated service bases)."""
    from valv._proto.google.cloud.kms.v1 import KeyManagementServiceBase
    from valv._proto.google.cloud.location import LocationsBase
    from valv._proto.google.iam.v1 import IamPolicyBase
    from valv._proto.google.longrunning import OperationsBase

    paths: list[str] = []
    services: tuple[Any, ...] = (KeyManagementServiceBase(), IamPolicyBase(), LocationsBase(),
                                 OperationsBase())
    for service in services:
        for path, handler in service.__mapping__().items():
            if handler.cardinality is not Cardinality.UNARY_UNARY:
                raise RuntimeError(f"{path} is not unary; the forwarder handles unary calls")
            paths.append(path)
    return paths


# Metadata of the caller's that never goes on to central: its credentials
# (the sidecar calls with its own).
_DROPPED_METADATA = frozenset({"authorization"})


class TokenFile:
    """A bearer token read from a file, re-read when the file changes.

    The file is checked (stat) at most once per ``check_interval_s``, so a
    projected Kubernetes service-account token can rotate under a running
    sidecar. If a re-read fails or finds the file empty, the last good token
    is kept (and a warning logged): central will say if it has expired.
    """

    def __init__(self, path: Path, *, check_interval_s: float = 1.0) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._stamp: tuple[int, int, int] | None = None
        self._checked_at = 0.0
        self._token = ""
        self._reload(initial=True)

    def _reload(self, *, initial: bool = False) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp == self._stamp:
                return
            token = self.path.read_text().strip()
            if not token:
                raise ValueError(f"the token file {self.path} is empty")
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if initial:
                raise ValueError(f"cannot read the token file: {exc}") from None
            log.warning("token file unreadable; keeping the previous token",
                        extra={"fields": {"path": str(self.path), "error": str(exc)}})
            return
        if not initial:
            log.info("token file changed; using the new token",
                     extra={"fields": {"path": str(self.path)}})
        self._stamp = stamp
        self._token = token

    def token(self) -> str:
        now = time.monotonic()
        if now - self._checked_at >= self.check_interval_s:
            self._checked_at = now
            self._reload()
        return self._token


def client_ssl_context(ca_file: Path | None, cert_file: Path | None,
                       key_file: Path | None) -> ssl.SSLContext:
    """TLS to central: trust ``ca_file`` (else the system CAs), present a client cert if given."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    if cert_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
    context.set_alpn_protocols(["h2"])
    return context


class Forwarder:
    """A grpclib IServable forwarding every method path to central over one Channel."""

    def __init__(self, channel: Channel, *, token: TokenFile | None, tracker: CallTracker,
                 central: str, paths: Iterable[str] | None = None) -> None:
        self.channel = channel
        self.token = token
        self.tracker = tracker
        self.central = central
        self.paths = list(paths) if paths is not None else _service_paths()
        self.forwarded = 0  # calls sent on to central

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {path: grpclib.const.Handler(self._handler(path), Cardinality.UNARY_UNARY,
                                            bytes, bytes)
                for path in self.paths}

    def _handler(self, path: str) -> Any:
        async def handle(stream: Any) -> None:
            await self.forward(path, stream)
        return handle

    def _outgoing_metadata(self, incoming: Any) -> list[tuple[str, Any]]:
        metadata = [(key, value) for key, value in (incoming or {}).items()
                    if key.lower() not in _DROPPED_METADATA]
        if self.token is not None:
            metadata.append(("authorization", f"Bearer {self.token.token()}"))
        return metadata

    async def forward(self, path: str, stream: Any) -> None:
        if self.tracker.draining:
            raise GRPCError(Status.UNAVAILABLE, "the sidecar is shutting down; retry")
        limit_request_size(stream)
        self.tracker.enter()
        try:
            await self.relay(path, stream, await stream.recv_message())
        finally:
            self.tracker.leave()
            release_request_limit(stream)

    async def relay(self, path: str, stream: Any, request: bytes | None) -> None:
        """Send ``request`` (already read from ``stream``) to central and ``stream``
        central's answer: reply, status, message, details and metadata as sent."""
        self.forwarded += 1
        try:
            async with self.channel.request(
                    path, Cardinality.UNARY_UNARY, bytes, bytes,
                    deadline=stream.deadline,
                    metadata=self._outgoing_metadata(stream.metadata)) as call:
                if request is None:  # central says what is wrong with that
                    await call.send_request(end=True)
                else:
                    await call.send_message(request, end=True)
                try:
                    reply = await call.recv_message()
                    await call.recv_trailing_metadata()
                except GRPCError as exc:
                    await stream.send_trailing_metadata(
                        status=exc.status, status_message=exc.message,
                        status_details=exc.details,
                        metadata=call.trailing_metadata or None)
                    return
                if reply is None:
                    raise GRPCError(Status.UNAVAILABLE, "central returned no reply message; retry")
                await stream.send_initial_metadata(metadata=call.initial_metadata or None)
                await stream.send_message(reply)
                await stream.send_trailing_metadata(
                    metadata=call.trailing_metadata or None)
        except TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED, "deadline exceeded") from None
        except (OSError, StreamTerminatedError) as exc:
            raise GRPCError(
                Status.UNAVAILABLE,
                f"central at {self.central} is unreachable: {type(exc).__name__}: {exc}"
            ) from None
