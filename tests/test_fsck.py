"""`valv fsck`: the store's invariants, checked from the command line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import fdb.tuple

from tests.helpers import CALL, CentralProcess


def fsck(central: CentralProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "valv", "fsck", "--data-dir", str(central.data_dir)],
        capture_output=True, text=True, timeout=60)


def test_fsck_passes_a_healthy_store_and_names_what_is_broken(
        fresh_central: CentralProcess, project: str) -> None:
    kms = fresh_central.client()
    ring = kms.create_key_ring(request={"parent": f"projects/{project}/locations/global",
                                        "key_ring_id": "r", "key_ring": {}}, **CALL)
    kms.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                   "crypto_key": {"purpose": "ENCRYPT_DECRYPT"}}, **CALL)
    healthy = fsck(fresh_central)  # safe while central serves
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout == ""

    fresh_central.stop()
    material = fdb.tuple.pack(("km", project, "global", "r", "k", 1))
    with closing(sqlite3.connect(fresh_central.data_dir / "valv.db")) as db, db:
        assert db.execute("DELETE FROM kv WHERE k = ?", (material,)).rowcount == 1
    broken = fsck(fresh_central)
    assert broken.returncode == 1
    problems = [json.loads(line) for line in broken.stdout.splitlines()]
    assert problems == [{"record": f"('cv', '{project}', 'global', 'r', 'k', 1)",
                         "problem": "ENABLED version without key material"}]


def test_fsck_refuses_a_store_without_its_root_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "fsck", "--data-dir", str(tmp_path / "nothing")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "master.key" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_data_dir_with_url_characters_keeps_key_and_store_together(tmp_path: Path) -> None:
    data = tmp_path / "odd%41#dir?x"
    central = CentralProcess(data).start()
    try:
        kms = central.client()
        kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                     "key_ring_id": "r", "key_ring": {}}, **CALL)
    finally:
        central.stop()
    assert (data / "valv.db").exists() and (data / "master.key").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd%41#dir?x"]
