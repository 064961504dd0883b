"""The audit log through real central processes, Google's client and the `valv audit` tools.

Tampering is done the way an attacker with storage access would: raw SQLite
edits of ``<data_dir>/valv.db`` (table kv(k, v), keys fdb.tuple-packed).
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import fdb.tuple
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess, wait_for

ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
# No periodic flush during a test: counts are written at shutdown.
NO_FLUSH = ("--audit-flush-interval", "3600")


def valv_audit(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command, *rest = args
    return subprocess.run(
        [sys.executable, "-m", "valv", "audit", command, "--data-dir", str(data_dir), *rest],
        capture_output=True, text=True, timeout=60)


def records(data_dir: Path, *filters: str) -> list[dict[str, Any]]:
    result = valv_audit(data_dir, "query", *filters)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def status_of(call: Any) -> str:
    try:
        call()
    except gexc.GoogleAPICallError as exc:
        return str(exc.grpc_status_code.name)  # type: ignore[union-attr]
    return "OK"


def test_random_operations_through_googles_client_are_recorded_in_order(
        tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", *NO_FLUSH).start()
    rng = random.Random(7)
    location = "projects/audit/locations/global"
    ring = f"{location}/keyRings/r"
    expected: list[tuple[str, str, str, str]] = []
    try:
        kms = central.client()

        def change(rpc: str, resource: str, call: Any) -> str:
            status = status_of(call)
            expected.append(("user:dev", rpc, resource, status))
            return status

        change("CreateKeyRing", location, lambda: kms.create_key_ring(
            request={"parent": location, "key_ring_id": "r", "key_ring": {}}, **CALL))
        keys: dict[str, int] = {}
        for _ in range(40):
            choice = rng.randrange(8)
            if choice == 0 or not keys:
                key_id = f"k{rng.randrange(3)}"
                if change("CreateCryptoKey", ring, lambda k=key_id: kms.create_crypto_key(
                        request={"parent": ring, "crypto_key_id": k,
                                 "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)) == "OK":
                    keys[f"{ring}/cryptoKeys/{key_id}"] = 1
                continue
            key = rng.choice(sorted(keys))
            version = f"{key}/cryptoKeyVersions/{rng.randint(1, keys[key])}"
            if choice == 1:
                if change("CreateCryptoKeyVersion", key,
                          lambda k=key: kms.create_crypto_key_version(
                              request={"parent": k, "crypto_key_version": {}},
                              **CALL)) == "OK":
                    keys[key] += 1
            elif choice == 2:
                change("DestroyCryptoKeyVersion", version,
                       lambda v=version: kms.destroy_crypto_key_version(
                           request={"name": v}, **CALL))
            elif choice == 3:
                change("RestoreCryptoKeyVersion", version,
                       lambda v=version: kms.restore_crypto_key_version(
                           request={"name": v}, **CALL))
            elif choice == 4:
                state = rng.choice(["ENABLED", "DISABLED"])
                change("UpdateCryptoKeyVersion", version,
                       lambda v=version, s=state: kms.update_crypto_key_version(
                           request={"crypto_key_version": {"name": v, "state": s},
                                    "update_mask": {"paths": ["state"]}}, **CALL))
            elif choice == 5:
                change("UpdateCryptoKeyPrimaryVersion", key,
                       lambda k=key, v=version: kms.update_crypto_key_primary_version(
                           request={"name": k, "crypto_key_version_id": v.rsplit("/", 1)[1]},
                           **CALL))
            elif choice == 6:  # data access and reads: no admin record
                status_of(lambda k=key: kms.encrypt(
                    request={"name": k, "plaintext": b"dek"}, **CALL))
                status_of(lambda k=key: kms.get_crypto_key(request={"name": k}, **CALL))
            else:
                change("UpdateCryptoKey", key, lambda k=key: kms.update_crypto_key(
                    request={"crypto_key": {"name": k, "labels": {"n": str(rng.randrange(9))}},
                             "update_mask": {"paths": ["labels"]}}, **CALL))
        # A failed state change is recorded with its status.
        destroyed = f"{sorted(keys)[0]}/cryptoKeyVersions/1"
        for _ in range(2):
            change("DestroyCryptoKeyVersion", destroyed,
                   lambda: kms.destroy_crypto_key_version(request={"name": destroyed}, **CALL))
        assert expected[-1][3] == "FAILED_PRECONDITION"

        got = records(central.data_dir)  # while central serves
        assert [(r["principal"], r["rpc"], r["resource"], r["status"]) for r in got] == expected
        assert all(r["kind"] == "ADMIN_ACTIVITY" and r["auth_method"] == "dev"
                   and r["peer"].startswith("127.0.0.1:") and len(r["request_id"]) == 32
                   for r in got)
        assert [r["seq"] for r in got] == list(range(1, len(expected) + 1))
        failed = records(central.data_dir, "--result", "FAILED_PRECONDITION")
        assert failed and all(r["status"] == "FAILED_PRECONDITION" and r["message"]
                              for r in failed)
        assert records(central.data_dir, "--result", "DENIED") == []
        assert records(central.data_dir, "--principal", "user:nobody") == []
        assert len(records(central.data_dir, "--resource", ring)) == len(expected)
        assert records(central.data_dir, "--until", "2000-01-01T00:00:00Z") == []
        assert len(records(central.data_dir, "--since", "1h")) == len(expected)
        verify = valv_audit(central.data_dir, "verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f"audit log intact: {len(expected)} records verified" in verify.stdout
    finally:
        central.stop()


def _central_help() -> str:
    return subprocess.run([sys.executable, "-m", "valv", "central", "--help"],
                          capture_output=True, text=True, timeout=60).stdout


def _tokens_supported() -> bool:
    return "--tokens-file" in _central_help()


def _dev_root_key() -> tuple[str, ...]:
    """Authenticated central refuses the development root key unless told it's fine."""
    return ("--dev-root-key",) if "--dev-root-key" in _central_help() else ()


