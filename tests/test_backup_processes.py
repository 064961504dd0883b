"""Backup, active backup, restore and migration through the ``valv`` CLI, against real
central processes driven by Google's client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess, wait_for
from tests.rmk_support import run_valv
from valv.core import records
from valv.core.crypto.keysources import load_root_key_file
from valv.core.crypto.rootkey import RootKeyring
from valv.core.storage.keys import unpack
from valv.core.storage.sealed import Sealer

ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
DEV_KEY = "master.key"


def valv_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("VALV_")}


class KeyWriter:
    """Threads creating CryptoKeys through central until stopped; what was acknowledged."""

    def __init__(self, central: CentralProcess, ring: str, threads: int = 2) -> None:
        self.ring = ring
        self.acked: list[tuple[str, float]] = []  # (key name, wall time of the answer)
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(central.client(), n))
                         for n in range(threads)]

    def _run(self, kms: kms_v1.KeyManagementServiceClient, n: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            try:
                key = kms.create_crypto_key(parent=self.ring, crypto_key_id=f"w{n}-{i}",
                                            crypto_key={"purpose": ENCRYPT_DECRYPT}, **CALL)
            except (gexc.ServiceUnavailable, gexc.DeadlineExceeded) as exc:  # central killed
                self.failures.append(exc)
                return
            with self._lock:
                self.acked.append((key.name, time.time()))

    def start(self) -> KeyWriter:
        for thread in self._threads:
            thread.start()
        return self

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def make_world(kms: kms_v1.KeyManagementServiceClient) -> dict[str, Any]:
    """A ring, keys with several versions, ciphertexts, and an IAM policy."""
    project = f"p-{uuid.uuid4().hex[:8]}"
    ring = kms.create_key_ring(parent=f"projects/{project}/locations/global",
                               key_ring_id="ring", key_ring={}).name
    ciphertexts = {}
    for k in range(3):
        key = kms.create_crypto_key(parent=ring, crypto_key_id=f"k{k}",
                                    crypto_key={"purpose": ENCRYPT_DECRYPT}).name
        for v in range(2):
            if v:
                version = kms.create_crypto_key_version(parent=key, crypto_key_version={})
                kms.update_crypto_key_primary_version(
                    name=key, crypto_key_version_id=version.name.rsplit("/", 1)[1])
            plaintext = f"{key}#{v}".encode()
            ciphertexts[plaintext] = (key, kms.encrypt(name=key, plaintext=plaintext).ciphertext)
    policy = kms.set_iam_policy(request={"resource": f"{ring}/cryptoKeys/k0", "policy": {
        "bindings": [{"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter",
                      "members": ["user:alice@example.com"]}]}})
    return {"ring": ring, "ciphertexts": ciphertexts, "policy": policy}


def check_world(kms: kms_v1.KeyManagementServiceClient, world: dict[str, Any]) -> None:
    for plaintext, (key, ciphertext) in world["ciphertexts"].items():
        assert kms.decrypt(name=key, ciphertext=ciphertext).plaintext == plaintext
    policy = kms.get_iam_policy(request={"resource": f"{world['ring']}/cryptoKeys/k0"})
    assert policy.bindings == world["policy"].bindings
    # New work on the restored store goes on from where the source was.
    key = f"{world['ring']}/cryptoKeys/k1"
    version = kms.create_crypto_key_version(parent=key, crypto_key_version={})
    assert version.name.endswith("/cryptoKeyVersions/3")


def change_log(db: Path, key_file: Path) -> tuple[int, dict[int, tuple[str, str]]]:
    """(head seq, {seq: (kind, resource)}) of a store's change log, read from the file."""
    ring = RootKeyring([load_root_key_file(key_file)])
    sealer = Sealer(ring)
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT k, v FROM kv").fetchall()
        entries: dict[int, tuple[str, str]] = {}
        head = 0
        for k, v in rows:
            parts = unpack(bytes(k))
            if parts == ("log-head",):
                head = records.decode_change_head(sealer.open(bytes(k), bytes(v)))[0]
            elif parts[0] == "log":
                record = records.decode_change(bytes(k), sealer.open(bytes(k), bytes(v)))
                entries[int(record.seq)] = (record.kind, record.resource)
        return head, entries
    finally:
        ring.zeroize()


