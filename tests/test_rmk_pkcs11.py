"""The pkcs11 root key source, against a real SoftHSM2 token.

Keys are made with python-pkcs11 as non-extractable, sensitive AES-256 keys;
Valv only ever asks the token to compute with them (AES-GCM for KEK wrapping,
AES-CMAC for the subkey KDF and the id). A key created from known bytes
(C_CreateObject) is refused unless --pkcs11-allow-imported-key; a failing
token is UNAVAILABLE, a bad GCM tag DATA_LOSS.
"""

from __future__ import annotations

import base64
import os
import struct
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud import kms_v1
from grpclib.const import Status

from tests.helpers import CALL, CentralProcess
from tests.rmk_support import (
    SoftHsm,
    assert_config_error,
    run_valv,
    seal_ids,
    sealed_values,
    softhsm,
    write_key_file,
)
from valv.central.errors import to_grpc_error
from valv.core import records
from valv.core.clock import FakeClock
from valv.core.crypto import KeyUnwrapError, RootKeyConfigError
from valv.core.crypto.errors import RootKeyUnavailableError
from valv.core.crypto.keysources import Pkcs11Config, RootKeyConfig, load_keyring
from valv.core.errors import DataLoss
from valv.core.keystore import KeyStore, KeystoreSettings, NewCryptoKey
from valv.core.storage.keys import unpack
from valv.core.storage.sealed import SealedStore, Sealer, rmk_id_of
from valv.core.storage.sqlite import SqliteStore

ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
VERSION = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
ALG = "GOOGLE_SYMMETRIC_ENCRYPTION"


@pytest.fixture
def hsm() -> SoftHsm:
    return softhsm()


def new_label(hsm: SoftHsm, **kwargs: bool) -> str:
    label = f"rmk-{uuid.uuid4().hex[:8]}"
    hsm.create_key(label, **kwargs)
    return label


def token_config(hsm: SoftHsm, *labels: str, allow_imported_key: bool = False
                 ) -> Pkcs11Config:
    return Pkcs11Config(module=hsm.module, token_label=hsm.token_label, key_labels=labels,
                        allow_imported_key=allow_imported_key)


