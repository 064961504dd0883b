"""Sealing key material to a sidecar process (valv.core.material)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from valv.core.crypto.secrets import SecretBytes
from valv.core.material import (
    BadPublicKey,
    MaterialError,
    material_aad,
    open_sealed,
    seal,
)

VERSION = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
KEK = bytes(range(32))
RECIPIENT = X25519PrivateKey.generate()


def raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def sealed_for(recipient: X25519PrivateKey = RECIPIENT, purpose: str = "ENCRYPT",
               version: str = VERSION) -> bytes:
    return seal(SecretBytes(KEK), version_name=version, purpose=purpose,
                recipient_public_key=raw(recipient))


def test_round_trip() -> None:
    sealed = sealed_for()
    assert len(sealed) == 32 + 12 + len(KEK) + 16
    assert KEK not in sealed
    opened = open_sealed(sealed, RECIPIENT, version_name=VERSION, purpose="ENCRYPT")
    assert opened == KEK
    assert KEK.hex() not in repr(opened)


def test_each_seal_uses_a_fresh_ephemeral_key() -> None:
    a, b = sealed_for(), sealed_for()
    assert a[:32] != b[:32] and a[32:44] != b[32:44]


def test_another_recipient_cannot_open_it() -> None:
    with pytest.raises(MaterialError) as info:
        open_sealed(sealed_for(), X25519PrivateKey.generate(), version_name=VERSION,
                    purpose="ENCRYPT")
    assert KEK.hex() not in str(info.value)


@pytest.mark.parametrize(("version", "purpose"), [
    (VERSION.replace("Versions/1", "Versions/2"), "ENCRYPT"),
    (VERSION.replace("cryptoKeys/k", "cryptoKeys/j"), "ENCRYPT"),
    (VERSION, "DECRYPT"),
])
def test_the_context_is_bound(version: str, purpose: str) -> None:
    with pytest.raises(MaterialError):
        open_sealed(sealed_for(), RECIPIENT, version_name=version, purpose=purpose)


def test_the_aad_is_length_prefixed() -> None:
    # "ab" + "c" must not collide with "a" + "bc".
    assert material_aad("ab", "ENCRYPT", b"c" * 32) != material_aad("a", "ENCRYPT", b"bc" * 16)
    with pytest.raises(ValueError):
        material_aad(VERSION, "SIGN", raw(RECIPIENT))


@pytest.mark.parametrize("public_key", [b"", b"\x01" * 31, b"\x01" * 33, bytes(32),
                                        b"\x01" + bytes(31)])
def test_bad_public_keys_are_refused(public_key: bytes) -> None:
    with pytest.raises(BadPublicKey):
        seal(KEK, version_name=VERSION, purpose="ENCRYPT", recipient_public_key=public_key)


def test_truncated_material_does_not_open() -> None:
    sealed = sealed_for()
    for n in (0, 10, 44, 59, len(sealed) - 1):
        with pytest.raises(MaterialError):
            open_sealed(sealed[:n], RECIPIENT, version_name=VERSION, purpose="ENCRYPT")
    with pytest.raises(MaterialError):
        open_sealed(sealed + b"\x00", RECIPIENT, version_name=VERSION, purpose="ENCRYPT")


SEALED = sealed_for()


@settings(max_examples=300, deadline=None)
@given(bit=st.integers(min_value=0, max_value=len(SEALED) * 8 - 1))
def test_any_bit_flip_fails(bit: int) -> None:
    tampered = bytearray(SEALED)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(MaterialError):
        open_sealed(bytes(tampered), RECIPIENT, version_name=VERSION, purpose="ENCRYPT")


@settings(max_examples=100, deadline=None)
@given(material=st.binary(min_size=0, max_size=64))
def test_any_material_round_trips(material: bytes) -> None:
    sealed = seal(material, version_name=VERSION, purpose="DECRYPT",
                  recipient_public_key=raw(RECIPIENT))
    assert open_sealed(sealed, RECIPIENT, version_name=VERSION, purpose="DECRYPT") == material


def test_random_garbage_does_not_open() -> None:
    with pytest.raises(MaterialError):
        open_sealed(os.urandom(92), RECIPIENT, version_name=VERSION, purpose="ENCRYPT")
