"""The one place exceptions become gRPC statuses (valv.central.errors)."""

from __future__ import annotations

import pytest
from grpclib import GRPCError
from grpclib.const import Status

from valv.central.errors import to_grpc_error
from valv.core import errors
from valv.core.crypto.errors import InvalidCiphertextError, RootKeyConfigError
from valv.core.storage.base import LimitExceededError, ReadOnlyTransactionError, StorageError
from valv.core.storage.keys import pack
from valv.core.storage.sealed import TamperedRecordError


@pytest.mark.parametrize(("exc", "status"), [
    (errors.InvalidArgument("bad"), Status.INVALID_ARGUMENT),
    (errors.NotFound("gone"), Status.NOT_FOUND),
    (errors.AlreadyExists("dup"), Status.ALREADY_EXISTS),
    (errors.FailedPrecondition("state"), Status.FAILED_PRECONDITION),
    (errors.Unimplemented("later"), Status.UNIMPLEMENTED),
    (errors.DataLoss("edited"), Status.DATA_LOSS),
    (InvalidCiphertextError("x"), Status.INVALID_ARGUMENT),
    (TamperedRecordError(pack("ck", "p"), "failed authentication"), Status.DATA_LOSS),
    (LimitExceededError("value too large"), Status.INVALID_ARGUMENT),
    (RootKeyConfigError("no key"), Status.FAILED_PRECONDITION),
    (StorageError("database is locked at /var/lib/valv/valv.db"), Status.UNAVAILABLE),
    (ReadOnlyTransactionError("bug"), Status.INTERNAL),
    (RuntimeError("bug"), Status.INTERNAL),
])
def test_status_of_each_exception(exc: Exception, status: Status) -> None:
    assert to_grpc_error(exc, "Encrypt").status is status


def test_domain_messages_reach_the_caller() -> None:
    assert to_grpc_error(errors.NotFound("CryptoKey x not found"), "GetCryptoKey").message == (
        "CryptoKey x not found")


@pytest.mark.parametrize("exc", [StorageError("database is locked at /var/lib/valv/valv.db"),
                                 RuntimeError("secret internals /etc/valv")])
def test_internal_details_stay_in_the_log(exc: Exception) -> None:
    message = to_grpc_error(exc, "Encrypt").message or ""
    assert "/var/lib" not in message and "/etc" not in message
    assert "incident" in message


def test_a_bare_unimplemented_gets_a_message_naming_the_method() -> None:
    mapped = to_grpc_error(GRPCError(Status.UNIMPLEMENTED), "MacSign")
    assert mapped.status is Status.UNIMPLEMENTED
    assert "MacSign" in (mapped.message or "")
