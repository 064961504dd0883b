"""Key-encryption keys (KEKs): the per-CryptoKeyVersion symmetric material."""

from __future__ import annotations

import os

from valv.core.crypto.secrets import SecretBytes

__all__ = ["KEK_SIZE", "generate_kek"]

KEK_SIZE = 32
"""Length in bytes of a symmetric KEK (AES-256)."""


def generate_kek() -> SecretBytes:
    """Return 256 fresh random bits from the OS CSPRNG (``os.urandom``).

    KEKs are always random; they are never derived from a password or from
    another key.
    """
    return SecretBytes(os.urandom(KEK_SIZE))