def import_key(hsm: SoftHsm, material: bytes) -> str:
    """An AES-256 key created with C_CreateObject from known bytes: sensitive and
    non-extractable from now on, but its value existed outside the token."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    label = f"imported-{uuid.uuid4().hex[:8]}"
    with hsm._session() as session:
        session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: material, Attribute.LABEL: label, Attribute.TOKEN: True,
            Attribute.PRIVATE: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
            Attribute.ENCRYPT: True, Attribute.DECRYPT: True, Attribute.SIGN: True})
    return label


def expected_id(hsm: SoftHsm, label: str) -> str:
    """docs/crypto.md: SP 800-108 counter-mode KDF, PRF AES-CMAC, label valv/rmk-id/v1."""
    block = struct.pack(">I", 1) + b"valv/rmk-id/v1" + b"\x00" + b"valv" + struct.pack(">I", 64)
    return hsm.cmac(label, block)[:8].hex()


def test_token_keyring_wraps_in_the_token(hsm: SoftHsm, tmp_path: Path) -> None:
    a, b = new_label(hsm), new_label(hsm)
    attributes = hsm.key_attributes(a)
    assert attributes == {"extractable": False, "sensitive": True, "never_extractable": True,
                          "value_readable": False}
    loaded = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, a, b)), data_dir=tmp_path,
                          environ={"VALV_PKCS11_PIN": hsm.pin})
    ring = loaded.keyring
    try:
        assert loaded.source == "pkcs11"
        assert ring.ids == (expected_id(hsm, a), expected_id(hsm, b))
        assert [e["kind"] for e in ring.describe()] == ["pkcs11", "pkcs11"]
        kek = bytes(range(7, 39))
        rmk_id, blob = ring.wrap_kek(kek, version_name=VERSION, algorithm=ALG)
        assert rmk_id == ring.newest_id and len(blob) == 12 + 32 + 16
        with ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG) as got:
            assert bytes(got) == kek
        # The AAD binding holds inside the token as in software.
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, blob, version_name=VERSION[:-1] + "2", algorithm=ALG)
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm="OTHER")
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(ring.ids[0], blob, version_name=VERSION, algorithm=ALG)
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, tampered, version_name=VERSION, algorithm=ALG)
        # Host-side subkeys are deterministic (every central agrees) and per key.
        sealed = Sealer(ring).seal(b"k", b"value")
        assert rmk_id_of(sealed) == ring.newest_id
        again = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, b)), data_dir=tmp_path,
                             environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
        try:
            assert Sealer(again).open(b"k", sealed) == b"value"
            assert bytes(again.page_token_key()) == bytes(ring.page_token_key())
            oldest = ring.seal_key_for(ring.ids[0])
            assert bytes(again.seal_key_for(again.newest_id)) != bytes(oldest)
        finally:
            again.zeroize()
    finally:
        ring.zeroize()
    # The software and token kinds mix in one keyring (migrating into the HSM).
    old = write_key_file(tmp_path / "old.key")
    mixed = load_keyring(RootKeyConfig(source="pkcs11", files=(old,),
                                       pkcs11=token_config(hsm, a)),
                         data_dir=tmp_path, environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
    try:
        assert [e["kind"] for e in mixed.describe()] == ["software", "pkcs11"]
        assert mixed.newest_id == expected_id(hsm, a)
    finally:
        mixed.zeroize()


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"extractable": True}, "can leave the token"),
    ({"sensitive": False}, "can leave the token"),
    ({"sign": False}, "does not allow SIGN"),
    ({"bits": 128}, "must be an AES-256 key"),
])
def test_unsuitable_token_keys_are_refused(hsm: SoftHsm, tmp_path: Path,
                                           kwargs: dict[str, bool], fragment: str) -> None:
    label = new_label(hsm, **kwargs)
    with pytest.raises(RootKeyConfigError, match=fragment):
        load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label)), data_dir=tmp_path,
                     environ={"VALV_PKCS11_PIN": hsm.pin})


def test_central_with_token_key(hsm: SoftHsm, tmp_path: Path, project: str) -> None:
    label = new_label(hsm)
    assert hsm.key_attributes(label)["extractable"] is False
    central = CentralProcess(tmp_path / "c", env=hsm.env(label)).start()
    try:
        kms = central.client()
        ring = kms.create_key_ring(request={"parent": f"projects/{project}/locations/global",
                                            "key_ring_id": "r", "key_ring": {}}, **CALL).name
        name = kms.create_crypto_key(request={"parent": ring, "crypto_key_id": "k",
                                              "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                     **CALL).name
        ct = kms.encrypt(request={"name": name, "plaintext": b"in the token"},
                         **CALL).ciphertext
        central.restart()
        kms = central.client()
        assert kms.decrypt(request={"name": name, "ciphertext": ct},
                           **CALL).plaintext == b"in the token"
    finally:
        central.stop()
    rmk_id = expected_id(hsm, label)
    assert rmk_id in central.logs()
    assert hsm.pin not in central.logs()
    assert not (tmp_path / "c" / "master.key").exists()  # no development key
    assert seal_ids(tmp_path / "c" / "valv.db").keys() == {rmk_id}
    # The key material record names the token key too.
    ring = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label)), data_dir=tmp_path,
                        environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
    try:
        sealer = Sealer(ring)
        materials = [records.decode_material(k, sealer.open(k, v))[0]
                     for k, v in sealed_values(tmp_path / "c" / "valv.db")
                     if unpack(k)[0] == "km"]
        assert materials == [rmk_id]
    finally:
        ring.zeroize()


def test_keygen_command_then_central(hsm: SoftHsm, tmp_path: Path) -> None:
    label = f"rmk-{uuid.uuid4().hex[:8]}"
    env = hsm.env(label)
    result = run_valv("rmk", "pkcs11-keygen", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert expected_id(hsm, label) in result.stdout
    assert hsm.key_attributes(label)["value_readable"] is False
    again = run_valv("rmk", "pkcs11-keygen", "--data-dir", str(tmp_path), env=env)
    assert_config_error(again, "already has a key labelled")
    central = CentralProcess(tmp_path / "c", env=env).start()
    central.stop()


@pytest.mark.parametrize("case", ["module", "token", "key", "pin", "no-pin", "pin-and-file",
                                  "extractable"])
def test_central_refuses_a_misconfigured_token(hsm: SoftHsm, tmp_path: Path,
                                               case: str) -> None:
    label = new_label(hsm, extractable=case == "extractable")
    env = hsm.env(label)
    fragment = {"module": "does not exist", "token": "no token labelled 'nope'",
                "key": "no secret key labelled 'missing'", "pin": "wrong PIN",
                "no-pin": "PIN is not configured", "pin-and-file": "give the token PIN one way",
                "extractable": "can leave the token"}[case]
    if case == "module":
        env["VALV_PKCS11_MODULE"] = str(tmp_path / "libnothing.so")
    elif case == "token":
        env["VALV_PKCS11_TOKEN_LABEL"] = "nope"
    elif case == "key":
        env["VALV_PKCS11_KEY_LABEL"] = "missing"
    elif case == "pin":
        env["VALV_PKCS11_PIN"] = "0000-wrong"
    elif case == "no-pin":
        del env["VALV_PKCS11_PIN"]
    elif case == "pin-and-file":
        pin_file = tmp_path / "pin"
        pin_file.write_text(hsm.pin)
        pin_file.chmod(0o600)
        env["VALV_PKCS11_PIN_FILE"] = str(pin_file)
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      env=env, timeout=60)
    line = assert_config_error(result, "valv central: error:", fragment)
    assert hsm.pin not in line and "0000-wrong" not in line
    assert not (tmp_path / "d" / "master.key").exists()


def test_pin_file(hsm: SoftHsm, tmp_path: Path) -> None:
    label = new_label(hsm)
    pin_file = tmp_path / "pin"
    pin_file.write_text(hsm.pin + "\n")
    pin_file.chmod(0o644)
    env = {**hsm.env(label), "VALV_PKCS11_PIN_FILE": str(pin_file)}
    del env["VALV_PKCS11_PIN"]
    result = run_valv("rmk", "status", "--data-dir", str(tmp_path), env=env)
    assert_config_error(result, "has mode 0644")
    pin_file.chmod(0o600)
    result = run_valv("rmk", "status", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 0, result.stderr
    assert expected_id(hsm, label) in result.stdout


# -- keys that were not generated in the token -----------------------------------


def test_a_key_imported_in_clear_is_refused_unless_allowed(
        hsm: SoftHsm, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    material = os.urandom(32)
    label = import_key(hsm, material)
    attributes = hsm.key_attributes(label)
    # It passes the old check: sensitive, not extractable, its value unreadable.
    assert attributes["sensitive"] and not attributes["extractable"]
    assert not attributes["value_readable"]
    with pytest.raises(RootKeyConfigError) as info:
        load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label)), data_dir=tmp_path,
                     environ={"VALV_PKCS11_PIN": hsm.pin})
    message = str(info.value)
    for fragment in ("was not generated in the token", "CKA_LOCAL", "CKA_ALWAYS_SENSITIVE",
                     "CKA_NEVER_EXTRACTABLE", "--pkcs11-allow-imported-key"):
        assert fragment in message, message
    assert base64.b64encode(material).decode() not in message
    ring = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label, allow_imported_key=True)),
                        data_dir=tmp_path, environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
    try:
        rmk_id, blob = ring.wrap_kek(bytes(range(1, 33)), version_name=VERSION, algorithm=ALG)
        with ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG) as kek:
            assert bytes(kek) == bytes(range(1, 33))
    finally:
        ring.zeroize()
    warnings = [r for r in caplog.records if "pkcs11-allow-imported-key" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    # A key generated in the token needs no override and logs no warning.
    caplog.clear()
    load_keyring(RootKeyConfig(pkcs11=token_config(hsm, new_label(hsm), allow_imported_key=True)),
                 data_dir=tmp_path, environ={"VALV_PKCS11_PIN": hsm.pin}).keyring.zeroize()
    assert "pkcs11-allow-imported-key" not in caplog.text


def test_a_key_made_extractable_is_refused_even_when_imports_are_allowed(
        hsm: SoftHsm, tmp_path: Path) -> None:
    label = new_label(hsm, extractable=True)
    with pytest.raises(RootKeyConfigError, match="can leave the token"):
        load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label, allow_imported_key=True)),
                     data_dir=tmp_path, environ={"VALV_PKCS11_PIN": hsm.pin})


def test_central_and_tools_refuse_an_imported_key_unless_allowed(hsm: SoftHsm,
                                                                 tmp_path: Path) -> None:
    label = import_key(hsm, os.urandom(32))
    env = hsm.env(label)
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      env=env, timeout=60)
    assert_config_error(result, "valv central: error:", "was not generated in the token",
                        "--pkcs11-allow-imported-key")
    assert_config_error(run_valv("rmk", "status", "--data-dir", str(tmp_path), env=env),
                        "was not generated in the token")
    result = run_valv("rmk", "status", "--data-dir", str(tmp_path),
                      "--pkcs11-allow-imported-key", env=env)
    assert result.returncode == 0, result.stderr
    assert_config_error(run_valv("rmk", "status", "--data-dir", str(tmp_path),
                                 env={**env, "VALV_PKCS11_ALLOW_IMPORTED_KEY": "maybe"}),
                        "VALV_PKCS11_ALLOW_IMPORTED_KEY")
    central = CentralProcess(tmp_path / "c", env={**env, "VALV_PKCS11_ALLOW_IMPORTED_KEY": "1"}
                             ).start()
    try:
        kms = central.client()
        kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                     "key_ring_id": "r", "key_ring": {}}, **CALL)
    finally:
        central.stop()
    assert "pkcs11-allow-imported-key" in central.logs()
    assert hsm.pin not in central.logs()


# -- a failing token is UNAVAILABLE, a bad tag is tampering -----------------------


class FailingKey:
    """A token key whose operations fail as a broken token's would."""

    def __init__(self, key: Any, error: type[Exception], *, failures: int | None = None,
                 operations: tuple[str, ...] = ("encrypt", "decrypt", "sign")) -> None:
        self._key = key
        self._error = error
        self._failures = failures  # None: every call fails
        self._operations = operations

    def __getitem__(self, attribute: Any) -> Any:
        return self._key[attribute]

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name in self._operations and self._failures != 0:
            if self._failures is not None:
                self._failures -= 1
            raise self._error()
        return getattr(self._key, name)(*args, **kwargs)

    def encrypt(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("encrypt", *args, **kwargs)

    def decrypt(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("decrypt", *args, **kwargs)

    def sign(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("sign", *args, **kwargs)


def break_token(monkeypatch: pytest.MonkeyPatch, error: type[Exception], **kwargs: Any) -> None:
    from valv.core.crypto import pkcs11 as token_module

    find = token_module._TokenConnection._find
    state: dict[str, FailingKey] = {}

    def failing_find(conn: Any, label: str) -> Any:
        key = find(conn, label)
        if label not in state or state[label]._key is not key:
            state[label] = FailingKey(key, error, **kwargs)
        return state[label]

    monkeypatch.setattr(token_module._TokenConnection, "_find", failing_find)


@pytest.mark.parametrize("error", ["GeneralError", "FunctionFailed", "DeviceError",
                                   "DeviceMemory", "HostMemory"])
def test_token_failures_are_unavailable_not_tampering(hsm: SoftHsm, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      error: str) -> None:
    from pkcs11 import exceptions as p11

    label = new_label(hsm)
    ring = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, label)), data_dir=tmp_path,
                        environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
    try:
        rmk_id, blob = ring.wrap_kek(bytes(range(1, 33)), version_name=VERSION, algorithm=ALG)
        with monkeypatch.context() as patch:
            break_token(patch, getattr(p11, error))
            with pytest.raises(RootKeyUnavailableError, match=f"failed during KEK unwrapping: "
                                                              f"{error}"):
                ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG)
            with pytest.raises(RootKeyUnavailableError, match="KEK wrapping"):
                ring.wrap_kek(bytes(range(1, 33)), version_name=VERSION, algorithm=ALG)
        # The token is back: the same blob unwraps (it was never bad).
        with ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG) as kek:
            assert bytes(kek) == bytes(range(1, 33))
        # An ambiguous code from a token that otherwise works: the data was bad.
        if error in ("GeneralError", "FunctionFailed"):
            with monkeypatch.context() as patch:
                break_token(patch, getattr(p11, error), failures=1, operations=("decrypt",))
                with pytest.raises(KeyUnwrapError):
                    ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG)
        # A real bad tag (SoftHSM2 says CKR_GENERAL_ERROR) is still tampering.
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, blob[:-1] + bytes([blob[-1] ^ 1]), version_name=VERSION,
                            algorithm=ALG)
    finally:
        ring.zeroize()


