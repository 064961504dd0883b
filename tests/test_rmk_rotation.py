"""RMK rotation: ``valv rmk rotate`` rewraps every KEK and reseals every record.

The process test is the operator's procedure end to end, with a crash:
data made under RMK A; B added as the newest and central restarted; the
rotation killed with SIGKILL partway (while central serves); run again to
completion; then central with only B configured decrypts everything, fsck is
clean, and no sealed value or key material record in the sqlite file names A.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess
from tests.rmk_support import (
    run_valv,
    seal_ids,
    sealed_values,
    softhsm,
    write_key_file,
)
from valv.core import changelog, records
from valv.core.clock import FakeClock
from valv.core.crypto.rootkey import RootKey, RootKeyring, load_root_key_file
from valv.core.keystore import KeyStore, KeystoreSettings, NewCryptoKey
from valv.core.names import CryptoKeyVersionName
from valv.core.rmk_rotation import RmkRotation, census
from valv.core.storage.keys import pack, unpack
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
DISABLED = kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED
ENABLED = kms_v1.CryptoKeyVersion.CryptoKeyVersionState.ENABLED


def material_ids(db: Path, ring: RootKeyring) -> list[str]:
    """The RMK id every key material record in the sqlite file says wraps its KEK."""
    sealer = Sealer(ring)
    return [records.decode_material(k, sealer.open(k, v))[0]
            for k, v in sealed_values(db) if unpack(k)[0] == "km"]


def key_files(tmp_path: Path, *names: str) -> str:
    return ",".join(str(tmp_path / f"{name}.key") for name in names)


class Data:
    """Keys, versions and ciphertexts made through Google's client."""

    def __init__(self, kms: kms_v1.KeyManagementServiceClient, project: str) -> None:
        self.kms = kms
        self.ring = kms.create_key_ring(
            request={"parent": f"projects/{project}/locations/global", "key_ring_id": "ring",
                     "key_ring": {}}, **CALL).name
        self.ciphertexts: list[tuple[str, bytes, bytes]] = []  # (key, plaintext, ciphertext)
        self.disabled: list[str] = []

    def add_key(self, key_id: str, versions: int = 3) -> str:
        kms = self.kms
        key = kms.create_crypto_key(
            request={"parent": self.ring, "crypto_key_id": key_id,
                     "crypto_key": {"purpose": ENCRYPT_DECRYPT, "labels": {"team": key_id}}},
            **CALL).name
        for _ in range(2, versions + 1):
            kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}},
                                          **CALL)
        for n in range(1, versions + 1):
            plaintext = f"{key_id}/v{n}".encode()
            ct = kms.encrypt(request={"name": f"{key}/cryptoKeyVersions/{n}",
                                      "plaintext": plaintext,
                                      "additional_authenticated_data": b"aad"},
                             **CALL).ciphertext
            self.ciphertexts.append((key, plaintext, bytes(ct)))
        return key

    def disable(self, version: str) -> None:
        self.kms.update_crypto_key_version(
            request={"crypto_key_version": {"name": version, "state": DISABLED},
                     "update_mask": {"paths": ["state"]}}, **CALL)
        self.disabled.append(version)

    def check(self, kms: kms_v1.KeyManagementServiceClient) -> None:
        for version in self.disabled:
            kms.update_crypto_key_version(
                request={"crypto_key_version": {"name": version, "state": ENABLED},
                         "update_mask": {"paths": ["state"]}}, **CALL)
        for key, plaintext, ct in self.ciphertexts:
            got = kms.decrypt(request={"name": key, "ciphertext": ct,
                                       "additional_authenticated_data": b"aad"}, **CALL)
            assert got.plaintext == plaintext
        keys = list(kms.list_crypto_keys(request={"parent": self.ring}, **CALL))
        assert all(k.labels["team"] == k.name.rsplit("/", 1)[1] for k in keys)


