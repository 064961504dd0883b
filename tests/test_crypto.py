"""SecretBytes, KEKs, root keys, the root keyring and key files."""

from __future__ import annotations

import base64
import os
import pickle
import stat
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from valv.core.crypto import (
    CryptoError,
    KeyUnwrapError,
    RootKey,
    RootKeyConfigError,
    RootKeyring,
    SecretBytes,
    UnknownRootKeyError,
    create_dev_root_key_file,
    generate_kek,
    load_or_create_dev_root_key,
    load_root_key_file,
)

K1 = bytes(range(1, 33))
K2 = bytes(range(101, 133))
K3 = bytes(range(201, 233))
VERSION = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
OTHER_VERSION = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/2"
ALG = "GOOGLE_SYMMETRIC_ENCRYPTION"
KEK = bytes(range(50, 82))


def _hkdf(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, None, info).derive(key)


def _renderings(secret: bytes) -> list[str]:
    return [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode(),
        repr(secret),
        repr(secret)[2:-1],  # the escaped body of the bytes literal
    ]


def _assert_hidden(text: str, *secrets: bytes) -> None:
    for secret in secrets:
        for rendering in _renderings(secret):
            assert rendering not in text


# -- SecretBytes --------------------------------------------------------------


def test_secretbytes_repr_is_redacted():
    s = SecretBytes(K1)
    percent = "%s" % (s,)  # noqa: UP031
    for text in (repr(s), str(s), f"{s}", f"{s!r:>5}", percent, repr([s])):
        assert "32 bytes redacted" in text
        _assert_hidden(text, K1)


def test_secretbytes_access_and_zeroize():
    buf = bytearray(K1)
    s = SecretBytes(buf)
    buf[:] = bytes(32)  # the holder owns its own copy
    assert bytes(s) == K1
    assert len(s) == 32
    view = s.view()
    assert view.readonly and bytes(view) == K1
    s.zeroize()
    assert s.zeroized
    assert bytes(view) == bytes(32)  # wiped in place, visible through the view
    assert s._buf == bytearray(32)
    with pytest.raises(ValueError, match="zeroized"):
        bytes(s)
    with pytest.raises(ValueError, match="zeroized"):
        s.view()
    assert repr(s) == "SecretBytes(<zeroized>)"
    s.zeroize()  # idempotent


def test_secretbytes_context_manager():
    with SecretBytes(K1) as s:
        assert bytes(s) == K1
    assert s.zeroized
    with pytest.raises(RuntimeError), SecretBytes(K2) as t:
        raise RuntimeError("boom")
    assert t.zeroized


def test_secretbytes_equality_hash_pickle():
    a, b = SecretBytes(K1), SecretBytes(K1)
    assert a == b
    assert a == K1 and a == bytearray(K1)
    assert a != SecretBytes(K2)
    assert a != "not bytes"
    with pytest.raises(TypeError):
        hash(a)
    with pytest.raises(TypeError):
        {a}  # noqa: B018
    with pytest.raises(TypeError):
        pickle.dumps(a)
    with pytest.raises(TypeError):
        SecretBytes("text")  # type: ignore[arg-type]


def test_generate_kek():
    a, b = generate_kek(), generate_kek()
    assert isinstance(a, SecretBytes) and len(a) == 32
    assert a != b


# -- RootKey ------------------------------------------------------------------


def test_root_key_id_is_hkdf_fingerprint():
    key = RootKey(K1)
    assert key.key_id == _hkdf(K1, b"valv/rmk-id/v1", 8).hex()
    assert len(key.key_id) == 16
    assert RootKey(K2).key_id != key.key_id
    assert RootKey(SecretBytes(K1)).key_id == key.key_id
    assert repr(key) == f"RootKey(id={key.key_id})"
    _assert_hidden(repr(key) + str(key), K1)
    with pytest.raises(TypeError):
        pickle.dumps(key)