def test_unauthenticated_calls_are_counted(tmp_path: Path) -> None:
    """Anyone who can reach the port can be refused: those refusals are counted per
    caller host x RPC x reason x minute and written in batches, not one per call."""
    if not _tokens_supported():
        pytest.skip("authentication (--tokens-file) has not landed")
    token = "alice-token-" + "x" * 20
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"user:alice@example.com": hashlib.sha256(
        token.encode()).hexdigest()}))
    central = CentralProcess(tmp_path / "c", "--tokens-file", str(tokens), *_dev_root_key(),
                             *NO_FLUSH).start()
    k = 60
    try:
        kms = central.client()
        location = "projects/p/locations/global"
        for _ in range(k):
            assert status_of(lambda: kms.create_key_ring(
                request={"parent": location, "key_ring_id": "r", "key_ring": {}},
                **CALL)) == "UNAUTHENTICATED"
        assert status_of(lambda: kms.encrypt(
            request={"name": f"{location}/keyRings/r/cryptoKeys/k", "plaintext": b"x"},
            metadata=[("authorization", "Bearer wrong-token")], **CALL)) == "UNAUTHENTICATED"
        status = status_of(lambda: kms.create_key_ring(
            request={"parent": location, "key_ring_id": "r", "key_ring": {}},
            metadata=[("authorization", f"Bearer {token}")], **CALL))
        # Allowed (a change) or denied (no role yet): a record of its own either way,
        # as alice; the refusals are only counted so far.
        (alice,) = records(central.data_dir)
        assert (alice["principal"], alice["auth_method"], alice["rpc"], alice["status"]) == (
            "user:alice@example.com", "token", "CreateKeyRing", status)
    finally:
        assert central.stop() == 0  # SIGTERM: the final flush writes the counts
    got = records(central.data_dir)
    assert got[0] == alice
    counted = got[1:]
    assert {(r["kind"], r["principal"], r["auth_method"], r["status"]) for r in counted} == {
        ("DENIED", "", "none", "UNAUTHENTICATED")}
    per_rpc: dict[str, int] = {}
    for r in counted:
        per_rpc[r["rpc"]] = per_rpc.get(r["rpc"], 0) + r["count"]
    assert per_rpc == {"CreateKeyRing": k, "Encrypt": 1}
    # One record per RPC x reason (twice that if a minute ended meanwhile).
    assert len(counted) <= 4
    assert all(r["peer"] == "127.0.0.1" and r["message"] and r["peers"]
               and all(p.startswith("127.0.0.1:") for p in r["peers"]) for r in counted)
    assert token not in json.dumps(got) and "wrong-token" not in json.dumps(got)
    denied = records(central.data_dir, "--result", "DENIED")
    assert sum(r.get("count", 1) for r in denied) == k + 1 + (status != "OK")
    assert valv_audit(central.data_dir, "verify").returncode == 0


