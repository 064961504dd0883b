"""What every call goes through, in one place.

For each RPC, the call guard:

1. refuses new calls while the server drains, and bounds the request size;
2. authenticates the caller (an ``Authenticator``) and sets the CallContext
   (valv.core.calls.current_call) for the rest of the call;
3. once the request message is read, authorizes it (an ``Authorizer``)
   before any handler code runs;
4. maps any failure to the status Cloud KMS would return
   (valv.central.errors.to_grpc_error);
5. reports the outcome to the ``Auditor``.

The defaults are development mode: every caller is ``user:dev``, everything
is allowed, and nothing is audited beyond the log.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import betterproto2
import grpclib.const
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec

from valv.central.errors import to_grpc_error
from valv.core.calls import (
    DEV_PRINCIPAL,
    UNAUTHENTICATED_PRINCIPAL,
    CallContext,
    current_call,
)
from valv.core.errors import InvalidArgument
from valv.netutil import CallTracker, limit_request_size, release_request_limit


class RequestCodec(ProtoCodec):
    """grpclib's protobuf codec, except that a request that does not parse (truncated,
    invalid UTF-8 in a string field...) is the caller's error: INVALID_ARGUMENT, not
    INTERNAL with a server-side traceback."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"the request is not a valid {getattr(message_type, '__name__', 'protobuf')} "
                f"message ({type(exc).__name__})",
            ) from None


def peer_address(stream: Any) -> str:
    """The caller's address as text: "host:port", or "unix" for a unix socket."""
    try:
        addr = stream.peer.addr()
    except Exception:  # a transport without an address
        return "unknown"
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return "unix"


class Authenticator(Protocol):
    async def authenticate(self, rpc: str, stream: Any) -> CallContext:
        """The caller's context, or raise valv.core.errors.Unauthenticated."""
        ...


class Authorizer(Protocol):
    async def authorize(self, call: CallContext, request: Any) -> None:
        """Raise valv.core.errors.PermissionDenied unless ``call`` may make ``request``."""
        ...


class Auditor(Protocol):
    async def finished(self, call: CallContext | None, error: GRPCError | None) -> None:
        """The call ended (``error`` is None on success): record what the audit log needs."""
        ...


class DevAuthenticator:
    """Development mode: every caller is ``user:dev``."""

    async def authenticate(self, rpc: str, stream: Any) -> CallContext:
        return CallContext(rpc=rpc, principal=DEV_PRINCIPAL, peer=peer_address(stream),
                           request_id=uuid.uuid4().hex)


class AllowAll:
    """Development mode: everything is allowed."""

    async def authorize(self, call: CallContext, request: Any) -> None:
        return None


class NoAudit:
    async def finished(self, call: CallContext | None, error: GRPCError | None) -> None:
        return None


StreamHandler = Callable[[Any], Awaitable[None]]


class Calls:
    """The call guard, shared by every service of one server."""

    def __init__(self, authenticator: Authenticator | None = None,
                 authorizer: Authorizer | None = None, auditor: Auditor | None = None) -> None:
        self.tracker = CallTracker()
        self.authenticator: Authenticator = authenticator or DevAuthenticator()
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.auditor: Auditor = auditor or NoAudit()

    def guard_mapping(self, mapping: dict[str, grpclib.const.Handler]
                      ) -> dict[str, grpclib.const.Handler]:
        """A service mapping whose every handler goes through the guard."""
        return {
            path: grpclib.const.Handler(self._guard(path.rsplit("/", 1)[-1], handler.func),
                                        handler.cardinality, handler.request_type,
                                        handler.reply_type)
            for path, handler in mapping.items()
        }

    def _guard(self, rpc: str, handler: StreamHandler) -> StreamHandler:
        tracker = self.tracker

        async def guarded(stream: Any) -> None:
            if tracker.draining:
                raise GRPCError(Status.UNAVAILABLE,
                                "the server is shutting down; retry elsewhere")
            limit_request_size(stream)
            tracker.enter()
            call: CallContext | None = None
            try:
                try:
                    call = await self.authenticator.authenticate(rpc, stream)
                    current_call.set(call)
                    _authorize_on_receive(stream, call, self.authorizer)
                    await handler(stream)
                except Exception as exc:
                    error = to_grpc_error(exc, rpc)
                    if call is None:  # authentication failed: the refusal is audited too
                        call = CallContext(rpc=rpc, principal=UNAUTHENTICATED_PRINCIPAL,
                                           peer=peer_address(stream),
                                           request_id=uuid.uuid4().hex)
                    await self.auditor.finished(call, error)
                    raise error from None
                await self.auditor.finished(call, None)
            finally:
                tracker.leave()
                # No reference cycle left behind: both wrappers hold bound
                # methods of the streams they sit on.
                release_request_limit(stream)
                vars(stream).pop("recv_message", None)  # _authorize_on_receive's

        return guarded


