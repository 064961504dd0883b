"""valv.sidecar.v1.KeyMaterial: a version's key material, sealed to one sidecar process.

Behind the same call guard as every other service (valv.central.calls): the
Authorizer checks useToEncrypt or useToDecrypt on the CryptoKey, by the
request's purpose (valv.central.permissions), before this handler runs; the
auditor records the fetch as data access. The KEK never leaves this module in
clear: it is sealed (valv.core.material) and released.

Watch (valv.central.watch) streams change-log events to the sidecar, and
ReportUsage (valv.central.usage) records its local Encrypt/Decrypt counts in
the audit log. Both need an authenticated caller but no permission on a
resource (valv.central.permissions).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpclib.const

from valv._proto.valv.sidecar import v1 as sidecar_v1
from valv.central.audit import CentralAuditor
from valv.central.calls import Calls
from valv.central.usage import check_usage
from valv.central.watch import Watches
from valv.core.calls import current_call
from valv.core.clock import Clock, SystemClock
from valv.core.errors import InvalidArgument
from valv.core.keystore import KeyStore
from valv.core.material import BadPublicKey, check_recipient, seal
from valv.core.names import parse_crypto_key

# How long a sidecar may use fetched material (DESIGN.md §5, "Cache limits").
DEFAULT_TTL_S = 60

_PURPOSES = {sidecar_v1.Purpose.ENCRYPT: "ENCRYPT", sidecar_v1.Purpose.DECRYPT: "DECRYPT"}


class KeyMaterialService(sidecar_v1.KeyMaterialBase):
    def __init__(self, keystore: KeyStore, calls: Calls, *, ttl_s: int = DEFAULT_TTL_S,
                 watches: Watches | None = None, auditor: CentralAuditor | None = None,
                 clock: Clock | None = None) -> None:
        self._ks = keystore
        self._calls = calls
        self._ttl_s = ttl_s
        # None: Watch is UNIMPLEMENTED; reported usage is checked but not recorded.
        self._watches = watches
        self._auditor = auditor
        self._clock: Clock = clock or SystemClock()

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        mapping = super().__mapping__()
        path = "/valv.sidecar.v1.KeyMaterial/Watch"
        generated = mapping[path]
        mapping[path] = grpclib.const.Handler(self._rpc_watch, generated.cardinality,
                                              generated.request_type, generated.reply_type)
        return self._calls.guard_mapping(mapping)

    async def _rpc_watch(self, stream: Any) -> None:
        """Watch's handler: like the generated one, but the event generator is closed
        (its hub subscription dropped) as soon as the call ends, however it ends."""
        request = await stream.recv_message()
        async with aclosing(self.watch(request)) as events:
            async for event in events:
                await stream.send_message(event)

    async def watch(self, message: sidecar_v1.WatchRequest
                    ) -> AsyncGenerator[sidecar_v1.WatchEvent, None]:
        if self._watches is None:
            raise grpclib.GRPCError(grpclib.const.Status.UNIMPLEMENTED)
        async with aclosing(self._watches.events(current_call.get(), message.after_seq,
                                                 bytes(message.epoch))) as events:
            async for event in events:
                yield event

    async def report_usage(self, message: sidecar_v1.ReportUsageRequest
                           ) -> sidecar_v1.ReportUsageResponse:
        uses = check_usage(message.counts, self._clock)
        call = current_call.get()
        if self._auditor is not None and call is not None:
            self._auditor.record_reported(call, uses)
        # Accepted: recorded, or dropped by design with --audit-data-access off.
        return sidecar_v1.ReportUsageResponse(recorded=len(uses))

    async def fetch_version(
        self, message: sidecar_v1.FetchVersionRequest
    ) -> sidecar_v1.FetchVersionResponse:
        key_name = parse_crypto_key(message.crypto_key, "crypto_key")
        purpose = _PURPOSES.get(message.purpose)
        if purpose is None:
            raise InvalidArgument("purpose must be ENCRYPT or DECRYPT")
        try:
            check_recipient(bytes(message.recipient_public_key))
        except BadPublicKey as exc:
            raise InvalidArgument(f"recipient_public_key: {exc}") from None
        if message.version_id > 0xFFFFFFFF:
            raise InvalidArgument("version_id is out of range")
        version_id = message.version_id or None
        # The keystore's own lookup with the purpose's own rules and messages, so a
        # sidecar relays exactly what central's Encrypt/Decrypt would say (for
        # DECRYPT the id came from a ciphertext: a missing version is a
        # decryption failure, not NOT_FOUND).
        usable = await self._ks._usable_version(
            key_name, version_id, purpose="decrypt" if purpose == "DECRYPT" else "encrypt")
        version = usable.version
        call = current_call.get()
        if call is not None:
            call.used_version = str(version.name)
        try:
            sealed = seal(usable.kek, version_name=str(version.name), purpose=purpose,
                          recipient_public_key=bytes(message.recipient_public_key))
        except BadPublicKey as exc:
            raise InvalidArgument(f"recipient_public_key: {exc}") from None
        finally:
            self._ks._release(usable)
        return sidecar_v1.FetchVersionResponse(
            version=str(version.name),
            state=sidecar_v1.VersionState(int(version.state)),
            is_primary=usable.primary_version_id == version.name.version,
            ttl_seconds=self._ttl_s,
            sealed_material=sealed)