def test_root_key_rejects_bad_material():
    for bad in (b"", K1[:31], K1 + b"\x00"):
        with pytest.raises(RootKeyConfigError, match="exactly 32 bytes"):
            RootKey(bad)
    with pytest.raises(RootKeyConfigError, match="all-zero"):
        RootKey(bytes(32))


def test_root_key_does_not_alias_caller_buffer():
    material = SecretBytes(K1)
    key = RootKey(material)
    material.zeroize()
    assert RootKeyring([key]).newest_id == RootKey(K1).key_id


def test_root_key_generate():
    assert RootKey.generate().key_id != RootKey.generate().key_id


# -- RootKeyring --------------------------------------------------------------


def _ring(*keys: bytes) -> RootKeyring:
    return RootKeyring([RootKey(k) for k in keys])


def test_wrap_unwrap_round_trip_and_blob_layout():
    ring = _ring(K1)
    rmk_id, blob = ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    assert rmk_id == RootKey(K1).key_id
    assert len(blob) == 12 + 32 + 16
    with ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm=ALG) as kek:
        assert isinstance(kek, SecretBytes)
        assert kek == KEK
    # Independent check of the documented wrap construction.
    wrap_key = _hkdf(K1, b"valv/kek-wrap/v1")
    aad = b"".join(
        struct.pack(">I", len(x)) + x for x in (VERSION.encode(), ALG.encode(), rmk_id.encode())
    )
    assert AESGCM(wrap_key).decrypt(blob[:12], blob[12:], aad) == KEK
    # Random nonces: wrapping twice gives different blobs.
    assert ring.wrap_kek(SecretBytes(KEK), version_name=VERSION, algorithm=ALG)[1] != blob


def test_wrap_is_bound_to_version_algorithm_and_rmk_id():
    ring = _ring(K1, K2)
    rmk_id, blob = ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    with pytest.raises(KeyUnwrapError) as info:
        ring.unwrap_kek(rmk_id, blob, version_name=OTHER_VERSION, algorithm=ALG)
    assert OTHER_VERSION in str(info.value)
    _assert_hidden(str(info.value), KEK, K1, K2)
    with pytest.raises(KeyUnwrapError):
        ring.unwrap_kek(rmk_id, blob, version_name=VERSION, algorithm="AES_256_GCM")
    # Same bytes presented as wrapped under the other configured RMK.
    other_id = RootKey(K1).key_id
    assert other_id != rmk_id
    with pytest.raises(KeyUnwrapError):
        ring.unwrap_kek(other_id, blob, version_name=VERSION, algorithm=ALG)


def test_tampered_or_short_blob_fails():
    ring = _ring(K1)
    rmk_id, blob = ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x80
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, bytes(bad), version_name=VERSION, algorithm=ALG)
    for n in range(len(blob)):
        with pytest.raises(KeyUnwrapError):
            ring.unwrap_kek(rmk_id, blob[:n], version_name=VERSION, algorithm=ALG)
    with pytest.raises(KeyUnwrapError):
        ring.unwrap_kek(rmk_id, blob + b"\x00", version_name=VERSION, algorithm=ALG)


def test_newest_wraps_old_still_unwraps():
    old_ring = _ring(K1)
    old_id, old_blob = old_ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)

    ring = _ring(K1, K2)
    assert ring.ids == (RootKey(K1).key_id, RootKey(K2).key_id)
    assert ring.newest_id == RootKey(K2).key_id
    new_id, new_blob = ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    assert new_id == ring.newest_id != old_id
    assert ring.unwrap_kek(old_id, old_blob, version_name=VERSION, algorithm=ALG) == KEK
    assert ring.unwrap_kek(new_id, new_blob, version_name=VERSION, algorithm=ALG) == KEK
    assert ring.needs_rewrap(old_id) and not ring.needs_rewrap(new_id)
    re_id, re_blob = ring.rewrap_kek(old_id, old_blob, version_name=VERSION, algorithm=ALG)
    assert re_id == new_id
    assert _ring(K2).unwrap_kek(re_id, re_blob, version_name=VERSION, algorithm=ALG) == KEK


