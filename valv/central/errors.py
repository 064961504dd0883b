"""The one place where exceptions become gRPC statuses.

Handlers raise domain errors (valv.core.errors) or let storage/crypto errors
propagate; ``to_grpc_error`` (called by the call guard in service.py) turns
each into the status Cloud KMS would return, with a message a person can act
on. Nothing else reaches the caller: an unexpected
exception is logged here with its traceback and reported as INTERNAL with a
reference id, never with the traceback.
"""

from __future__ import annotations

import logging
import uuid

from grpclib import GRPCError
from grpclib.const import Status

from valv.core.crypto.errors import (
    InvalidCiphertextError,
    RootKeyConfigError,
    RootKeyUnavailableError,
)
from valv.core.errors import ErrorCode, ValvError
from valv.core.storage.base import LimitExceededError, ReadOnlyTransactionError, StorageError
from valv.core.storage.sealed import TamperedRecordError

log = logging.getLogger("valv.central")

_STATUS = {code: Status[code.value] for code in ErrorCode}


def to_grpc_error(exc: BaseException, method: str) -> GRPCError:
    """The GRPCError that reports ``exc`` to the caller of ``method``."""
    if isinstance(exc, GRPCError):
        if exc.status is Status.UNIMPLEMENTED and not exc.message:
            return GRPCError(
                Status.UNIMPLEMENTED,
                f"{method} is not implemented by Valv yet; see the API coverage table in "
                "the README",
            )
        return exc
    if isinstance(exc, ValvError):
        return GRPCError(_STATUS[exc.code], exc.message)
    if isinstance(exc, InvalidCiphertextError):
        return GRPCError(Status.INVALID_ARGUMENT, "the ciphertext is invalid")
    if isinstance(exc, TamperedRecordError):
        log.error("storage verification failed: %s", exc)
        return GRPCError(Status.DATA_LOSS, str(exc))
    if isinstance(exc, LimitExceededError):
        return GRPCError(Status.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, RootKeyUnavailableError):
        # The root key's device (a PKCS#11 token) failed: retryable, not
        # tampering. Details (token, module path) go to the log only.
        incident = uuid.uuid4().hex[:12]
        log.warning("root key unavailable in %s (incident %s): %s", method, incident, exc)
        return GRPCError(Status.UNAVAILABLE, "the root key's token is unavailable; retry with "
                         f"backoff (incident {incident})")
    if isinstance(exc, RootKeyConfigError):
        return GRPCError(Status.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, StorageError) and not isinstance(exc, ReadOnlyTransactionError):
        # Busy beyond the retry deadline, I/O errors, a store being closed:
        # transient from the caller's point of view, so retryable. Details
        # (paths, SQLite messages) go to the log, not to the caller.
        incident = uuid.uuid4().hex[:12]
        log.warning("storage unavailable in %s (incident %s): %s", method, incident, exc)
        return GRPCError(Status.UNAVAILABLE,
                         f"storage is unavailable; retry with backoff (incident {incident})")
    incident = uuid.uuid4().hex[:12]
    log.error("unexpected error in %s (incident %s)", method, incident, exc_info=exc)
    return GRPCError(
        Status.INTERNAL, f"internal error in {method}; server logs have incident {incident}"
    )