# Request fields that are never logged or audited: data and key material.
_SECRET_FIELDS = frozenset({"plaintext", "ciphertext", "additional_authenticated_data",
                            "data", "wrapped_key", "rsa_aes_wrapped_key", "digest"})
# betterproto2's snake_case of "*_crc32c" is "*_crc32_c": log the proto field names.
_CHECKSUM_NAMES = {
    "plaintext_crc32_c": "plaintext_crc32c",
    "additional_authenticated_data_crc32_c": "additional_authenticated_data_crc32c",
    "ciphertext_crc32_c": "ciphertext_crc32c",
    "data_crc32_c": "data_crc32c",
    "digest_crc32_c": "digest_crc32c",
    "signature_crc32_c": "signature_crc32c",
    "mac_crc32_c": "mac_crc32c",
}
# Where a request names the resource it acts on, in order of preference.
_RESOURCE_FIELDS = ("name", "resource", "parent", "location")


def request_resource(request: Any) -> str:
    """The resource a request acts on (cheap: no serialization)."""
    for field_name in _RESOURCE_FIELDS:
        value = getattr(request, field_name, "")
        if isinstance(value, str) and value:
            return value
    for nested in ("crypto_key", "crypto_key_version"):
        value = getattr(request, nested, None)
        if isinstance(value, str) and value:  # a name, e.g. valv.sidecar.v1 FetchVersion
            return value
        nested_name = getattr(getattr(request, nested, None), "name", None)
        if isinstance(nested_name, str) and nested_name:
            return nested_name
    return ""


def describe_request(request: Any) -> tuple[str, dict[str, Any]]:
    """The resource a request acts on, and a summary of it that is safe to log.

    The summary keeps the request's fields (as ProtoJSON-ish values) except
    data and key material, which are replaced by their length.
    """
    summary: dict[str, Any] = {}
    try:
        fields = request.to_dict(casing=betterproto2.Casing.SNAKE)
    except Exception:  # a summary is best effort; the call itself goes on
        return request_resource(request), summary
    for field_name, value in fields.items():
        if field_name in _SECRET_FIELDS:
            raw = getattr(request, field_name, b"")
            summary[f"{field_name}_bytes"] = len(raw) if isinstance(raw, bytes) else None
        elif field_name.replace("_", "").endswith("crc32c"):
            # A checksum of a secret is a secret: CRC32C is invertible for inputs
            # of 4 bytes or less and narrows short ones. Record only its presence.
            summary[_CHECKSUM_NAMES.get(field_name, field_name)] = "present"
        else:
            summary[field_name] = value
    return request_resource(request), summary


def _authorize_on_receive(stream: Any, call: CallContext, authorizer: Authorizer) -> None:
    """Authorize the request as soon as it is read, before the handler sees it."""
    receive = stream.recv_message

    async def receive_authorized() -> Any:
        request = await receive()
        if request is None:
            # Every Valv RPC is unary: a stream that ends without its message is
            # malformed. Refuse it here, so no handler ever runs unauthorized.
            raise InvalidArgument("the request message is missing")
        if request is not None:
            call.resource = request_resource(request)
            call.summarizer = lambda: describe_request(request)[1]
            await authorizer.authorize(call, request)
        return request

    stream.recv_message = receive_authorized


def server_codecs() -> dict[str, Any]:
    """The ``codec``/``status_details_codec`` arguments for every grpclib Server.

    Valv sends no rich error details yet, so no details codec (which would
    pull in googleapis-common-protos at run time).
    """
    return {"codec": RequestCodec(), "status_details_codec": None}
