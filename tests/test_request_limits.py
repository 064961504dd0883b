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