def test_unknown_rmk_id():
    ring = _ring(K1, K2)
    _, blob = _ring(K3).wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    unknown = RootKey(K3).key_id
    with pytest.raises(UnknownRootKeyError) as info:
        ring.unwrap_kek(unknown, blob, version_name=VERSION, algorithm=ALG)
    msg = str(info.value)
    assert unknown in msg
    for configured in ring.ids:
        assert configured in msg
    _assert_hidden(msg, K1, K2, K3, KEK)
    assert unknown not in ring and ring.newest_id in ring
    with pytest.raises(UnknownRootKeyError):
        ring.seal_key_for(unknown)


def test_keyring_config_errors():
    with pytest.raises(RootKeyConfigError):
        RootKeyring([])
    with pytest.raises(RootKeyConfigError, match="more than once"):
        RootKeyring([RootKey(K1), RootKey(K1)])
    with pytest.raises(ValueError):
        _ring(K1).wrap_kek(b"", version_name=VERSION, algorithm=ALG)
    with pytest.raises(ValueError):
        _ring(K1).wrap_kek(KEK, version_name="", algorithm=ALG)


def test_seal_and_page_token_keys():
    ring = _ring(K1, K2)
    id1, id2 = ring.ids
    seal1 = ring.seal_key_for(id1)
    assert seal1 == _hkdf(K1, b"valv/storage-seal/v1")
    newest_id, newest_seal = ring.newest_seal_key()
    assert newest_id == id2
    assert newest_seal == _hkdf(K2, b"valv/storage-seal/v1")
    assert ring.page_token_key() == _hkdf(K2, b"valv/page-token/v1")
    # Subkeys are distinct from each other and from the root keys.
    wrap2 = _hkdf(K2, b"valv/kek-wrap/v1")
    assert len({bytes(newest_seal), bytes(ring.page_token_key()), wrap2, K2}) == 4
    # Returned keys are copies: zeroizing one doesn't harm the keyring.
    newest_seal.zeroize()
    assert ring.newest_seal_key()[1] == _hkdf(K2, b"valv/storage-seal/v1")


def test_keyring_repr_and_zeroize():
    ring = _ring(K1, K2)
    text = repr(ring) + str(ring)
    assert RootKey(K1).key_id in text and RootKey(K2).key_id in text
    derived = [
        _hkdf(k, info)
        for k in (K1, K2)
        for info in (b"valv/kek-wrap/v1", b"valv/storage-seal/v1", b"valv/page-token/v1")
    ]
    _assert_hidden(text, K1, K2, *derived)
    with pytest.raises(TypeError):
        pickle.dumps(ring)
    _, blob = ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    ring.zeroize()
    for entry in ring._entries:
        assert entry.cipher._key.zeroized and entry.seal_key.zeroized
    assert ring._page_token_key.zeroized
    with pytest.raises(CryptoError, match="zeroized"):
        ring.unwrap_kek(ring.newest_id, blob, version_name=VERSION, algorithm=ALG)
    with pytest.raises(CryptoError, match="zeroized"):
        ring.wrap_kek(KEK, version_name=VERSION, algorithm=ALG)
    with pytest.raises(CryptoError, match="zeroized"):
        ring.page_token_key()


# -- key files ----------------------------------------------------------------


def _write(path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)


def test_load_base64_and_raw(tmp_path):
    b64 = tmp_path / "b64.key"
    _write(b64, base64.b64encode(K1) + b"\n")
    assert load_root_key_file(b64).key_id == RootKey(K1).key_id
    raw = tmp_path / "raw.key"
    _write(raw, K2)
    assert load_root_key_file(str(raw)).key_id == RootKey(K2).key_id
    # A raw key that happens to end with a newline byte is still raw.
    nl = K3[:31] + b"\n"
    raw_nl = tmp_path / "raw_nl.key"
    _write(raw_nl, nl)
    assert load_root_key_file(raw_nl).key_id == RootKey(nl).key_id


