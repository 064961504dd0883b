"""Who is calling, and for what: the context every call carries through core.

The network adapters (central, sidecar) authenticate a caller, build a
CallContext and set it in ``current_call`` for the duration of the call.
Core reads it where it needs it (the audit record of a change is written in
the change's own transaction, see KeyStore._change) without every method
growing a parameter. Nothing here knows about gRPC.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``member`` is in IAM member syntax ("user:alice@example.com",
    "serviceAccount:…", "group:…"); ``method`` says how it was established
    ("dev", "token", "jwt", "mtls").
    """

    member: str
    method: str


DEV_PRINCIPAL = Principal("user:dev", "dev")
# A caller whose authentication failed (for the audit record of the refusal).
UNAUTHENTICATED_PRINCIPAL = Principal("", "none")


@dataclass(slots=True)
class CallContext:
    rpc: str  # the method name, e.g. "Encrypt"
    principal: Principal
    peer: str  # the caller's address, e.g. "127.0.0.1:53122" or "unix"
    request_id: str
    # Filled in once the request is read: the resource acted on, and how to
    # summarize the request safely for the log (never plaintext, ciphertext or
    # keys). The summary is built only when something reads it: the hot path
    # (Encrypt/Decrypt with aggregate auditing) never does.
    resource: str = ""
    summarizer: Callable[[], dict[str, Any]] | None = None
    _summary: dict[str, Any] | None = field(default=None, repr=False)
    # The CryptoKeyVersion an Encrypt/Decrypt actually used (set by the
    # keystore), for the data-access audit log.
    used_version: str = ""


    @property
    def summary(self) -> dict[str, Any]:
        if self._summary is None:
            self._summary = self.summarizer() if self.summarizer is not None else {}
        return self._summary

    @summary.setter
    def summary(self, value: dict[str, Any]) -> None:
        self._summary = value


current_call: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "valv_current_call", default=None)