def test_rotation_with_a_crash_then_only_the_new_key(tmp_path: Path, project: str) -> None:
    write_key_file(tmp_path / "a.key")
    write_key_file(tmp_path / "b.key")
    a_id = load_root_key_file(tmp_path / "a.key").key_id
    b_id = load_root_key_file(tmp_path / "b.key").key_id
    data_dir = tmp_path / "central"
    db = data_dir / "valv.db"

    # 1. Everything made under A.
    central = CentralProcess(data_dir, "--master-key-file", key_files(tmp_path, "a")).start()
    data = Data(central.client(), project)
    for i in range(4):
        key = data.add_key(f"key{i}")
    data.disable(f"{key}/cryptoKeyVersions/2")
    central.stop()
    assert seal_ids(db).keys() == {a_id}

    # 2. B added as the newest; central restarted; new writes use B.
    both = ("--master-key-file", key_files(tmp_path, "a", "b"))
    central = CentralProcess(data_dir, *both).start()
    try:
        data.kms = central.client()
        data.add_key("after-b", versions=1)
        before = seal_ids(db)
        assert before[a_id] > 30 and before[b_id] > 0

        # 3. The rotation, online, killed in the middle of a batch.
        crashed = run_valv("rmk", "rotate", "--data-dir", str(data_dir), *both,
                           "--batch-size", "4", env={"VALV_FAULT_POINT": "rmk-rotate.mid-batch"})
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        assert "records scanned" in crashed.stderr  # progress, on stderr
        mixed = seal_ids(db)
        assert mixed[a_id] < before[a_id] and mixed[b_id] > before[b_id], mixed
        data.check(central.client())  # nothing is unreadable half-way

        status = run_valv("rmk", "status", "--data-dir", str(data_dir), *both)
        assert json.loads(status.stdout)["needs_rotation"] > 0

        # 4. Run again: it finishes the job.
        total = sum(seal_ids(db).values())  # what it will scan: every record there now
        done = run_valv("rmk", "rotate", "--data-dir", str(data_dir), *both, "--batch-size", "4")
        assert done.returncode == 0, done.stderr
        progress = [line for line in done.stderr.splitlines() if "records scanned (" in line]
        # It adds its root_keys change entry and its batches' journal entries.
        records_now = sum(seal_ids(db).values())
        assert records_now > total
        assert progress[0].startswith(f"rmk rotate: 0/{total} records scanned (0%)")
        # The scan also meets the journal entries its own batches add, as it would any
        # record written meanwhile: it ends at 100% of what it found.
        scanned = int(progress[-1].split()[2].split("/")[0])
        assert total < scanned <= records_now
        assert progress[-1].startswith(f"rmk rotate: {scanned}/{scanned} records scanned (100%)")
        assert f"nothing refers to {a_id} any more" in done.stderr
        status = json.loads(run_valv("rmk", "status", "--data-dir", str(data_dir),
                                     *both).stdout)
        assert status["needs_rotation"] == 0 and status["sealed_by_rmk"] == {b_id: records_now}
        again = run_valv("rmk", "rotate", "--data-dir", str(data_dir), *both)
        assert again.returncode == 0 and ", 0 resealed" in again.stderr  # idempotent
    finally:
        central.stop()

    # 5. A removed from the configuration: everything still decrypts.
    only_b = ("--master-key-file", key_files(tmp_path, "b"))
    central = CentralProcess(data_dir, *only_b).start()
    try:
        data.check(central.client())
    finally:
        central.stop()
    fsck = run_valv("fsck", "--data-dir", str(data_dir), *only_b)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Resealing kept every value byte for byte, so the audit log's chain holds.
    audit = run_valv("audit", "verify", "--data-dir", str(data_dir), *only_b)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert seal_ids(db).keys() == {b_id}
    ring = RootKeyring([load_root_key_file(tmp_path / "b.key")])
    try:
        ids = material_ids(db, ring)
        assert len(ids) == 4 * 3 + 1 and set(ids) == {b_id}
    finally:
        ring.zeroize()


