"""Encrypt and Decrypt of small payloads (DEKs): the request rules and the answer.

Central (valv.core.keystore) and the sidecar (valv.sidecar.local) both answer
Encrypt and Decrypt. They differ only in where the KEK comes from: central
reads and unwraps it from storage, the sidecar takes it from its cache of
material fetched from central. Everything else — which names and sizes are
valid, the CRC32C checks, the ciphertext (valv.core.crypto.ciphertext) and
every error message — lives here, so the two answer the same input with the
same status and the same words.

Each call is two steps around getting the KEK:

1. ``check_encrypt`` / ``check_decrypt``: validate the request and say which
   version it needs (for Decrypt, read from the ciphertext's header). Raises
   InvalidArgument; no key material is involved yet.
2. ``encrypt_with`` / ``decrypt_with``: do the AEAD with the KEK of that
   version and build the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import google_crc32c

from valv.core.crypto import ciphertext as ciphertext_format
from valv.core.crypto.ciphertext import CiphertextCodec
from valv.core.crypto.errors import InvalidCiphertextError
from valv.core.crypto.secrets import SecretBytes
from valv.core.errors import InvalidArgument
from valv.core.names import (
    CryptoKeyName,
    CryptoKeyVersionName,
    parse_crypto_key,
    parse_key_or_version,
)

# Cloud KMS's limit on plaintext and additional authenticated data.
MAX_PAYLOAD_BYTES = 64 * 1024
# A ciphertext can't be longer than the largest plaintext plus our framing.
MAX_CIPHERTEXT_BYTES = (MAX_PAYLOAD_BYTES + ciphertext_format.HEADER_LEN
                        + ciphertext_format.TAG_LEN)


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


@dataclass(frozen=True, slots=True)
class EncryptCall:
    """A valid Encrypt request: the key, and the version if the caller named one."""

    key_name: CryptoKeyName
    version_id: int | None  # None: the key's primary
    plaintext: bytes
    aad: bytes
    plaintext_crc32c: int | None
    aad_crc32c: int | None


@dataclass(frozen=True, slots=True)
class DecryptCall:
    """A valid Decrypt request: the key, and the version its ciphertext names."""

    key_name: CryptoKeyName
    version_id: int
    ciphertext: bytes
    aad: bytes


@dataclass(frozen=True, slots=True)
class EncryptResult:
    version_name: CryptoKeyVersionName
    ciphertext: bytes
    ciphertext_crc32c: int
    verified_plaintext_crc32c: bool
    verified_aad_crc32c: bool


@dataclass(frozen=True, slots=True)
class DecryptResult:
    plaintext: bytes
    plaintext_crc32c: int
    used_primary: bool


def check_encrypt(name: str, plaintext: bytes, aad: bytes, *,
                  plaintext_crc32c: int | None = None,
                  aad_crc32c: int | None = None) -> EncryptCall:
    """The Encrypt request, checked; raises InvalidArgument."""
    target = parse_key_or_version(name)
    check_size("plaintext", plaintext, MAX_PAYLOAD_BYTES)
    check_size("additional_authenticated_data", aad, MAX_PAYLOAD_BYTES)
    check_crc("plaintext", plaintext, plaintext_crc32c)
    check_crc("additional_authenticated_data", aad, aad_crc32c)
    if isinstance(target, CryptoKeyName):
        return EncryptCall(target, None, plaintext, aad, plaintext_crc32c, aad_crc32c)
    return EncryptCall(target.parent, target.version, plaintext, aad, plaintext_crc32c,
                       aad_crc32c)


def check_decrypt(name: str, ciphertext: bytes, aad: bytes, *,
                  ciphertext_crc32c: int | None = None,
                  aad_crc32c: int | None = None) -> DecryptCall:
    """The Decrypt request, checked; raises InvalidArgument (a ciphertext whose
    header doesn't parse is a decryption failure)."""
    key_name = parse_crypto_key(name)
    check_size("ciphertext", ciphertext, MAX_CIPHERTEXT_BYTES)
    check_size("additional_authenticated_data", aad, MAX_PAYLOAD_BYTES)
    check_crc("ciphertext", ciphertext, ciphertext_crc32c)
    check_crc("additional_authenticated_data", aad, aad_crc32c)
    try:
        version_id = ciphertext_format.read_version_id(ciphertext)
    except InvalidCiphertextError:
        raise decryption_failed(key_name) from None
    return DecryptCall(key_name, version_id, ciphertext, aad)


def encrypt_with(codec: CiphertextCodec, kek: SecretBytes, call: EncryptCall,
                 version_id: int) -> EncryptResult:
    """Encrypt ``call`` with ``kek``, the KEK of ``version_id`` of ``call.key_name``."""
    ciphertext = codec.encrypt(kek, key_name=str(call.key_name), version_id=version_id,
                               plaintext=call.plaintext, aad=call.aad)
    return EncryptResult(
        version_name=call.key_name.version(version_id), ciphertext=ciphertext,
        ciphertext_crc32c=crc32c(ciphertext),
        verified_plaintext_crc32c=call.plaintext_crc32c is not None,
        verified_aad_crc32c=call.aad_crc32c is not None)


def decrypt_with(codec: CiphertextCodec, kek: SecretBytes, call: DecryptCall, *,
                 primary_version_id: int) -> DecryptResult:
    """Decrypt ``call`` with the KEK of ``call.version_id``; raises InvalidArgument when
    the ciphertext or the additional data doesn't authenticate."""
    try:
        plaintext = codec.decrypt(kek, key_name=str(call.key_name), version_id=call.version_id,
                                  ciphertext=call.ciphertext, aad=call.aad)
    except InvalidCiphertextError:
        raise decryption_failed(call.key_name) from None
    return DecryptResult(plaintext=plaintext, plaintext_crc32c=crc32c(plaintext),
                         used_primary=primary_version_id == call.version_id)


def decryption_failed(key_name: CryptoKeyName) -> InvalidArgument:
    return InvalidArgument(
        f"Decryption failed: the ciphertext is invalid, was not produced by {key_name}, or "
        "the additional_authenticated_data does not match"
    )


def check_size(field_name: str, data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise InvalidArgument(f"{field_name} is {len(data)} bytes; the limit is {limit} bytes")


def check_crc(field_name: str, data: bytes, expected: int | None) -> None:
    if expected is not None and crc32c(data) != expected:
        raise InvalidArgument(
            f"{field_name}_crc32c does not match {field_name}: the request was corrupted in "
            "transit; compute the CRC32C again and retry"
        )
