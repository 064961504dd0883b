"""Error classes raised by :mod:`valv.core.crypto`.

Messages are meant for operators and API callers: they say what went wrong
and what to check, and never contain key bytes, plaintext or ciphertext.
Mapping to gRPC status codes happens elsewhere.
"""

from __future__ import annotations

__all__ = [
    "CryptoError",
    "InvalidCiphertextError",
    "KeyUnwrapError",
    "RootKeyConfigError",
    "RootKeyUnavailableError",
    "UnknownRootKeyError",
]


class CryptoError(Exception):
    """Base class of every error raised by the crypto package."""


class InvalidCiphertextError(CryptoError, ValueError):
    """A ciphertext could not be parsed or authenticated.

    The message is deliberately the same for every cause (truncation, bad tag,
    wrong key, wrong AAD, header edits), so it gives an attacker no oracle.
    ``reason`` holds a short internal cause for logs and metrics; it is not
    part of ``str(err)`` and must not be sent to API callers.
    """

    MESSAGE = "Decryption failed: the ciphertext is invalid or does not belong to this key/AAD."

    def __init__(self, reason: str = "invalid") -> None:
        super().__init__(self.MESSAGE)
        self.reason = reason


class KeyUnwrapError(CryptoError):
    """Wrapped key material failed to authenticate under its root key."""


class UnknownRootKeyError(CryptoError):
    """Wrapped key material names a root key id that is not configured."""


class RootKeyConfigError(CryptoError):
    """The root key configuration (file, permissions, contents) is unusable."""


class RootKeyUnavailableError(RootKeyConfigError):
    """The device that holds a root key (a PKCS#11 token) failed or went away.

    Not a sign of tampering: the stored data may be fine, and the call can be
    retried once the device is back (central reports UNAVAILABLE). At startup
    it stops the process like any other root key configuration error.
    """