def test_rotation_while_central_writes(tmp_path: Path, project: str) -> None:
    """Writes through central during the rotation are neither lost nor left behind."""
    write_key_file(tmp_path / "a.key")
    write_key_file(tmp_path / "b.key")
    data_dir = tmp_path / "central"
    central = CentralProcess(data_dir, "--master-key-file", key_files(tmp_path, "a")).start()
    data = Data(central.client(), project)
    keys = [data.add_key(f"k{i}", versions=2) for i in range(3)]
    central.stop()
    both = ("--master-key-file", key_files(tmp_path, "a", "b"))
    central = CentralProcess(data_dir, *both).start()
    stop = threading.Event()
    written: dict[str, int] = {}
    errors: list[BaseException] = []

    def writer() -> None:
        kms = central.client()
        n = 0
        try:
            while not stop.is_set():
                n += 1
                key = keys[n % len(keys)]
                kms.update_crypto_key(request={"crypto_key": {"name": key, "labels": {
                    "team": key.rsplit("/", 1)[1], "n": str(n)}},
                    "update_mask": {"paths": ["labels"]}}, **CALL)
                written[key] = n
                ct = kms.encrypt(request={"name": key, "plaintext": b"during",
                                          "additional_authenticated_data": b"aad"},
                                 **CALL).ciphertext
                data.ciphertexts.append((key, b"during", bytes(ct)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = run_valv("rmk", "rotate", "--data-dir", str(data_dir), *both, "--batch-size", "1")
    finally:
        stop.set()
        thread.join()
        central.stop()
    assert not errors, errors
    assert result.returncode == 0, result.stderr
    assert max(written.values()) >= 3, written  # central did write during the rotation
    central = CentralProcess(data_dir, "--master-key-file", key_files(tmp_path, "b")).start()
    try:
        kms = central.client()
        data.check(kms)
        for key, n in written.items():
            assert kms.get_crypto_key(request={"name": key}, **CALL).labels["n"] == str(n)
    finally:
        central.stop()


def test_rotation_into_a_token(tmp_path: Path, project: str) -> None:
    """Migrating into an HSM: a key file A, then a SoftHSM2 token key as the newest."""
    hsm = softhsm()
    label = f"rmk-{os.urandom(4).hex()}"
    hsm.create_key(label)
    write_key_file(tmp_path / "a.key")
    data_dir = tmp_path / "central"
    central = CentralProcess(data_dir, "--master-key-file", key_files(tmp_path, "a")).start()
    data = Data(central.client(), project)
    data.add_key("k", versions=2)
    central.stop()
    both = ("--master-key-file", key_files(tmp_path, "a"), "--master-key-source", "pkcs11")
    result = run_valv("rmk", "rotate", "--data-dir", str(data_dir), *both, env=hsm.env(label))
    assert result.returncode == 0, result.stderr
    central = CentralProcess(data_dir, env=hsm.env(label)).start()  # the token key alone
    try:
        data.check(central.client())
    finally:
        central.stop()
    assert len(seal_ids(data_dir / "valv.db")) == 1


# -- in process: what the rotation leaves alone ---------------------------------


async def test_unreadable_records_are_reported_and_left_alone(tmp_path: Path) -> None:
    a, b, c = RootKey.generate(), RootKey.generate(), RootKey.generate()
    db = tmp_path / "valv.db"

    def store_with(*keys: RootKey) -> tuple[SealedStore, RootKeyring]:
        ring = RootKeyring(list(keys))
        return SealedStore(SqliteStore(str(db)), Sealer(ring)), ring

    store, ring = store_with(a)
    keystore = KeyStore(store, ring, FakeClock(), KeystoreSettings(use_cache_ttl=timedelta(0)))
    await keystore.create_key_ring("projects/p/locations/global", "r")
    key = await keystore.create_crypto_key("projects/p/locations/global/keyRings/r", "k",
                                           NewCryptoKey(purpose=ENCRYPT_DECRYPT))
    ct = (await keystore.encrypt(str(key.name), b"secret", b"")).ciphertext
    orphan = pack("km", "p", "global", "r", "gone", 1)
    await store.run(lambda tr: tr.set(orphan, records.encode_material(a.key_id, b"x" * 60)))
    await store.close()
    foreign_store, _ = store_with(c)  # a record under an RMK that is not configured
    await foreign_store.run(lambda tr: tr.set(pack("meta", "foreign"), b"from elsewhere"))
    foreign_raw = [v for k, v in sealed_values(db) if k == pack("meta", "foreign")]
    await foreign_store.close()

    store, ring = store_with(a, b)
    seen: list[int] = []
    progress = await RmkRotation(store, ring, batch_size=2,
                                 on_progress=lambda p: seen.append(p.scanned)).run()
    assert progress.problem_count == 2
    assert any("not configured" in p for p in progress.problems)
    assert any("'gone'" in p and "without a version record" in p for p in progress.problems)
    assert seen == sorted(seen) and seen[-1] == progress.total
    after = await census(store)
    assert after.sealed[c.key_id] == 1 and after.wrapped[a.key_id] == 1
    assert after.outside(b.key_id) == 3  # the orphan: seal and wrap; the foreign seal
    # Left exactly as it was.
    assert [v for k, v in sealed_values(db) if k == pack("meta", "foreign")] == foreign_raw
    await store.close()

    store, ring = store_with(b)
    keystore = KeyStore(store, ring, FakeClock(), KeystoreSettings(use_cache_ttl=timedelta(0)))
    assert (await keystore.decrypt(str(key.name), ct, b"")).plaintext == b"secret"
    await store.close()


async def test_resealing_preserves_every_value(tmp_path: Path) -> None:
    a, b = RootKey.generate(), RootKey.generate()
    db = tmp_path / "valv.db"
    ring_a = RootKeyring([a])
    store = SealedStore(SqliteStore(str(db)), Sealer(ring_a))
    keystore = KeyStore(store, ring_a, FakeClock(), KeystoreSettings(use_cache_ttl=timedelta(0)))
    await keystore.create_key_ring("projects/p/locations/global", "r")
    for i in range(3):
        name = str((await keystore.create_crypto_key(
            "projects/p/locations/global/keyRings/r", f"k{i}",
            NewCryptoKey(purpose=ENCRYPT_DECRYPT, labels={"i": str(i)}))).name)
        await keystore.create_crypto_key_version(name)

    def opened(ring: RootKeyring) -> dict[bytes, bytes]:
        sealer = Sealer(ring)
        return {k: sealer.open(k, v) for k, v in sealed_values(db)}

    def keks(ring: RootKeyring, values: dict[bytes, bytes]) -> dict[bytes, bytes]:
        out = {}
        for key, value in values.items():
            if unpack(key)[0] == "km":
                rmk_id, wrapped = records.decode_material(key, value)
                name = str(CryptoKeyVersionName(*unpack(key)[1:]))
                with ring.unwrap_kek(rmk_id, wrapped, version_name=name,
                                     algorithm="GOOGLE_SYMMETRIC_ENCRYPTION") as kek:
                    out[key] = bytes(kek)
        return out

    before = opened(ring_a)
    kek_before = keks(ring_a, before)
    await store.close()
    ring_ab = RootKeyring([a, b])
    store = SealedStore(SqliteStore(str(db)), Sealer(ring_ab))
    head_before = await changelog.head(store)
    rotation = RmkRotation(store, ring_ab, batch_size=3)
    progress = await rotation.run()
    # The finished rotation tells every central (and their sidecars): a root_keys entry.
    assert rotation.change_seq == head_before + 1 == await changelog.head(store)
    last = (await changelog.read_since(store, head_before)).changes
    assert [(c.kind, c.resource) for c in last] == [(changelog.ROOT_KEYS, "")]
    await store.close()
    assert progress.problem_count == 0 and progress.rewrapped == len(kek_before) == 6
    ring_b = RootKeyring([b])
    after = opened(ring_b)
    entry, log_head = records.change_key(head_before + 1), records.CHANGE_HEAD_KEY
    assert after.keys() == before.keys() | {entry}
    unchanged = {k: v for k, v in after.items()
                 if unpack(k)[0] != "km" and k not in (entry, log_head)}
    assert unchanged == {k: v for k, v in before.items()
                         if unpack(k)[0] != "km" and k != log_head}
    assert keks(ring_b, after) == kek_before  # the same KEKs, wrapped under B


async def test_batch_size_is_bounded(tmp_path: Path) -> None:
    store = SealedStore(SqliteStore(str(tmp_path / "v.db")),
                        Sealer(RootKeyring([RootKey.generate()])))
    try:
        for bad in (0, 501):
            with pytest.raises(ValueError, match="between 1 and 500"):
                RmkRotation(store, RootKeyring([RootKey.generate()]), batch_size=bad)
    finally:
        await store.close()