def log_epoch(db: Path, key_file: Path) -> bytes:
    """The change log's epoch, read from the file (b"": none)."""
    ring = RootKeyring([load_root_key_file(key_file)])
    try:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT v FROM kv WHERE k = ?",
                               (records.CHANGE_EPOCH_KEY,)).fetchone()
        if row is None:
            return b""
        return records.decode_change_epoch(
            Sealer(ring).open(records.CHANGE_EPOCH_KEY, bytes(row[0])))
    finally:
        ring.zeroize()


def listed_keys(kms: kms_v1.KeyManagementServiceClient, ring: str) -> set[str]:
    return {k.name for k in kms.list_crypto_keys(parent=ring)}


def restore_into(tmp: Path, name: str, source: Path, *args: str,
                 key_from: Path | None = None) -> tuple[Path, subprocess.CompletedProcess[str]]:
    target = tmp / name
    target.mkdir(mode=0o700)
    if key_from is not None:  # the operator configures the source's root key for the target
        shutil.copy2(key_from / DEV_KEY, target / DEV_KEY)
    result = run_valv("restore", "--in", str(source), "--data-dir", str(target), *args)
    return target, result


def test_backup_during_writes_then_restore_elsewhere_serves_everything(tmp_path: Path) -> None:
    source_dir = tmp_path / "source"
    central = CentralProcess(source_dir).start()
    writer: KeyWriter | None = None
    try:
        kms = central.client()
        world = make_world(kms)
        writer = KeyWriter(central, world["ring"]).start()
        wait_for(lambda: writer is not None and writer.count() >= 5, deadline_s=30,
                 what="the writers to get going")
        backup = tmp_path / "valv.vbk"
        # A few pairs per read transaction: many transactions, with writes between them.
        made = run_valv("backup", "--out", str(backup), "--data-dir", str(source_dir),
                        "--chunk", "5")
        writer.stop()
        assert made.returncode == 0, made.stderr
        assert "consistent at journal seq" in made.stderr and "Traceback" not in made.stderr
        assert not writer.failures
    finally:
        if writer is not None:
            writer.stop()
        central.stop()

    verify = run_valv("backup", "verify", str(backup))
    assert verify.returncode == 0, verify.stderr
    summary = json.loads(verify.stdout)
    (only,) = summary["files"]
    assert only["kind"] == "full" and only["source"] == "sqlite" and only["records"] > 0
    assert only["clears"] > 0  # writes landed during the dump and were replayed
    assert len(only["rmk_ids"]) == 1 and len(only["body_sha256"]) == 64

    # The records are still sealed: nothing in the file opens without the root key.
    raw = backup.read_bytes()
    assert b"user:alice@example.com" not in raw and b"projects/" not in raw[:8]

    target, restored = restore_into(tmp_path, "target", backup, key_from=source_dir)
    assert restored.returncode == 0, restored.stderr
    fsck = run_valv("fsck", "--data-dir", str(target))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    audit = run_valv("audit", "verify", "--data-dir", str(target))
    assert audit.returncode == 0, audit.stdout + audit.stderr

    # Consistent: the restore holds exactly the keys whose creation is in the restored
    # change log, which is the source's log cut at one seq.
    head, restored_log = change_log(target / "valv.db", target / DEV_KEY)
    _, source_log = change_log(source_dir / "valv.db", source_dir / DEV_KEY)
    assert head > 0
    assert restored_log == {seq: entry for seq, entry in source_log.items() if seq <= head}
    created_by_then = {resource for seq, (kind, resource) in source_log.items()
                       if seq <= head and kind == "crypto_key"}
    created_later = {resource for seq, (kind, resource) in source_log.items()
                     if seq > head and kind == "crypto_key"} - created_by_then

    # The restored change log is a new epoch: sidecars that watched the source can't
    # resume on it by seq. The restore cleared the epoch; the first central makes one.
    source_epoch = log_epoch(source_dir / "valv.db", source_dir / DEV_KEY)
    assert len(source_epoch) == 16
    assert log_epoch(target / "valv.db", target / DEV_KEY) == b""

    served = CentralProcess(target).start()
    try:
        kms = served.client()
        keys = listed_keys(kms, world["ring"])
        assert keys == created_by_then
        assert not keys & created_later
        check_world(kms, world)
    finally:
        served.stop()
    restored_epoch = log_epoch(target / "valv.db", target / DEV_KEY)
    assert len(restored_epoch) == 16 and restored_epoch != source_epoch