def _key(kms: kms_v1.KeyManagementServiceClient, project: str) -> str:
    ring = kms.create_key_ring(request={"parent": f"projects/{project}/locations/global",
                                        "key_ring_id": "r", "key_ring": {}}, **CALL)
    return kms.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                          "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                 **CALL).name


@pytest.mark.parametrize("mode", ["aggregate", "full", "off"])
def test_data_access_modes(tmp_path: Path, mode: str) -> None:
    k = 25
    plaintext = b"TOP-SECRET-PLAINTEXT-" + mode.encode()
    central = CentralProcess(tmp_path / "c", "--audit-data-access", mode, *NO_FLUSH).start()
    try:
        kms = central.client()
        key = _key(kms, "data")
        ciphertexts = [kms.encrypt(request={"name": key, "plaintext": plaintext}, **CALL)
                       .ciphertext for _ in range(k)]
        kms.decrypt(request={"name": key, "ciphertext": ciphertexts[0]}, **CALL)
        kms.generate_random_bytes(request={"location": "projects/data/locations/global",
                                           "length_bytes": 32, "protection_level": "HSM"},
                                  **CALL)
        if mode == "aggregate":  # nothing written yet: counts wait for a flush
            assert len(records(central.data_dir)) == 2
    finally:
        assert central.stop() == 0  # SIGTERM: the final flush
    got = records(central.data_dir)
    data = [r for r in got if r["rpc"] in ("Encrypt", "Decrypt", "GenerateRandomBytes")]
    version = f"{key}/cryptoKeyVersions/1"
    if mode == "off":
        assert data == []
    elif mode == "full":
        assert [(r["kind"], r["rpc"], r["target"]) for r in data[:k + 1]] == (
            [("DATA_ACCESS", "Encrypt", version)] * k + [("DATA_ACCESS", "Decrypt", version)])
        assert data[0]["request"] == {"name": key, "plaintext_bytes": len(plaintext)}
        assert data[-1]["rpc"] == "GenerateRandomBytes" and len(data) == k + 2
    else:
        # One record per principal x version x minute (two if the calls straddled
        # a minute boundary), with the count.
        assert all(r["kind"] == "DATA_ACCESS_AGGREGATE" and r["principal"] == "user:dev"
                   for r in data)
        counts: dict[tuple[str, str], int] = {}
        for r in data:
            counts[(r["rpc"], r.get("target", ""))] = (
                counts.get((r["rpc"], r.get("target", "")), 0) + r["count"])
        assert counts == {("Encrypt", version): k, ("Decrypt", version): 1,
                          ("GenerateRandomBytes", ""): 1}
        assert len(data) <= 6
    # Nothing in any record, or in the database, is data or key material.
    dump = valv_audit(central.data_dir, "tail", "-n", "1000").stdout
    db = (central.data_dir / "valv.db").read_bytes()
    for secret in [plaintext, *ciphertexts[:3]]:
        for form in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert form.decode("latin-1") not in dump
            assert form not in db
    assert valv_audit(central.data_dir, "verify").returncode == 0


def _edit(db: Path, sql: str, *params: Any) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        assert conn.execute(sql, params).rowcount == 1


def _value(db: Path, key: bytes) -> bytes:
    with closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
    assert row is not None
    return bytes(row[0])


def rec(seq: int) -> bytes:
    return bytes(fdb.tuple.pack(("audit", seq)))


HEAD = bytes(fdb.tuple.pack(("audit-head",)))
GENESIS = bytes(fdb.tuple.pack(("audit-genesis",)))
RECORDS = fdb.tuple.range(("audit",))