async def test_central_reports_a_failing_token_as_unavailable(
        hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pkcs11 import exceptions as p11

    ring = load_keyring(RootKeyConfig(pkcs11=token_config(hsm, new_label(hsm))),
                        data_dir=tmp_path, environ={"VALV_PKCS11_PIN": hsm.pin}).keyring
    store = SealedStore(SqliteStore(str(tmp_path / "valv.db")), Sealer(ring))
    try:
        keystore = KeyStore(store, ring, FakeClock(),
                            KeystoreSettings(use_cache_ttl=timedelta(0)))
        await keystore.create_key_ring("projects/p/locations/global", "r")
        key = await keystore.create_crypto_key("projects/p/locations/global/keyRings/r", "k",
                                               NewCryptoKey(purpose=ENCRYPT_DECRYPT))
        ct = (await keystore.encrypt(str(key.name), b"secret", b"")).ciphertext
        with monkeypatch.context() as patch:
            break_token(patch, p11.DeviceError)
            with pytest.raises(RootKeyUnavailableError) as info:
                await keystore.decrypt(str(key.name), ct, b"")
        error = to_grpc_error(info.value, "Decrypt")
        assert error.status is Status.UNAVAILABLE
        assert "retry" in str(error.message)
        assert hsm.module not in str(error.message)  # details go to the log only
        # Tampered key material is still DATA_LOSS.
        with monkeypatch.context() as patch:
            break_token(patch, p11.EncryptedDataInvalid, operations=("decrypt",))
            with pytest.raises(DataLoss, match="modified or moved at the storage level") as lost:
                await keystore.decrypt(str(key.name), ct, b"")
        assert to_grpc_error(lost.value, "Decrypt").status is Status.DATA_LOSS
        assert (await keystore.decrypt(str(key.name), ct, b"")).plaintext == b"secret"
    finally:
        await store.close()
        ring.zeroize()


# -- the PIN ------------------------------------------------------------------------


def test_pin_is_removed_from_the_environment_once_read(hsm: SoftHsm, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    label = new_label(hsm)
    for name, value in hsm.env(label).items():
        monkeypatch.setenv(name, value)
    config = RootKeyConfig(pkcs11=token_config(hsm, label))
    ring = load_keyring(config, data_dir=tmp_path).keyring  # reads os.environ
    try:
        assert "VALV_PKCS11_PIN" not in os.environ
        assert ring.newest_id == expected_id(hsm, label)
        # A second load in this process has no PIN left, and says why.
        with pytest.raises(RootKeyConfigError, match="removed from this process's environment"):
            load_keyring(config, data_dir=tmp_path)
    finally:
        ring.zeroize()
    # A mapping given explicitly is left alone.
    environ = {"VALV_PKCS11_PIN": hsm.pin}
    load_keyring(config, data_dir=tmp_path, environ=environ).keyring.zeroize()
    assert environ == {"VALV_PKCS11_PIN": hsm.pin}


def test_a_child_process_does_not_inherit_the_pin(hsm: SoftHsm, tmp_path: Path) -> None:
    """Once read, the PIN is gone from the environment child processes get."""
    label = new_label(hsm)
    script = (
        "import os, sys\n"
        "from valv.core.crypto.keysources import RootKeyConfig, Pkcs11Config, load_keyring\n"
        "config = RootKeyConfig(pkcs11=Pkcs11Config(os.environ['VALV_PKCS11_MODULE'], "
        "os.environ['VALV_PKCS11_TOKEN_LABEL'], (os.environ['VALV_PKCS11_KEY_LABEL'],)))\n"
        "load_keyring(config, data_dir=__import__('pathlib').Path(sys.argv[1])).keyring."
        "zeroize()\n"
        "import subprocess\n"
        "child = subprocess.run([sys.executable, '-c', "
        "'import os; print(os.environ.get(\"VALV_PKCS11_PIN\", \"absent\"))'], "
        "capture_output=True, text=True, check=True)\n"
        "print(child.stdout.strip())\n")
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("VALV_")}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                            text=True, env={**base, **hsm.env(label)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "absent"
