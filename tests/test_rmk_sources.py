"""Root key sources: file, env (VALV_MASTER_KEY), and how misconfiguration fails.

In-process tests cover the selection rules of valv.core.crypto.keysources;
process tests show that a real ``valv central`` serves with an env key, and
that every misconfiguration exits 2 with one clear line and no traceback.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from google.cloud import kms_v1

from tests.helpers import CALL, CentralProcess
from tests.rmk_support import assert_config_error, run_valv, seal_ids, write_key_file
from valv.core.crypto import RootKey, RootKeyConfigError
from valv.core.crypto.keysources import RootKeyConfig, load_keyring

K1 = bytes(range(1, 33))
K2 = bytes(range(101, 133))
K3 = bytes(range(201, 233))
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def ids(*keys: bytes) -> list[str]:
    return [RootKey(k).key_id for k in keys]


def load(config: RootKeyConfig, environ: dict[str, str], tmp_path: Path,
         create_dev_key: bool = True) -> tuple[list[str], str]:
    loaded = load_keyring(config, data_dir=tmp_path / "data", environ=environ,
                          create_dev_key=create_dev_key)
    try:
        return list(loaded.keyring.ids), loaded.source
    finally:
        loaded.keyring.zeroize()


# -- selection rules (in process) ----------------------------------------------


def test_env_key(tmp_path: Path) -> None:
    assert load(RootKeyConfig(), {"VALV_MASTER_KEY": b64(K1)}, tmp_path) == (ids(K1), "env")
    assert not (tmp_path / "data").exists()  # no development key was made


def test_env_keys_oldest_first(tmp_path: Path) -> None:
    environ = {"VALV_MASTER_KEY": f" {b64(K1)} , {b64(K2)}\n"}
    assert load(RootKeyConfig(source="env"), environ, tmp_path) == (ids(K1, K2), "env")


def test_env_newest_with_older_key_files(tmp_path: Path) -> None:
    """Rotating from a key file to an env key: the file key is kept as an older key."""
    old = write_key_file(tmp_path / "old.key", K1)
    config = RootKeyConfig(source="env", files=(old,))
    assert load(config, {"VALV_MASTER_KEY": b64(K2)}, tmp_path) == (ids(K1, K2), "env")
    # And the other way round: the file source is the newest.
    config = RootKeyConfig(source="file", files=(old,))
    assert load(config, {"VALV_MASTER_KEY": b64(K2)}, tmp_path) == (ids(K2, K1), "file")


def test_file_source_unchanged(tmp_path: Path) -> None:
    files = (write_key_file(tmp_path / "a", K1), write_key_file(tmp_path / "b", K2))
    assert load(RootKeyConfig(files=files), {}, tmp_path) == (ids(K1, K2), "file")


def test_dev_key_only_when_nothing_is_configured(tmp_path: Path) -> None:
    got, source = load(RootKeyConfig(), {}, tmp_path)
    assert source == "dev" and len(got) == 1
    assert (tmp_path / "data" / "master.key").exists()
    # Tools that must not create one use the existing one.
    assert load(RootKeyConfig(), {}, tmp_path, create_dev_key=False) == (got, "dev")


@pytest.mark.parametrize(("config", "environ", "fragment"), [
    (RootKeyConfig(), {"VALV_MASTER_KEY": "not base64!"}, "VALV_MASTER_KEY is not valid base64"),
    (RootKeyConfig(), {"VALV_MASTER_KEY": b64(K1[:16])}, "decodes to 16 bytes"),
    (RootKeyConfig(), {"VALV_MASTER_KEY": b64(bytes(32))}, "all-zero"),
    (RootKeyConfig(), {"VALV_MASTER_KEY": ""}, "VALV_MASTER_KEY is set but empty"),
    (RootKeyConfig(), {"VALV_MASTER_KEY": f"{b64(K1)},xx"}, "(key 2 of 2) is not valid base64"),
    (RootKeyConfig(), {"VALV_MASTER_KEY": f"{b64(K1)},{b64(K1)}"}, "more than once"),
    (RootKeyConfig(source="env"), {}, "VALV_MASTER_KEY is not set"),
    (RootKeyConfig(source="file"), {}, "no key file is configured"),
    (RootKeyConfig(source="vault"), {}, "unknown root key source 'vault'"),
    (RootKeyConfig(files=(Path("/nonexistent/k"),)), {"VALV_MASTER_KEY": b64(K1)},
     "several sources (file, env)"),
])
def test_misconfigured(tmp_path: Path, config: RootKeyConfig, environ: dict[str, str],
                       fragment: str) -> None:
    with pytest.raises(RootKeyConfigError) as info:
        load(config, environ, tmp_path)
    assert fragment in str(info.value)
    for secret in (b64(K1), b64(K1[:16])):
        assert secret not in str(info.value)
    assert not (tmp_path / "data").exists()  # never a development key instead


# -- real processes -------------------------------------------------------------


def test_central_serves_with_env_key(tmp_path: Path, project: str) -> None:
    key = os.urandom(32)
    central = CentralProcess(tmp_path / "c", env={"VALV_MASTER_KEY": b64(key)}).start()
    try:
        kms = central.client()
        ring = kms.create_key_ring(request={"parent": f"projects/{project}/locations/global",
                                            "key_ring_id": "r", "key_ring": {}}, **CALL).name
        name = kms.create_crypto_key(request={"parent": ring, "crypto_key_id": "k",
                                              "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                     **CALL).name
        ct = kms.encrypt(request={"name": name, "plaintext": b"env"}, **CALL).ciphertext
        central.restart()
        plain = central.client().decrypt(request={"name": name, "ciphertext": ct}, **CALL)
        assert plain.plaintext == b"env"
    finally:
        central.stop()
    assert not (tmp_path / "c" / "master.key").exists()
    assert seal_ids(tmp_path / "c" / "valv.db").keys() == {RootKey(key).key_id}
    assert b64(key) not in central.logs()


@pytest.mark.parametrize(("args", "env", "fragment"), [
    ((), {"VALV_MASTER_KEY": "%%%"}, "VALV_MASTER_KEY is not valid base64"),
    ((), {"VALV_MASTER_KEY": b64(b"short")}, "decodes to 5 bytes"),
    (("--master-key-source", "env"), {}, "VALV_MASTER_KEY is not set"),
    (("--master-key-source", "hsm"), {}, "unknown root key source 'hsm'"),
    (("--master-key-file", "/nonexistent/rmk"), {"VALV_MASTER_KEY": b64(K1)},
     "several sources"),
    (("--master-key-source", "pkcs11"), {}, "needs --pkcs11-module"),
    (("--pkcs11-module", "/nonexistent/libp11.so", "--pkcs11-token-label", "t",
      "--pkcs11-key-label", "k"), {"VALV_PKCS11_PIN": "1234"},
     "PKCS#11 module /nonexistent/libp11.so does not exist"),
])
def test_central_refuses_to_start(tmp_path: Path, args: tuple[str, ...], env: dict[str, str],
                                  fragment: str) -> None:
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      *args, env=env, timeout=60)
    line = assert_config_error(result, "valv central: error:", fragment)
    assert b64(K1) not in line
    assert not (tmp_path / "d" / "master.key").exists()


def test_fsck_and_rotate_refuse_a_bad_source_too(tmp_path: Path) -> None:
    for command in (("fsck",), ("rmk", "rotate"), ("rmk", "status")):
        result = run_valv(*command, "--data-dir", str(tmp_path), env={"VALV_MASTER_KEY": "x"})
        assert_config_error(result, "VALV_MASTER_KEY is not valid base64")