def follow_lines(proc: subprocess.Popen[str], lines: list[dict[str, Any]]) -> threading.Thread:
    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(json.loads(line))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_active_backup_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    """Writes go on; the source central is killed; the restore holds every write
    acknowledged before the last segment read the store, and a restore up to an earlier
    segment holds every write acknowledged before that one read it."""
    source_dir = tmp_path / "source"
    directory = tmp_path / "active"
    central = CentralProcess(source_dir).start()
    kms = central.client()
    world = make_world(kms)
    lines: list[dict[str, Any]] = []
    with open(tmp_path / "follow.log", "wb") as log:
        follower = subprocess.Popen(
            [sys.executable, "-m", "valv", "backup", "--follow", str(directory),
             "--interval", "0.2s", "--data-dir", str(source_dir)],
            stdout=subprocess.PIPE, stderr=log, text=True, env=valv_env())
    follow_lines(follower, lines)
    writer = KeyWriter(central, world["ring"]).start()
    try:
        wait_for(lambda: sum(1 for x in lines if x["kind"] == "segment") >= 3, deadline_s=60,
                 what="three segments")
        central.stop(signal.SIGKILL)
        writer.stop()
        # The follower goes on reading the store's file: wait until it has written up to
        # the journal's head, which holds everything the dead central ever committed.
        head = journal_head(source_dir / "valv.db", source_dir / DEV_KEY)
        wait_for(lambda: any(x["journal_seq"] == head for x in lines), deadline_s=30,
                 what=f"the follower to reach journal seq {head}")
    finally:
        writer.stop()
        follower.send_signal(signal.SIGKILL)
        follower.wait(timeout=30)
        central.stop()
    assert len(writer.acked) >= 3

    verify = run_valv("backup", "verify", str(directory))
    assert verify.returncode == 0, verify.stderr
    plan = json.loads(verify.stdout)
    assert plan["files"][0]["kind"] == "full"
    segments = plan["files"][1:]
    assert len(segments) >= 3 and all(f["kind"] == "segment" for f in segments)

    def restored_keys(name: str, *args: str) -> set[str]:
        target, restored = restore_into(tmp_path, name, directory, *args, key_from=source_dir)
        assert restored.returncode == 0, restored.stderr
        fsck = run_valv("fsck", "--data-dir", str(target))
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        served = CentralProcess(target).start()
        try:
            check_world(served.client(), world)
            return listed_keys(served.client(), world["ring"])
        finally:
            served.stop()

    everything = restored_keys("target")
    assert {name for name, _ in writer.acked} <= everything
    middle = segments[len(segments) // 2]
    earlier = restored_keys("earlier", "--until", str(middle["segment"]))
    assert {name for name, acked_at in writer.acked if acked_at < middle["read_at"]} <= earlier
    assert earlier < everything


def journal_head(db: Path, key_file: Path) -> int:
    from valv.core.storage import journal

    ring = RootKeyring([load_root_key_file(key_file)])
    try:
        with sqlite3.connect(db) as conn:
            (value,) = conn.execute("SELECT v FROM kv WHERE k = ?",
                                    (journal.HEAD_KEY,)).fetchone()
        head = journal._decode_head(Sealer(ring).open(journal.HEAD_KEY, bytes(value)))
        return head[0]
    finally:
        ring.zeroize()


@pytest.fixture(scope="module")
def good_backup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small backup and the data dir it came from."""
    work = tmp_path_factory.mktemp("good")
    source_dir = work / "source"
    central = CentralProcess(source_dir).start()
    try:
        make_world(central.client())
    finally:
        central.stop()
    backup = work / "valv.vbk"
    made = run_valv("backup", "--out", str(backup), "--data-dir", str(source_dir))
    assert made.returncode == 0, made.stderr
    return backup, source_dir


def damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "corrupted":
        middle = bytearray(data)
        middle[len(data) // 2] ^= 0x40
        return bytes(middle)
    if how == "wrong-version":
        return data[:7] + b"\x09" + data[8:]
    assert how == "empty"
    return b""


@pytest.mark.parametrize(("how", "says"), [
    ("truncated", "truncated"), ("corrupted", "corrupt"),
    ("wrong-version", "backup format version 9"), ("empty", "not a Valv backup")])
def test_a_bad_backup_is_refused_and_nothing_is_written(
        tmp_path: Path, good_backup: tuple[Path, Path], how: str, says: str) -> None:
    backup, source_dir = good_backup
    bad = tmp_path / "bad.vbk"
    bad.write_bytes(damaged(backup.read_bytes(), how))
    verify = run_valv("backup", "verify", str(bad))
    assert verify.returncode == 1 and says in verify.stderr, verify.stderr
    assert "Traceback" not in verify.stderr
    target, restored = restore_into(tmp_path, "target", bad, key_from=source_dir)
    assert restored.returncode == 1, restored.stderr
    assert says in restored.stderr and "nothing was written" in restored.stderr
    assert "Traceback" not in restored.stderr
    assert not (target / "valv.db").exists()


def test_stdout_to_stdin_and_what_restore_refuses(tmp_path: Path,
                                                 good_backup: tuple[Path, Path]) -> None:
    backup, source_dir = good_backup
    # valv backup --out - | valv restore --in -
    dumped = subprocess.run([sys.executable, "-m", "valv", "backup", "--out", "-",
                             "--data-dir", str(source_dir)], capture_output=True, env=valv_env(),
                            timeout=60)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stdout.startswith(b"VALVBKP\x01")
    target = tmp_path / "target"
    target.mkdir()
    shutil.copy2(source_dir / DEV_KEY, target / DEV_KEY)
    piped = subprocess.run([sys.executable, "-m", "valv", "restore", "--in", "-",
                            "--data-dir", str(target)], input=dumped.stdout,
                           capture_output=True, env=valv_env(), timeout=60)
    assert piped.returncode == 0, piped.stderr

    # Now it is not empty: refused, unless forced.
    again = run_valv("restore", "--in", str(backup), "--data-dir", str(target))
    assert again.returncode == 2 and "is not empty" in again.stderr, again.stderr
    forced = run_valv("restore", "--in", str(backup), "--data-dir", str(target), "--force")
    assert forced.returncode == 0, forced.stderr
    fsck = run_valv("fsck", "--data-dir", str(target))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    # A target without the backup's root key: refused before anything is written.
    keyless = tmp_path / "keyless"
    keyless.mkdir()
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    other.chmod(0o600)
    refused = run_valv("restore", "--in", str(backup), "--data-dir", str(keyless),
                       "--master-key-file", str(other))
    assert refused.returncode == 2 and "needs root key(s)" in refused.stderr, refused.stderr
    assert not (keyless / "valv.db").exists()


def test_nothing_starts_on_a_half_finished_restore(tmp_path: Path,
                                                  good_backup: tuple[Path, Path]) -> None:
    """A restore that stopped midway leaves its marker: central, fsck and backup refuse
    the store, naming the way out (run the restore again), until it is finished."""
    from valv.core.backup import restore as restore_mod
    from valv.core.storage.sqlite import SqliteStore

    backup, source_dir = good_backup
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    shutil.copy2(source_dir / DEV_KEY, target / DEV_KEY)

    class Crash(Exception):
        pass

    def crash_after_one(state: restore_mod.RestoreProgress) -> None:
        if state.batches == 1:
            raise Crash

    async def half_restore() -> None:
        store = SqliteStore(target / "valv.db")
        try:
            plan = restore_mod.RestorePlan([restore_mod.Source(
                str(backup), restore_mod.check_file(str(backup)))])
            with pytest.raises(Crash):
                await restore_mod.restore(store, plan, batch_frames=5, progress=crash_after_one)
        finally:
            await store.close()

    asyncio.run(half_restore())
    for command in (["central"], ["fsck"], ["backup", "--out", str(tmp_path / "b.vbk")]):
        refused = run_valv(*command, "--data-dir", str(target), timeout=60)
        assert refused.returncode != 0, (command, refused.stderr)
        assert "restore" in refused.stderr and "unfinished" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr
    finished = run_valv("restore", "--in", str(backup), "--data-dir", str(target))
    assert finished.returncode == 0, finished.stderr
    fsck = run_valv("fsck", "--data-dir", str(target))
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_entries_a_foundationdb_backup_holds_staged_are_numbered_where_restored(
        tmp_path: Path) -> None:
    """On FoundationDB, writers stage change-log, audit and journal entries under
    versionstamps and sequencers number them later, so a backup can hold staged
    entries. Restored into a store without versionstamps (SQLite), nothing would
    ever number them: the first central to start does, before it writes. The source
    here is SQLite emulating versionstamps, as FoundationDB stages."""
    from tests.keystore_fixtures import open_keystore
    from valv.core.audit import AuditEntry, AuditLog, RecordKind
    from valv.core.backup.dump import dump
    from valv.core.backup.format import BackupWriter
    from valv.core.clock import FakeClock

    source, target = tmp_path / "source", tmp_path / "target"
    for data_dir in (source, target):
        data_dir.mkdir(mode=0o700)
    key_file = source / DEV_KEY
    key_file.write_bytes(os.urandom(32))
    key_file.chmod(0o600)
    shutil.copy2(key_file, target / DEV_KEY)
    backup = tmp_path / "staged.vbk"
    entry = AuditEntry(kind=RecordKind.ADMIN_ACTIVITY, principal="user:a@example.com",
                       auth_method="token", rpc="StagedRpc", resource="projects/p")

    async def stage_then_dump() -> None:
        clock = FakeClock()
        async with open_keystore(source / "valv.db", clock, load_root_key_file(key_file),
                                 versionstamps=True) as (keystore, store):
            log = AuditLog(store, clock)
            await log.open()
            await keystore.create_key_ring("projects/p/locations/global", "staged")
            await log.write([entry])
            with open(backup, "wb") as out:
                await dump(store, BackupWriter(out))

    asyncio.run(stage_then_dump())
    restored = run_valv("restore", "--in", str(backup), "--data-dir", str(target))
    assert restored.returncode == 0, restored.stderr

    def staged() -> list[tuple[Any, ...]]:
        with sqlite3.connect(target / "valv.db") as conn:
            rows = [unpack(bytes(k)) for (k,) in conn.execute("SELECT k FROM kv")]
        return [r for r in rows if r[0] in ("log-stage", "audit-stage", "wj-stage")]

    assert {r[0] for r in staged()} >= {"log-stage", "audit-stage"}  # what the backup held
    central = CentralProcess(target).start()
    try:
        ring = central.client().get_key_ring(
            name="projects/p/locations/global/keyRings/staged", **CALL)
        assert ring.name.endswith("/staged")
    finally:
        central.stop()
    assert staged() == []
    head, log_entries = change_log(target / "valv.db", target / DEV_KEY)
    assert (head, log_entries) == (1, {1: ("key_ring",
                                           "projects/p/locations/global/keyRings/staged")})
    audit = run_valv("audit", "verify", "--data-dir", str(target))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    query = run_valv("audit", "query", "--data-dir", str(target))
    assert query.returncode == 0, query.stderr
    assert [json.loads(line)["rpc"] for line in query.stdout.splitlines()
            if "StagedRpc" in line] == ["StagedRpc"]


def test_a_damaged_segment_in_a_directory_is_refused_before_any_write(
        tmp_path: Path, good_backup: tuple[Path, Path]) -> None:
    backup, source_dir = good_backup
    directory = tmp_path / "active"
    directory.mkdir()
    shutil.copy2(backup, directory / "g000001-base.vbk")
    (directory / "g000001-s000001.vbk").write_bytes(b"VALVBKP\x01" + os.urandom(200))
    target, restored = restore_into(tmp_path, "target", directory, key_from=source_dir)
    assert restored.returncode == 1, restored.stderr
    assert "g000001-s000001.vbk" in restored.stderr, restored.stderr
    assert "nothing was written" in restored.stderr and "Traceback" not in restored.stderr
    assert not (target / "valv.db").exists()
