"""Oversized requests are refused before they are read into memory."""

from __future__ import annotations

import pytest
from google.api_core import exceptions
from google.cloud import kms_v1

from tests.helpers import CALL
from valv.netutil import MAX_REQUEST_BYTES


def test_a_request_over_the_limit_is_resource_exhausted(
        kms: kms_v1.KeyManagementServiceClient, crypto_key: str) -> None:
    with pytest.raises(exceptions.ResourceExhausted) as info:
        kms.encrypt(request={"name": crypto_key, "plaintext": b"x" * (MAX_REQUEST_BYTES + 1)},
                    **CALL)
    assert "limit" in info.value.message
    # The server is fine afterwards, and a large-but-valid request still works.
    kms.encrypt(request={"name": crypto_key, "plaintext": b"x" * 65536,
                         "additional_authenticated_data": b"a" * 65536}, **CALL)


def test_a_request_just_over_64k_is_still_invalid_argument(
        kms: kms_v1.KeyManagementServiceClient, crypto_key: str) -> None:
    with pytest.raises(exceptions.InvalidArgument):
        kms.encrypt(request={"name": crypto_key, "plaintext": b"x" * 65537}, **CALL)


async def test_the_limit_is_released_so_finished_streams_are_freed_at_once() -> None:
    """limit_request_size leaves a reference cycle on grpclib's stream until
    release_request_limit: without it, every finished call's stream would wait
    for the cycle collector (measured: ~5 KB a call, 5 MB of a busy sidecar)."""
    import gc

    import grpclib.const
    import grpclib.protocol
    from grpclib.client import Channel
    from grpclib.server import Server

    from valv.netutil import limit_request_size, release_request_limit

    class Echo:
        def __init__(self, release: bool) -> None:
            self.release = release

        async def echo(self, stream: object) -> None:
            limit_request_size(stream)
            try:
                request = await stream.recv_message()  # type: ignore[attr-defined]
                await stream.send_message(request)  # type: ignore[attr-defined]
            finally:
                if self.release:
                    release_request_limit(stream)

        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {"/t.Echo/Echo": grpclib.const.Handler(
                self.echo, grpclib.const.Cardinality.UNARY_UNARY, bytes, bytes)}

    class GuardedEcho:
        """Echo behind central's own call guard (dev mode), which wraps the
        stream's recv_message too."""

        async def echo(self, stream: object) -> None:
            request = await stream.recv_message()  # type: ignore[attr-defined]
            await stream.send_message(request)  # type: ignore[attr-defined]

        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            from valv.central.calls import Calls

            return Calls().guard_mapping({"/t.Echo/Echo": grpclib.const.Handler(
                self.echo, grpclib.const.Cardinality.UNARY_UNARY, bytes, bytes)})

    def live_streams() -> int:
        return sum(isinstance(o, grpclib.protocol.Stream) for o in gc.get_objects())

    async def streams_left_after(calls: int, release: bool, guarded: bool = False) -> int:
        servable: object = GuardedEcho() if guarded else Echo(release)
        server = Server([servable], codec=_BytesCodec())
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        channel = Channel("127.0.0.1", port, codec=_BytesCodec())
        try:
            gc.collect()
            before = live_streams()
            gc.disable()
            try:
                for _ in range(calls):
                    async with channel.request("/t.Echo/Echo",
                                               grpclib.const.Cardinality.UNARY_UNARY,
                                               bytes, bytes) as stream:
                        await stream.send_message(b"x", end=True)
                        assert await stream.recv_message() == b"x"
                return live_streams() - before
            finally:
                gc.enable()
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    assert await streams_left_after(50, release=False) >= 50  # the cycle is real
    assert await streams_left_after(50, release=True) < 5
    assert await streams_left_after(50, release=True, guarded=True) < 5


class _BytesCodec:
    """Messages as raw bytes (grpclib's codec interface)."""

    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: type) -> bytes:
        return message

    def decode(self, data: bytes, message_type: type) -> bytes:
        return data