def _delete_log(db: Path, *, genesis: bool) -> None:
    """Every record and the head (and the genesis marker): the whole log, gone."""
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("DELETE FROM kv WHERE k >= ? AND k < ?", (RECORDS.start, RECORDS.stop))
        conn.execute("DELETE FROM kv WHERE k = ?", (HEAD,))
        if genesis:
            assert conn.execute("DELETE FROM kv WHERE k = ?", (GENESIS,)).rowcount == 1


def _delete(db: Path, seq: int) -> None:
    _edit(db, "DELETE FROM kv WHERE k = ?", rec(seq))


def _swap(db: Path, a: int, b: int) -> None:
    va, vb = _value(db, rec(a)), _value(db, rec(b))
    _edit(db, "UPDATE kv SET v = ? WHERE k = ?", vb, rec(a))
    _edit(db, "UPDATE kv SET v = ? WHERE k = ?", va, rec(b))


def _flip(db: Path, seq: int) -> None:
    value = bytearray(_value(db, rec(seq)))
    value[len(value) // 2] ^= 0x01
    _edit(db, "UPDATE kv SET v = ? WHERE k = ?", bytes(value), rec(seq))


TAMPERING = {
    "a record deleted": (lambda db: _delete(db, 3), "PROBLEM: record 3 is missing"),
    "two records swapped": (lambda db: _swap(db, 2, 4), "PROBLEM: record 2: failed "
                                                         "authentication"),
    "a byte edited": (lambda db: _flip(db, 5), "PROBLEM: record 5: failed authentication"),
    "the tail truncated": (lambda db: _delete(db, 8), "PROBLEM: the tail was truncated: the "
                                                      "head names record 8 but the log ends "
                                                      "at 7"),
    "the tail and head deleted": (
        lambda db: (_delete(db, 8), _edit(db, "DELETE FROM kv WHERE k = ?", HEAD)),
        "PROBLEM: the head is missing"),
    "an old record copied over a newer one": (
        lambda db: _edit(db, "UPDATE kv SET v = ? WHERE k = ?", _value(db, rec(1)), rec(6)),
        "PROBLEM: record 6: failed authentication"),
    "every record and the head deleted": (
        lambda db: _delete_log(db, genesis=False), "PROBLEM: the whole log was deleted"),
    "the whole log deleted, genesis marker included": (
        lambda db: _delete_log(db, genesis=True),
        "PROBLEM: the store holds records (key rings, keys...) but no audit log"),
}


def test_verify_detects_tampering_in_the_sqlite_file(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", *NO_FLUSH).start()
    try:
        kms = central.client()
        key = _key(kms, "tamper")
        for _ in range(6):
            kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}},
                                          **CALL)
    finally:
        central.stop()
    intact = valv_audit(central.data_dir, "verify")
    assert intact.returncode == 0, intact.stdout + intact.stderr
    assert "audit log intact: 8 records verified; head seq 8 hash " in intact.stdout
    head_hash = intact.stdout.rsplit(" ", 1)[1].strip()
    anchored = valv_audit(central.data_dir, "verify", "--anchor", f"8:{head_hash}", "--json")
    assert anchored.returncode == 0 and json.loads(anchored.stdout)["ok"] is True
    assert json.loads(anchored.stdout)["log_created"].endswith("Z")

    for name, (tamper, message) in TAMPERING.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(central.data_dir, copy)
        tamper(copy / "valv.db")
        result = valv_audit(copy, "verify")
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert message in result.stdout, (name, result.stdout)
        assert "audit log NOT intact" in result.stdout
        assert "Traceback" not in result.stderr
        # query still prints what it can, and says what it skipped.
        query = valv_audit(copy, "query")
        assert "Traceback" not in query.stderr