@pytest.mark.parametrize(
    "content",
    [
        b"",
        base64.b64encode(K1[:31]),
        base64.b64encode(K1 + b"!"),
        K1[:31],
        K1 + b"\x00",
        b"not base64 at all!!",
        b"A" * 5000,
    ],
)
def test_load_rejects_bad_contents(tmp_path, content):
    path = tmp_path / "bad.key"
    _write(path, content)
    with pytest.raises(RootKeyConfigError, match=str(path)) as info:
        load_root_key_file(path)
    _assert_hidden(str(info.value), K1)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_load_rejects_loose_permissions(tmp_path, mode):
    path = tmp_path / "loose.key"
    _write(path, base64.b64encode(K1), mode)
    with pytest.raises(RootKeyConfigError, match=f"mode {mode:04o}") as info:
        load_root_key_file(path)
    assert "chmod 600" in str(info.value)


def test_load_accepts_owner_only_modes(tmp_path):
    for mode in (0o600, 0o400):
        path = tmp_path / f"ok{mode:o}.key"
        _write(path, base64.b64encode(K1), mode)
        assert load_root_key_file(path).key_id == RootKey(K1).key_id


def test_load_missing_and_not_regular(tmp_path):
    with pytest.raises(RootKeyConfigError, match="does not exist"):
        load_root_key_file(tmp_path / "missing.key")
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(RootKeyConfigError, match="not a regular file"):
        load_root_key_file(d)


def test_load_follows_symlink_to_private_file(tmp_path):
    target = tmp_path / "target.key"
    _write(target, base64.b64encode(K1))
    link = tmp_path / "link.key"
    link.symlink_to(target)
    assert load_root_key_file(link).key_id == RootKey(K1).key_id


def test_create_dev_key_file(tmp_path):
    path = tmp_path / "new" / "sub" / "master.key"
    key = create_dev_root_key_file(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    content = path.read_bytes()
    assert len(base64.b64decode(content.strip(), validate=True)) == 32
    assert load_root_key_file(path).key_id == key.key_id
    with pytest.raises(RootKeyConfigError, match="already exists"):
        create_dev_root_key_file(path)
    assert path.read_bytes() == content  # not overwritten


def test_create_dev_key_file_refuses_existing_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    link = tmp_path / "master.key"
    link.symlink_to(target)
    with pytest.raises(RootKeyConfigError):
        create_dev_root_key_file(link)
    assert not target.exists()


def test_load_or_create_dev_root_key(tmp_path):
    data_dir = tmp_path / "data"
    key, created = load_or_create_dev_root_key(data_dir)
    assert created
    assert stat.S_IMODE(os.stat(data_dir / "master.key").st_mode) == 0o600
    again, created_again = load_or_create_dev_root_key(str(data_dir))
    assert not created_again
    assert again.key_id == key.key_id
    os.chmod(data_dir / "master.key", 0o644)
    with pytest.raises(RootKeyConfigError):
        load_or_create_dev_root_key(data_dir)  # never replaced or bypassed


def test_dev_key_is_random(tmp_path):
    a = create_dev_root_key_file(tmp_path / "a.key")
    b = create_dev_root_key_file(tmp_path / "b.key")
    assert a.key_id != b.key_id


def test_a_32_character_passphrase_is_not_a_root_key(tmp_path: Path) -> None:
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.crypto.rootkey import load_root_key_file

    for text in (b"correcthorsebatterystaple1234567", b"0123456789abcdef0123456789abcdef"):
        path = tmp_path / "rmk"
        path.write_bytes(text)
        path.chmod(0o600)
        with pytest.raises(RootKeyConfigError, match="passphrase"):
            load_root_key_file(path)


def test_processes_racing_to_create_the_dev_key_all_get_the_same_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; from valv.core.crypto.rootkey import load_or_create_dev_root_key as f;"
            "print(f(sys.argv[1])[0].key_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "data")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["master.key"]
