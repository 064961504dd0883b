"""Domain errors.

Core raises these; the network adapters (central, sidecar) map ``code`` to a
gRPC status in exactly one place each. Messages are shown to callers, so they
say what was wrong and how to fix it, and never hold key bytes or plaintext.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    """The subset of gRPC status codes that Valv's domain produces."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DATA_LOSS = "DATA_LOSS"


class ValvError(Exception):
    """Base class of every error that is reported to a caller."""

    code: ErrorCode = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ValvError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(ValvError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(ValvError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(ValvError):
    code = ErrorCode.FAILED_PRECONDITION


class PermissionDenied(ValvError):
    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(ValvError):
    code = ErrorCode.UNAUTHENTICATED


class Unimplemented(ValvError):
    code = ErrorCode.UNIMPLEMENTED


class Aborted(ValvError):
    code = ErrorCode.ABORTED


class Unavailable(ValvError):
    code = ErrorCode.UNAVAILABLE


class DataLoss(ValvError):
    """Stored data failed verification (edited or moved at the storage level)."""

    code = ErrorCode.DATA_LOSS