def test_a_deleted_log_refuses_changes_after_a_restart(tmp_path: Path) -> None:
    """Whoever wipes the log at the storage level can't have central start a new
    one over the evidence: changes are refused (DATA_LOSS) until the log is
    restored; using keys goes on."""
    central = CentralProcess(tmp_path / "c", *NO_FLUSH).start()
    try:
        key = _key(central.client(), "wiped")
    finally:
        central.stop()
    _delete_log(central.data_dir / "valv.db", genesis=True)
    central.start()
    try:
        kms = central.client()
        assert status_of(lambda: kms.create_crypto_key_version(
            request={"parent": key, "crypto_key_version": {}}, **CALL)) == "DATA_LOSS"
        kms.encrypt(request={"name": key, "plaintext": b"still works"}, **CALL)
        assert [v.name for v in kms.list_crypto_key_versions(request={"parent": key},
                                                             **CALL)] == [
            f"{key}/cryptoKeyVersions/1"]
    finally:
        assert central.stop() == 0
    assert "the audit log failed its startup check" in central.logs()
    result = valv_audit(central.data_dir, "verify")
    assert result.returncode == 1
    assert "no audit log at all" in result.stdout
    assert records(central.data_dir) == []  # no new chain was started


def test_tail_prints_the_last_records_and_follows(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "c", *NO_FLUSH).start()
    follower: subprocess.Popen[str] | None = None
    try:
        kms = central.client()
        key = _key(kms, "tail")
        last = valv_audit(central.data_dir, "tail", "-n", "1")
        assert [json.loads(line)["rpc"] for line in last.stdout.splitlines()] == [
            "CreateCryptoKey"]
        follower = subprocess.Popen(
            [sys.executable, "-m", "valv", "audit", "tail", "-n", "1", "--follow",
             "--interval", "0.05", "--data-dir", str(central.data_dir)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []

        def read_two() -> None:
            assert follower is not None and follower.stdout is not None
            for _ in range(2):
                lines.append(follower.stdout.readline())

        reader = threading.Thread(target=read_two, daemon=True)
        reader.start()
        wait_for(lambda: lines, deadline_s=30, what="tail to print the last record")
        assert json.loads(lines[0])["rpc"] == "CreateCryptoKey"
        kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}}, **CALL)
        reader.join(timeout=30)
        assert len(lines) == 2 and json.loads(lines[1])["rpc"] == "CreateCryptoKeyVersion"
    finally:
        if follower is not None:
            follower.kill()
            follower.wait()
        central.stop()


def test_the_audit_tools_need_the_root_key(tmp_path: Path) -> None:
    result = valv_audit(tmp_path / "nothing", "verify")
    assert result.returncode == 2
    assert "master.key" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_data_access_mode_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "central", "--addr", "127.0.0.1:0", "--data-dir",
         str(tmp_path), "--audit-data-access", "sometimes"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "off, aggregate, full" in result.stderr and "Traceback" not in result.stderr


ADMIN = "user:admin@example.com"
APP = "serviceAccount:app@example.com"
NOBODY = "user:nobody@example.com"
# Denied calls, whatever the RPC; state-changing calls, whatever their outcome.
STATE_CHANGING = {"CreateKeyRing", "CreateCryptoKey", "CreateCryptoKeyVersion",
                  "DestroyCryptoKeyVersion", "RestoreCryptoKeyVersion", "SetIamPolicy"}


