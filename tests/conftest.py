from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CentralProcess]:
    """One central process per test module; tests isolate by unique project ids."""
    process = CentralProcess(tmp_path_factory.mktemp("central")).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def kms(central: CentralProcess) -> kms_v1.KeyManagementServiceClient:
    """Google's official client, connected to the module's central."""
    return central.client()


@pytest.fixture
def fresh_central(tmp_path: Path) -> Iterator[CentralProcess]:
    """A central of the test's own, in the test's temp dir (for restarts and the like)."""
    process = CentralProcess(tmp_path / "central").start()
    yield process
    process.stop()


@pytest.fixture
def project() -> str:
    """A project id no other test uses."""
    return f"p-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def location(project: str) -> str:
    return f"projects/{project}/locations/global"


@pytest.fixture
def key_ring(kms: kms_v1.KeyManagementServiceClient, location: str) -> str:
    """The name of a new, empty KeyRing in a fresh project."""
    ring = kms.create_key_ring(
        request={"parent": location, "key_ring_id": "ring", "key_ring": {}}, **CALL)
    return ring.name


@pytest.fixture
def crypto_key(kms: kms_v1.KeyManagementServiceClient, key_ring: str) -> str:
    """The name of a new ENCRYPT_DECRYPT CryptoKey with version 1 as primary."""
    key = kms.create_crypto_key(
        request={"parent": key_ring, "crypto_key_id": "key",
                 "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT}},
        **CALL)
    return key.name
