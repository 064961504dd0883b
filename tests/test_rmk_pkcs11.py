"""The pkcs11 root key source, against a real SoftHSM2 token.

Keys are made with python-pkcs11 as non-extractable, sensitive AES-256 keys;
Valv only ever asks the token to compute with them (AES-GCM for KEK wrapping,
AES-CMAC for the subkey KDF and the id).
"""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest
from google.cloud import kms_v1

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
from valv.core import records
from valv.core.crypto import KeyUnwrapError, RootKeyConfigError
from valv.core.crypto.keysources import Pkcs11Config, RootKeyConfig, load_keyring
from valv.core.storage.keys import unpack
from valv.core.storage.sealed import Sealer, rmk_id_of

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


def token_config(hsm: SoftHsm, *labels: str) -> Pkcs11Config:
    return Pkcs11Config(module=hsm.module, token_label=hsm.token_label, key_labels=labels)


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
