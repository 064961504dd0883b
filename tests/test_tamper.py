"""Storage is untrusted (DESIGN.md §2, §4): edits and swaps made in the sqlite file.

Each test runs a central of its own, stops it, changes ``<data_dir>/valv.db``
(table ``kv(k, v)``, keys packed with ``fdb.tuple``) with stdlib sqlite3,
restarts it, and checks what Google's client sees: DATA_LOSS naming the record,
never a wrong answer.
"""

from __future__ import annotations

import base64
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fdb.tuple
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess
from valv.core import records
from valv.core.crypto import ciphertext as ciphertext_format
from valv.core.crypto.rootkey import RootKeyring, load_root_key_file
from valv.core.storage.sealed import Sealer

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
ALGORITHM = "GOOGLE_SYMMETRIC_ENCRYPTION"


def pack(*parts: Any) -> bytes:
    key: bytes = fdb.tuple.pack(parts)
    return key


def describe(*parts: Any) -> str:
    """How an error message names the record ``parts`` (the tuple's repr)."""
    return repr(tuple(parts))


class Db:
    """Direct access to a stopped central's sqlite file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    def get(self, key: bytes) -> bytes:
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        assert row is not None, f"no record {fdb.tuple.unpack(key)!r}"
        return bytes(row[0])

    def set(self, key: bytes, value: bytes) -> None:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute("UPDATE kv SET v = ? WHERE k = ?", (value, key))
            assert cur.rowcount == 1
            conn.execute("COMMIT")

    def delete(self, key: bytes) -> None:
        with closing(self._connect()) as conn:
            assert conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount == 1

    def swap(self, a: bytes, b: bytes) -> None:
        va, vb = self.get(a), self.get(b)
        assert va != vb
        self.set(a, vb)
        self.set(b, va)

    def flip(self, key: bytes, index: int, bit: int = 0x01) -> None:
        value = bytearray(self.get(key))
        value[index] ^= bit
        self.set(key, bytes(value))

    def raw_bytes(self) -> bytes:
        """Every byte sqlite keeps for this database: main file, WAL and shared memory."""
        out = b""
        for suffix in ("", "-wal", "-shm", "-journal"):
            path = Path(str(self.path) + suffix)
            if path.exists():
                out += path.read_bytes()
        return out


@dataclass
class Setup:
    central: CentralProcess
    db: Db
    project: str
    key: str  # CryptoKey name, versions 1 (primary) and 2
    ct1: bytes  # encrypted with version 1
    ct2: bytes  # encrypted with version 2

    def client(self) -> Client:
        return self.central.client()

    def rec(self, kind: str, *rest: Any) -> tuple[Any, ...]:
        return (kind, self.project, "global", "ring", *rest)

    def version(self, n: int) -> str:
        return f"{self.key}/cryptoKeyVersions/{n}"


LABEL_VALUE = f"quokka-{uuid.uuid4().hex}"


@pytest.fixture
def setup(fresh_central: CentralProcess, project: str) -> Iterator[Setup]:
    kms = fresh_central.client()
    ring = kms.create_key_ring(
        request={"parent": f"projects/{project}/locations/global", "key_ring_id": "ring",
                 "key_ring": {}}, **CALL).name
    key = kms.create_crypto_key(
        request={"parent": ring, "crypto_key_id": "key",
                 "crypto_key": {"purpose": ENCRYPT_DECRYPT,
                                "labels": {"team": LABEL_VALUE}}}, **CALL).name
    v2 = kms.create_crypto_key_version(
        request={"parent": key, "crypto_key_version": {}}, **CALL).name
    ct1 = kms.encrypt(request={"name": key, "plaintext": b"one"}, **CALL).ciphertext
    ct2 = kms.encrypt(request={"name": v2, "plaintext": b"two"}, **CALL).ciphertext
    fresh_central.stop()
    yield Setup(fresh_central, Db(fresh_central.data_dir / "valv.db"), project, key,
                bytes(ct1), bytes(ct2))


def decrypt(kms: Client, key: str, ct: bytes) -> bytes:
    return bytes(kms.decrypt(request={"name": key, "ciphertext": ct}, **CALL).plaintext)


def encrypt(kms: Client, name: str) -> kms_v1.EncryptResponse:
    return kms.encrypt(request={"name": name, "plaintext": b"x"}, **CALL)


def data_loss(call: Any, *names: str) -> str:
    with pytest.raises(gexc.DataLoss) as info:
        call()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def test_untouched_store_works_after_restart(setup: Setup) -> None:
    setup.central.start()
    kms = setup.client()
    assert decrypt(kms, setup.key, setup.ct1) == b"one"
    assert decrypt(kms, setup.key, setup.ct2) == b"two"


def test_swapped_key_material_is_data_loss(setup: Setup) -> None:
    km1, km2 = setup.rec("km", "key", 1), setup.rec("km", "key", 2)
    setup.db.swap(pack(*km1), pack(*km2))
    setup.central.start()
    kms = setup.client()
    data_loss(lambda: decrypt(kms, setup.key, setup.ct1), describe(*km1))
    data_loss(lambda: decrypt(kms, setup.key, setup.ct2), describe(*km2))
    data_loss(lambda: encrypt(kms, setup.key), describe(*km1))  # the primary
    data_loss(lambda: encrypt(kms, setup.version(2)), describe(*km2))
    # Metadata is not affected: the key and its versions still read.
    key = kms.get_crypto_key(request={"name": setup.key}, **CALL)
    assert key.labels["team"] == LABEL_VALUE
    # Operators see it too.
    logged = [line for line in setup.central.logs().splitlines()
              if "storage verification failed" in line]
    assert logged
    assert any(describe(*km1) in line for line in logged)


def test_swap_back_restores_service(setup: Setup) -> None:
    km1, km2 = pack(*setup.rec("km", "key", 1)), pack(*setup.rec("km", "key", 2))
    setup.db.swap(km1, km2)
    setup.central.start()
    data_loss(lambda: decrypt(setup.client(), setup.key, setup.ct1))
    setup.central.stop()
    setup.db.swap(km1, km2)
    setup.central.start()
    assert decrypt(setup.client(), setup.key, setup.ct1) == b"one"


def test_key_material_moved_to_another_key_is_data_loss(setup: Setup) -> None:
    """A km record copied to a second key's slot, in another project."""
    setup.central.start()
    kms = setup.client()
    other_project = f"{setup.project}-x"
    ring = kms.create_key_ring(
        request={"parent": f"projects/{other_project}/locations/global", "key_ring_id": "ring",
                 "key_ring": {}}, **CALL).name
    other = kms.create_crypto_key(
        request={"parent": ring, "crypto_key_id": "key",
                 "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL).name
    setup.central.stop()
    target = ("km", other_project, "global", "ring", "key", 1)
    setup.db.set(pack(*target), setup.db.get(pack(*setup.rec("km", "key", 1))))
    setup.central.start()
    data_loss(lambda: encrypt(setup.client(), other), describe(*target))
    assert decrypt(setup.client(), setup.key, setup.ct1) == b"one"


def test_resealed_material_of_another_version_fails_the_wrap_binding(setup: Setup) -> None:
    """Someone holding the storage seal key (not the wrap key) moves a wrapped KEK.

    The record then opens, but the KEK's wrap AAD (the version name) does not
    match: DATA_LOSS naming the version.
    """
    sealer = Sealer(RootKeyring([load_root_key_file(setup.central.data_dir / "master.key")]))
    km1, km2 = pack(*setup.rec("km", "key", 1)), pack(*setup.rec("km", "key", 2))
    material2 = sealer.open(km2, setup.db.get(km2))
    setup.db.set(km1, sealer.seal(km1, material2))
    setup.central.start()
    kms = setup.client()
    message = data_loss(lambda: decrypt(kms, setup.key, setup.ct1), setup.version(1))
    assert "failed verification" in message
    data_loss(lambda: encrypt(kms, setup.key), setup.version(1))
    assert decrypt(kms, setup.key, setup.ct2) == b"two"


@pytest.mark.parametrize("where", [0, 1, 5, -17, -1])
def test_edited_crypto_key_record_is_data_loss(setup: Setup, where: int) -> None:
    ck = setup.rec("ck", "key")
    setup.db.flip(pack(*ck), where)
    setup.central.start()
    kms = setup.client()
    name = describe(*ck)
    data_loss(lambda: kms.get_crypto_key(request={"name": setup.key}, **CALL), name)
    data_loss(lambda: encrypt(kms, setup.key), name)
    data_loss(lambda: decrypt(kms, setup.key, setup.ct1), name)
    data_loss(lambda: list(kms.list_crypto_keys(
        request={"parent": setup.key.rsplit("/cryptoKeys/", 1)[0]}, **CALL)), name)


def test_swapped_crypto_key_records_are_data_loss(setup: Setup) -> None:
    setup.central.start()
    kms = setup.client()
    ring = setup.key.rsplit("/cryptoKeys/", 1)[0]
    kms.create_crypto_key(request={"parent": ring, "crypto_key_id": "other",
                                   "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)
    setup.central.stop()
    a, b = setup.rec("ck", "key"), setup.rec("ck", "other")
    setup.db.swap(pack(*a), pack(*b))
    setup.central.start()
    kms = setup.client()
    data_loss(lambda: kms.get_crypto_key(request={"name": setup.key}, **CALL), describe(*a))
    data_loss(lambda: kms.get_crypto_key(request={"name": f"{ring}/cryptoKeys/other"},
                                         **CALL), describe(*b))


def test_edited_version_record_is_data_loss(setup: Setup) -> None:
    cv2 = setup.rec("cv", "key", 2)
    setup.db.flip(pack(*cv2), -1, 0x80)
    setup.central.start()
    kms = setup.client()
    data_loss(lambda: kms.get_crypto_key_version(request={"name": setup.version(2)}, **CALL),
              describe(*cv2))
    data_loss(lambda: decrypt(kms, setup.key, setup.ct2), describe(*cv2))
    data_loss(lambda: list(kms.list_crypto_key_versions(
        request={"parent": setup.key}, **CALL)), describe(*cv2))
    # Version 1 is untouched.
    assert decrypt(kms, setup.key, setup.ct1) == b"one"


def test_deleted_key_material_is_data_loss(setup: Setup) -> None:
    setup.db.delete(pack(*setup.rec("km", "key", 1)))
    setup.central.start()
    message = data_loss(lambda: decrypt(setup.client(), setup.key, setup.ct1),
                        setup.version(1))
    assert "missing" in message


def test_no_secret_in_clear_in_the_database(setup: Setup) -> None:
    raw = setup.db.raw_bytes()
    assert setup.project.encode() in raw  # names are keys, in clear: the grep works
    for text in (LABEL_VALUE, LABEL_VALUE.upper()):
        assert text.encode() not in raw
        assert text.encode("utf-16-le") not in raw

    root_key = load_root_key_file(setup.central.data_dir / "master.key")
    ring = RootKeyring([root_key])
    km1 = pack(*setup.rec("km", "key", 1))
    rmk_id, wrapped = records.decode_material(km1, Sealer(ring).open(km1, setup.db.get(km1)))
    with ring.unwrap_kek(rmk_id, wrapped, version_name=setup.version(1),
                         algorithm=ALGORITHM) as kek:
        raw_kek = bytes(kek)
        # It is the real KEK: it decrypts what central encrypted with version 1.
        assert ciphertext_format.CiphertextCodec().decrypt(
            kek, key_name=setup.key, version_id=1, ciphertext=setup.ct1, aad=b"") == b"one"
    for secret in (raw_kek, wrapped, base64.b64encode(raw_kek), raw_kek.hex().encode()):
        assert secret not in raw
    rmk = base64.b64decode((setup.central.data_dir / "master.key").read_bytes())
    assert rmk not in raw

    # While serving too (the WAL holds the latest writes).
    setup.central.start()
    kms = setup.client()
    kms.update_crypto_key(request={"crypto_key": {"name": setup.key,
                                                  "labels": {"team": LABEL_VALUE + "-b"}},
                                   "update_mask": {"paths": ["labels"]}}, **CALL)
    raw = setup.db.raw_bytes()
    assert (LABEL_VALUE + "-b").encode() not in raw
    assert LABEL_VALUE.encode() not in raw
    assert raw_kek not in raw


def test_records_sealed_under_a_root_key_that_is_no_longer_configured(tmp_path: Path) -> None:
    """Removing a root key too early: the error says which key is missing and how to fix it."""
    import os

    def key_file(name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(base64.b64encode(os.urandom(32)))
        path.chmod(0o600)
        return path

    old, new = key_file("old.key"), key_file("new.key")
    central = CentralProcess(tmp_path / "c", "--master-key-file", str(old)).start()
    kms = central.client()
    ring = kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                        "key_ring_id": "r", "key_ring": {}}, **CALL)
    central.stop()
    central.extra_args = ("--master-key-file", str(new))
    central.start()
    try:
        with pytest.raises(gexc.DataLoss) as info:
            central.client().get_key_ring(request={"name": ring.name}, **CALL)
        assert "not configured" in info.value.message
        assert "VALV_MASTER_KEY_FILE" in info.value.message
    finally:
        central.stop()
