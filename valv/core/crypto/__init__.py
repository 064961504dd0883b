"""Valv's cryptography: root keys, KEK wrapping and the ciphertext format.

Only ``cryptography``, ``cachetools`` and the standard library are used here.
See docs/crypto.md for the key hierarchy and the ciphertext format.
"""

from valv.core.crypto.ciphertext import (
    FORMAT_VERSION,
    HEADER_LEN,
    MAX_MESSAGES_PER_SALT,
    MIN_CIPHERTEXT_LEN,
    CiphertextCodec,
    CiphertextWriter,
    SubkeyCache,
    derive_subkey,
    read_version_id,
)
from valv.core.crypto.errors import (
    CryptoError,
    InvalidCiphertextError,
    KeyUnwrapError,
    RootKeyConfigError,
    UnknownRootKeyError,
)
from valv.core.crypto.kek import KEK_SIZE, generate_kek
from valv.core.crypto.rootkey import (
    DEV_ROOT_KEY_FILENAME,
    ROOT_KEY_SIZE,
    RootKey,
    RootKeyring,
    create_dev_root_key_file,
    load_or_create_dev_root_key,
    load_root_key_file,
)
from valv.core.crypto.secrets import SecretBytes

__all__ = [
    "DEV_ROOT_KEY_FILENAME",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "KEK_SIZE",
    "MAX_MESSAGES_PER_SALT",
    "MIN_CIPHERTEXT_LEN",
    "ROOT_KEY_SIZE",
    "CiphertextCodec",
    "CiphertextWriter",
    "CryptoError",
    "InvalidCiphertextError",
    "KeyUnwrapError",
    "RootKey",
    "RootKeyConfigError",
    "RootKeyring",
    "SecretBytes",
    "SubkeyCache",
    "UnknownRootKeyError",
    "create_dev_root_key_file",
    "derive_subkey",
    "generate_kek",
    "load_or_create_dev_root_key",
    "load_root_key_file",
    "read_version_id",
]
