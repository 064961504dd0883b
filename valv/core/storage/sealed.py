"""Sealing: every value is encrypted and bound to its key before it reaches storage.

Storage is untrusted (DESIGN.md §4). ``SealedStore`` wraps any ``Store`` and
seals each value with AES-256-GCM under a storage sealing key derived from a
root master key (RMK), with the record's packed key as AAD. So nothing in the
database or its backups is in clear, and a value that was edited, or moved or
copied to another key, fails to open and is reported as
``TamperedRecordError`` naming the record.

Sealed value format::

    byte 0          format version (1)
    byte 1          n = length of the RMK id (1..255)
    bytes 2..2+n    RMK id, ASCII
    next 12 bytes   random nonce
    rest            AES-256-GCM ciphertext || 16-byte tag
    AAD             the record's packed key, exactly as stored

Nonces are random. Each seal key is per RMK, and storage sees few writes (key
metadata, not user data), far below the 2**32 messages at which random 96-bit
nonces under one key would need care.

What sealing does not detect: a record deleted at the storage level, or an
older sealed value put back at the same key (rollback). Both need state
outside storage and are out of scope here.

Keys are not encrypted: they hold resource names, which are not secret.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Protocol, SupportsBytes, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from valv.core.storage import keys
from valv.core.storage.base import (
    MAX_VALUE_BYTES,
    LimitExceededError,
    StorageError,
    Store,
    Transaction,
)

__all__ = [
    "FORMAT_VERSION",
    "NONCE_BYTES",
    "TAG_BYTES",
    "SealKeyProvider",
    "SealedStore",
    "SealedTransaction",
    "Sealer",
    "TamperedRecordError",
    "rmk_id_of",
    "sealed_overhead",
]

T = TypeVar("T")

FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
SEAL_KEY_BYTES = 32

KeyMaterial = SupportsBytes | bytes | bytearray | memoryview


class SealKeyProvider(Protocol):
    """Where seal keys come from. ``valv.core.crypto.rootkey.RootKeyring`` is one."""

    def __contains__(self, rmk_id: object) -> bool:
        """True if ``rmk_id`` is a configured RMK."""
        ...

    def newest_seal_key(self) -> tuple[str, KeyMaterial]:
        """``(rmk_id, 32-byte key)`` to seal new values with."""
        ...

    def seal_key_for(self, rmk_id: str) -> KeyMaterial:
        """The 32-byte seal key of a configured ``rmk_id``."""
        ...


class TamperedRecordError(StorageError):
    """A stored value failed to open: it was modified or moved at the storage level.

    ``key`` is the packed key of the record that was read.
    """

    def __init__(self, key: bytes, reason: str) -> None:
        super().__init__(
            f"storage record {keys.describe(key)} {reason}: it was modified or moved "
            "at the storage level (or written by another Valv with a different root key)"
        )
        self.key = key


class UnknownSealKeyError(TamperedRecordError):
    """A record is sealed under a root key that is not configured.

    Usually a configuration problem (a root key was removed too early), so the
    message says how to fix that; but an edited id byte looks the same, so it
    is still a TamperedRecordError (DATA_LOSS to callers).
    """

    def __init__(self, key: bytes, rmk_id: str) -> None:
        StorageError.__init__(
            self,
            f"storage record {keys.describe(key)} is sealed under root key id {rmk_id!r}, "
            "which is not configured: add that root key back to the configuration "
            "(VALV_MASTER_KEY_FILE, VALV_MASTER_KEY or VALV_PKCS11_KEY_LABEL) and run "
            "`valv rmk rotate`, or the record was modified or moved at the storage level",
        )
        self.key = key
        self.rmk_id = rmk_id


def sealed_overhead(rmk_id: str) -> int:
    """How many bytes sealing under ``rmk_id`` adds to a value."""
    return 2 + len(rmk_id.encode("ascii")) + NONCE_BYTES + TAG_BYTES


def _parse(sealed: bytes) -> tuple[str, bytes, bytes] | str:
    """``(rmk_id, nonce, ct_and_tag)``, or a reason string if malformed."""
    if len(sealed) < 2:
        return "is too short to be a sealed value"
    if sealed[0] != FORMAT_VERSION:
        return f"has unknown seal format version {sealed[0]}"
    n = sealed[1]
    start = 2 + n
    if n == 0 or len(sealed) < start + NONCE_BYTES + TAG_BYTES:
        return "is too short to be a sealed value"
    raw_id = sealed[2:start]
    if not all(0x21 <= b <= 0x7E for b in raw_id):
        return "has a malformed root key id"
    rmk_id = raw_id.decode("ascii")
    return rmk_id, sealed[start : start + NONCE_BYTES], sealed[start + NONCE_BYTES :]


def rmk_id_of(sealed: bytes, key: bytes = b"") -> str:
    """The id of the RMK that ``sealed`` was sealed under (not authenticated).

    For finding records to reseal after an RMK rotation. Raises
    TamperedRecordError (naming ``key`` if given) when the value is malformed.
    """
    parsed = _parse(bytes(sealed))
    if isinstance(parsed, str):
        raise TamperedRecordError(key, parsed)
    return parsed[0]


class Sealer:
    """Seals and opens values with keys from a ``SealKeyProvider``.

    AESGCM objects are cached per RMK id. Thread-safe.
    """

    def __init__(self, provider: SealKeyProvider) -> None:
        self._provider = provider
        self._lock = threading.Lock()
        self._ciphers: dict[str, AESGCM] = {}

    def _cipher(self, rmk_id: str, material: KeyMaterial | None = None) -> AESGCM:
        with self._lock:
            cipher = self._ciphers.get(rmk_id)
        if cipher is not None:
            if material is not None:
                _zeroize(material)
            return cipher
        if material is None:
            material = self._provider.seal_key_for(rmk_id)
        try:
            key = bytes(material)
        finally:
            _zeroize(material)  # providers hand out copies the caller owns
        if len(key) != SEAL_KEY_BYTES:
            raise StorageError(
                f"seal key for root key {rmk_id!r} is {len(key)} bytes, not {SEAL_KEY_BYTES}"
            )
        cipher = AESGCM(key)
        with self._lock:
            return self._ciphers.setdefault(rmk_id, cipher)

    def newest_rmk_id(self) -> str:
        rmk_id, material = self._provider.newest_seal_key()
        _zeroize(material)
        return rmk_id

    def seal(self, key: bytes, value: bytes) -> bytes:
        """The sealed form of ``value`` for the record at ``key``."""
        rmk_id, material = self._provider.newest_seal_key()
        raw_id = rmk_id.encode("ascii")
        if not 0 < len(raw_id) < 256 or not all(0x21 <= b <= 0x7E for b in raw_id):
            _zeroize(material)
            raise StorageError(f"root key id {rmk_id!r} cannot be stored in a sealed value")
        cipher = self._cipher(rmk_id, material)
        nonce = os.urandom(NONCE_BYTES)
        ct = cipher.encrypt(nonce, bytes(value), bytes(key))
        return bytes((FORMAT_VERSION, len(raw_id))) + raw_id + nonce + ct

    def open(self, key: bytes, sealed: bytes) -> bytes:
        """The value sealed in ``sealed`` for ``key``; TamperedRecordError if it fails."""
        parsed = _parse(bytes(sealed))
        if isinstance(parsed, str):
            raise TamperedRecordError(key, parsed)
        rmk_id, nonce, ct = parsed
        if rmk_id not in self._provider:
            raise UnknownSealKeyError(key, rmk_id)
        cipher = self._cipher(rmk_id)
        try:
            return cipher.decrypt(nonce, ct, bytes(key))
        except InvalidTag:
            raise TamperedRecordError(key, "failed authentication") from None

    def forget(self) -> None:
        """Drop the cached ciphers (e.g. when the root keyring is zeroized)."""
        with self._lock:
            self._ciphers.clear()


def _zeroize(material: object) -> None:
    zeroize = getattr(material, "zeroize", None)
    if callable(zeroize):
        zeroize()


class SealedTransaction(Transaction):
    """A transaction whose values are sealed on the way in and opened on the way out."""

    def __init__(self, inner: Transaction, sealer: Sealer) -> None:
        self._inner = inner
        self._sealer = sealer

    @property
    def raw(self) -> Transaction:
        """The same transaction without sealing: values as stored (a backup copies them)."""
        return self._inner

    def get(self, key: bytes) -> bytes | None:
        sealed = self._inner.get(key)
        return None if sealed is None else self._sealer.open(key, sealed)

    def set(self, key: bytes, value: bytes) -> None:
        sealed = self._sealer.seal(key, value)
        if len(sealed) > MAX_VALUE_BYTES:
            raise LimitExceededError(
                f"value for {keys.describe(key)} is {len(value)} bytes, {len(sealed)} once "
                f"sealed (limit {MAX_VALUE_BYTES} sealed)"
            )
        self._inner.set(key, sealed)

    def clear(self, key: bytes) -> None:
        self._inner.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._inner.clear_range(begin, end)

    @property
    def supports_versionstamps(self) -> bool:
        return self._inner.supports_versionstamps

    def set_versionstamped(self, prefix: bytes, value: bytes) -> None:
        # The key isn't known until commit, so the AAD is the prefix it goes
        # under: such a value opens only as one of that prefix's
        # (``get_stamped_range``), never as any other record.
        self._inner.set_versionstamped(prefix, self._sealer.seal(prefix, value))

    def get_stamped_range(self, prefix: bytes, *, limit: int = 0
                          ) -> list[tuple[bytes, bytes]]:
        """The values written with ``set_versionstamped(prefix, ...)``, in key order.

        A snapshot read (``Transaction.get_range_snapshot``): concurrent writers
        staging more under ``prefix`` don't abort the reader (a sequencer)."""
        begin, end = prefix + b"\x00", prefix + b"\xff"
        return [(k, self._sealer.open(prefix, v))
                for k, v in self._inner.get_range_snapshot(begin, end, limit=limit)]

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        pairs = self._inner.get_range(begin, end, limit=limit, reverse=reverse)
        return [(k, self._sealer.open(k, v)) for k, v in pairs]

    def get_range_snapshot(
        self, begin: bytes, end: bytes, *, limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        pairs = self._inner.get_range_snapshot(begin, end, limit=limit)
        return [(k, self._sealer.open(k, v)) for k, v in pairs]


class SealedStore(Store):
    """A Store that seals every value it writes to ``inner``.

    Crypto runs inside the transaction body, so off the event loop like the
    rest of the body.
    """

    def __init__(self, inner: Store, sealer: Sealer) -> None:
        self._inner = inner
        self._sealer = sealer

    @property
    def inner(self) -> Store:
        return self._inner

    @property
    def sealer(self) -> Sealer:
        return self._sealer

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def max_value_bytes(self) -> int:
        """The largest plaintext value that fits once sealed under the newest RMK."""
        return MAX_VALUE_BYTES - sealed_overhead(self._sealer.newest_rmk_id())

    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        sealer = self._sealer

        def sealed_body(tx: Transaction) -> T:
            return body(SealedTransaction(tx, sealer))

        return await self._inner.run(sealed_body, read_only=read_only)

    async def erase_freed_space(self) -> None:
        await self._inner.erase_freed_space()

    @property
    def supports_versionstamps(self) -> bool:
        return self._inner.supports_versionstamps

    @property
    def supports_watches(self) -> bool:
        return self._inner.supports_watches

    async def wait_for_change(self, key: bytes, timeout_s: float, *,
                              armed: asyncio.Event | None = None) -> bool:
        # Keys pass through unchanged, so a watch on the inner store is one on ours.
        return await self._inner.wait_for_change(key, timeout_s, armed=armed)

    async def close(self) -> None:
        await self._inner.close()
