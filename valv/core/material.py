"""Key material sealed end to end from central to one sidecar process (DESIGN.md §5).

A sidecar process generates an X25519 key pair at start and sends the public
half with every fetch. Central seals the version's KEK to it::

    eph              = a fresh X25519 key pair, one per response
    shared           = X25519(eph.private, recipient)
    key              = HKDF-SHA256(ikm=shared, salt=eph.public || recipient,
                                   info=b"valv/sidecar-material/v1", length=32)
    aad              = lp(version name) || lp(purpose) || lp(recipient)
    sealed           = eph.public (32) || nonce (12) || AES-256-GCM(key, nonce, KEK, aad)

where ``lp(x) = u32(len(x)) || x`` (big-endian) and ``purpose`` is "ENCRYPT"
or "DECRYPT". The AAD binds the material to the version, the purpose and the
recipient it was fetched for: it can't be replayed for another of any of them.
Only the holder of the recipient's private key can open it; a proxy that
terminates TLS sees no key bytes. Errors never contain key bytes.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from valv.core.crypto.secrets import SecretBytes

INFO = b"valv/sidecar-material/v1"
PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
PURPOSES = frozenset({"ENCRYPT", "DECRYPT"})

# The permission to receive material at all (Valv's own; valv.core.iam grants
# it with roles/valv.sidecar in the root policy). Here so the sidecar can name
# it without loading the IAM module.
SIDECAR_PERMISSION = "valv.sidecar.connect"


class MaterialError(Exception):
    """Sealed material that does not open: wrong recipient, wrong context or modified."""


class BadPublicKey(ValueError):
    """A recipient public key that is not a usable X25519 key."""


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def material_aad(version_name: str, purpose: str, recipient_public_key: bytes) -> bytes:
    """The AES-GCM additional data: what the material was fetched for."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, not {purpose!r}")
    return (_lp(version_name.encode("utf-8")) + _lp(purpose.encode("ascii"))
            + _lp(bytes(recipient_public_key)))


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _recipient(recipient_public_key: bytes) -> X25519PublicKey:
    if not isinstance(recipient_public_key, bytes | bytearray) or \
            len(recipient_public_key) != PUBLIC_KEY_BYTES:
        raise BadPublicKey(f"the recipient public key must be {PUBLIC_KEY_BYTES} raw X25519 "
                           "bytes")
    return X25519PublicKey.from_public_bytes(bytes(recipient_public_key))


def check_recipient(recipient_public_key: bytes) -> None:
    """Raise BadPublicKey unless ``recipient_public_key`` can be sealed to (32 bytes, not a
    low-order point): for checking a request before any key material is read."""
    recipient = _recipient(recipient_public_key)
    try:
        shared = X25519PrivateKey.generate().exchange(recipient)
    except ValueError:
        raise BadPublicKey("the recipient public key is a low-order X25519 point") from None
    if not any(shared):
        raise BadPublicKey("the recipient public key is a low-order X25519 point")


def _derive(shared: bytes, eph_public: bytes, recipient_public: bytes) -> bytes:
    if not any(shared):  # a low-order point: the "shared" secret is public
        raise BadPublicKey("the recipient public key is a low-order X25519 point")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=eph_public + recipient_public,
                info=INFO).derive(shared)


def seal(material: SecretBytes | bytes, *, version_name: str, purpose: str,
         recipient_public_key: bytes) -> bytes:
    """``material`` sealed to ``recipient_public_key`` for ``version_name`` and ``purpose``.

    Raises BadPublicKey for a key that is not 32 bytes or is a low-order point.
    """
    recipient = _recipient(recipient_public_key)
    recipient_raw = bytes(recipient_public_key)
    aad = material_aad(version_name, purpose, recipient_raw)
    eph = X25519PrivateKey.generate()
    eph_public = _raw(eph.public_key())
    try:
        shared = eph.exchange(recipient)
    except ValueError:  # cryptography refuses an all-zero shared secret
        raise BadPublicKey("the recipient public key is a low-order X25519 point") from None
    key = _derive(shared, eph_public, recipient_raw)
    nonce = os.urandom(NONCE_BYTES)
    plain = material.view() if isinstance(material, SecretBytes) else material
    return eph_public + nonce + AESGCM(key).encrypt(nonce, bytes(plain), aad)


def open_sealed(sealed: bytes, private_key: X25519PrivateKey, *, version_name: str,
                purpose: str) -> SecretBytes:
    """The material in ``sealed``, opened with the recipient's ``private_key``.

    The sidecar calls this with the version name and purpose it asked for.
    Raises MaterialError when the material was sealed to another key, for
    another version or purpose, or was modified.
    """
    if len(sealed) < PUBLIC_KEY_BYTES + NONCE_BYTES + TAG_BYTES:
        raise MaterialError("the sealed material is too short")
    eph_public = bytes(sealed[:PUBLIC_KEY_BYTES])
    nonce = bytes(sealed[PUBLIC_KEY_BYTES:PUBLIC_KEY_BYTES + NONCE_BYTES])
    body = bytes(sealed[PUBLIC_KEY_BYTES + NONCE_BYTES:])
    recipient_raw = _raw(private_key.public_key())
    aad = material_aad(version_name, purpose, recipient_raw)
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(eph_public))
        key = _derive(shared, eph_public, recipient_raw)
        plain = AESGCM(key).decrypt(nonce, body, aad)
    except (InvalidTag, ValueError):
        raise MaterialError("the sealed material does not open with this key for "
                            f"{version_name} ({purpose})") from None
    material = SecretBytes(plain)
    return material