def test_random_allowed_and_denied_operations_with_iam(tmp_path: Path) -> None:
    """Real authentication and authorization: every denial and every change is
    recorded, with the caller's principal and method, and nothing else is; refusals
    of callers without credentials are counted per RPC."""
    if not _tokens_supported():
        pytest.skip("authentication (--tokens-file) has not landed")
    tokens = {member: f"token-{secrets.token_hex(16)}" for member in (ADMIN, APP, NOBODY)}
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(
        {m: hashlib.sha256(t.encode()).hexdigest() for m, t in tokens.items()}))
    root_policy = tmp_path / "root-policy.json"
    root_policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": [ADMIN]}]}))
    central = CentralProcess(tmp_path / "c", "--tokens-file", str(tokens_file),
                             *_dev_root_key(), *NO_FLUSH,
                             env={"VALV_ROOT_POLICY_FILE": str(root_policy)}).start()
    rng = random.Random(11)
    location = "projects/iam/locations/global"
    ring = f"{location}/keyRings/r"
    expected: list[tuple[str, str, str, str, str, str]] = []
    unauthenticated: dict[str, int] = {}
    try:
        kms = central.client()

        def run(actor: str | None, rpc: str, resource: str, method: str,
                request: dict[str, Any]) -> str:
            metadata = [("authorization", f"Bearer {tokens[actor]}")] if actor else []
            status = status_of(lambda: getattr(kms, method)(
                request=request, metadata=metadata, **CALL))
            if actor is None:
                assert status == "UNAUTHENTICATED"
                unauthenticated[rpc] = unauthenticated.get(rpc, 0) + 1
            elif status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                expected.append(("DENIED", actor, "token", rpc, resource, status))
            elif rpc in STATE_CHANGING:
                expected.append(("ADMIN_ACTIVITY", actor, "token", rpc, resource, status))
            return status

        assert run(ADMIN, "CreateKeyRing", location, "create_key_ring",
                   {"parent": location, "key_ring_id": "r", "key_ring": {}}) == "OK"
        keys: list[str] = []
        for _ in range(60):
            actor = rng.choice([ADMIN, ADMIN, APP, NOBODY, None])
            choice = rng.randrange(7)
            if choice == 0 or not keys:
                key_id = f"k{rng.randrange(3)}"
                if run(actor, "CreateCryptoKey", ring, "create_crypto_key",
                       {"parent": ring, "crypto_key_id": key_id,
                        "crypto_key": {"purpose": ENCRYPT_DECRYPT}}) == "OK":
                    keys.append(f"{ring}/cryptoKeys/{key_id}")
                continue
            key = rng.choice(keys)
            version = f"{key}/cryptoKeyVersions/{rng.randint(1, 2)}"
            if choice == 1:
                run(actor, "CreateCryptoKeyVersion", key, "create_crypto_key_version",
                    {"parent": key, "crypto_key_version": {}})
            elif choice == 2:
                run(actor, "DestroyCryptoKeyVersion", version, "destroy_crypto_key_version",
                    {"name": version})
            elif choice == 3:
                run(actor, "RestoreCryptoKeyVersion", version, "restore_crypto_key_version",
                    {"name": version})
            elif choice == 4:
                run(actor, "SetIamPolicy", key, "set_iam_policy", {"resource": key, "policy": {
                    "bindings": [{"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter",
                                  "members": [APP]}]}})
            elif choice == 5:  # data access: only a denial is an individual record
                run(actor, "Encrypt", key, "encrypt", {"name": key, "plaintext": b"dek"})
            else:  # a read: only a denial is recorded
                run(actor, "GetCryptoKey", key, "get_crypto_key", {"name": key})

        got = records(central.data_dir)
        assert [(r["kind"], r["principal"], r["auth_method"], r["rpc"], r["resource"],
                 r["status"]) for r in got] == expected
        kinds = {(kind, status) for kind, *_, status in expected}
        assert {("DENIED", "PERMISSION_DENIED"), ("ADMIN_ACTIVITY", "OK")} <= kinds, kinds
        assert sum(unauthenticated.values()) > 5
        assert any(e[3] == "SetIamPolicy" and e[5] == "OK" for e in expected)
        # Separation of duties shows: the admin's Encrypts are denied and recorded.
        assert any(e[1] == ADMIN and e[3] == "Encrypt" and e[0] == "DENIED" for e in expected)
        denied = records(central.data_dir, "--result", "DENIED", "--principal", NOBODY)
        assert denied and all(r["status"] == "PERMISSION_DENIED" for r in denied)
        assert not any(t in json.dumps(got) for t in tokens.values())
    finally:
        assert central.stop() == 0
    # Shutdown wrote the counted refusals after the rest.
    after = records(central.data_dir)
    assert after[:len(got)] == got
    counted: dict[str, int] = {}
    for r in after[len(got):]:
        # An unauthenticated request is never read: no resource.
        assert (r["kind"], r["principal"], r["auth_method"], r["resource"], r["status"]) == (
            "DENIED", "", "none", "", "UNAUTHENTICATED")
        counted[r["rpc"]] = counted.get(r["rpc"], 0) + r["count"]
    assert counted == unauthenticated
    assert valv_audit(central.data_dir, "verify").returncode == 0
