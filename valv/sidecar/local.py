"""Encrypt and Decrypt answered in the pod, from cached KEK versions (DESIGN.md §5).

The rules, the AEAD and every message come from valv.core.envelope, the same
module central's keystore uses, so the sidecar and central answer the same
input the same way and their ciphertexts are interchangeable.

What is answered here, and what is not:

- A valid request whose version is cached (or can be fetched) is answered
  locally. Material is fetched with FetchVersion, where central checks the
  sidecar identity's useToEncrypt/useToDecrypt; whatever central refuses
  (PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION...) is relayed unchanged.
- A request that is not valid (doesn't parse, too large, CRC mismatch, a
  ciphertext without a readable header...) is forwarded to central as is.
  Central checks permission before validation, so only it can say which
  answer the caller gets; those requests are rare, and it keeps the two
  identical by construction.
- Central unreachable: cached material serves until its TTL; after that, and
  for misses, UNAVAILABLE. Never anything else.

Encrypt and Decrypt material are cached apart: a fetch for ENCRYPT proves
useToEncrypt only, so it must never serve a Decrypt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpclib.const
from grpclib import GRPCError
from grpclib.const import Cardinality, Status

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.core import envelope
from valv.core.crypto.ciphertext import CiphertextCodec
from valv.core.errors import InvalidArgument
from valv.core.material import SIDECAR_PERMISSION
from valv.netutil import CallTracker, limit_request_size, release_request_limit
from valv.sidecar import wire
from valv.sidecar.cache import PRIMARY, FetchedKek, KekCache, Lease
from valv.sidecar.forward import Forwarder
from valv.sidecar.upstream import FETCH_TIMEOUT_S, CentralLink, UsageReporter

ENCRYPT_PATH = "/google.cloud.kms.v1.KeyManagementService/Encrypt"
DECRYPT_PATH = "/google.cloud.kms.v1.KeyManagementService/Decrypt"

_STATUS_NAMES = {status: status.name for status in Status}


class LocalCrypto:
    """A grpclib IServable for Encrypt and Decrypt; put it before the Forwarder."""

    def __init__(self, *, link: CentralLink, forwarder: Forwarder, tracker: CallTracker,
                 encrypt_cache: KekCache, decrypt_cache: KekCache,
                 usage: UsageReporter | None = None,
                 codec: CiphertextCodec | None = None) -> None:
        self.link = link
        self.forwarder = forwarder
        self.tracker = tracker
        self.encrypt_cache = encrypt_cache
        self.decrypt_cache = decrypt_cache
        self.usage = usage
        self.codec = codec or CiphertextCodec()
        self.local_calls = 0

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            ENCRYPT_PATH: grpclib.const.Handler(self._guarded(ENCRYPT_PATH, self._encrypt),
                                                Cardinality.UNARY_UNARY, bytes, bytes),
            DECRYPT_PATH: grpclib.const.Handler(self._guarded(DECRYPT_PATH, self._decrypt),
                                                Cardinality.UNARY_UNARY, bytes, bytes),
        }

    def _guarded(self, path: str,
                 serve: Callable[[Any, bytes], Awaitable[bytes | None]]
                 ) -> Callable[[Any], Awaitable[None]]:
        tracker, forwarder = self.tracker, self.forwarder

        async def handle(stream: Any) -> None:
            if tracker.draining:
                raise GRPCError(Status.UNAVAILABLE, "the sidecar is shutting down; retry")
            limit_request_size(stream)
            tracker.enter()
            try:
                request = await stream.recv_message()
                reply = await serve(stream, request) if request is not None else None
                if reply is None:  # not for us to answer: central says
                    await forwarder.relay(path, stream, request)
                    return
                await stream.send_message(reply)
            finally:
                tracker.leave()
                release_request_limit(stream)  # no reference cycle left behind

        return handle

    async def _lease(self, cache: KekCache, key_name: str, version_id: int,
                     purpose: str) -> Lease:
        def fetch() -> Awaitable[FetchedKek]:  # only on a miss
            # The fetch is shared by every caller that misses meanwhile (and may be
            # a refresh no caller waits for), so it gets its own timeout, not the
            # deadline of whichever caller started it: a caller with 5 ms left must
            # not fail everyone else's fetch. Each caller's own deadline still ends
            # its own wait (grpclib cancels the handler: DEADLINE_EXCEEDED).
            return self.link.fetch(key_name, version_id, purpose, timeout=FETCH_TIMEOUT_S)

        return await cache.get_or_fetch(key_name, version_id, fetch)

    async def _encrypt(self, stream: Any, data: bytes) -> bytes | None:
        try:
            request = _encrypt_request(data)
            call = envelope.check_encrypt(request.name, request.payload, request.aad,
                                          plaintext_crc32c=request.payload_crc32c,
                                          aad_crc32c=request.aad_crc32c)
        except Exception:  # not valid: central's answer (permission comes first there)
            return None
        key_name = str(call.key_name)
        try:
            lease = await self._lease(self.encrypt_cache, key_name,
                                      call.version_id or PRIMARY, "ENCRYPT")
        except GRPCError as exc:
            # FetchVersion names the CryptoKey in a denial, while central's Encrypt names
            # the resource as requested, here a version: let central say it, in its words.
            # Not if this sidecar isn't a sidecar identity at all: that is said as is.
            if exc.status is Status.PERMISSION_DENIED and call.version_id \
                    and SIDECAR_PERMISSION not in (exc.message or ""):
                return None
            raise
        with lease:
            result = envelope.encrypt_with(self.codec, lease.kek, call, lease.version_id)
        self.local_calls += 1
        version_name = str(result.version_name)
        if self.usage is not None:
            self.usage.count(version_name, "Encrypt")
        return wire.encrypt_response(version_name, result.ciphertext,
                                        result.ciphertext_crc32c,
                                        result.verified_plaintext_crc32c,
                                        result.verified_aad_crc32c)

    async def _decrypt(self, stream: Any, data: bytes) -> bytes | None:
        try:
            request = _decrypt_request(data)
            call = envelope.check_decrypt(request.name, request.payload, request.aad,
                                          ciphertext_crc32c=request.payload_crc32c,
                                          aad_crc32c=request.aad_crc32c)
        except Exception:
            return None
        key_name = str(call.key_name)
        lease = await self._lease(self.decrypt_cache, key_name, call.version_id,
                                  "DECRYPT")
        version_name = f"{key_name}/cryptoKeyVersions/{call.version_id}"
        with lease:
            try:
                result = envelope.decrypt_with(self.codec, lease.kek, call,
                                               primary_version_id=call.version_id
                                               if lease.is_primary else 0)
            except InvalidArgument as exc:
                self._count(version_name, "Decrypt", Status.INVALID_ARGUMENT)
                raise GRPCError(Status.INVALID_ARGUMENT, exc.message) from None
        self.local_calls += 1
        self._count(version_name, "Decrypt", None)
        return wire.decrypt_response(result.plaintext, result.plaintext_crc32c,
                                        result.used_primary)

    def _count(self, version_name: str, rpc: str, status: Status | None) -> None:
        if self.usage is not None:
            self.usage.count(version_name, rpc, "OK" if status is None
                             else _STATUS_NAMES[status])


def _encrypt_request(data: bytes) -> wire.Request:
    try:
        return wire.read_encrypt_request(data)
    except wire.Unusual:
        message = kms_v1.EncryptRequest.parse(data)
        return wire.Request(message.name, message.plaintext,
                            message.additional_authenticated_data, message.plaintext_crc32c,
                            message.additional_authenticated_data_crc32c)


def _decrypt_request(data: bytes) -> wire.Request:
    try:
        return wire.read_decrypt_request(data)
    except wire.Unusual:
        message = kms_v1.DecryptRequest.parse(data)
        return wire.Request(message.name, message.ciphertext,
                            message.additional_authenticated_data, message.ciphertext_crc32c,
                            message.additional_authenticated_data_crc32c)
