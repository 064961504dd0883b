"""The Encrypt/Decrypt ciphertext format. This is the only module that owns it.

Layout (DESIGN.md §3)::

    byte 0       format version, 1
    bytes 1-4    CryptoKeyVersion id, uint32 big-endian (1 .. 2**32-1)
    bytes 5-20   128-bit salt, random, one per writer session
    bytes 21-32  96-bit GCM nonce
    bytes 33-    AES-256-GCM ciphertext || 16-byte tag

Notation: ``u32(n)`` is ``n`` as 4 bytes big-endian; ``lp(x) = u32(len(x)) || x``;
``N`` is the CryptoKey resource name (``projects/…/cryptoKeys/k``, *not* the
version name) in UTF-8; ``A`` is the caller's additional authenticated data.

Subkey, one per (KEK, CryptoKey, version, salt)::

    info   = b"valv/aead/v1" || lp(N) || u32(version_id)
    subkey = HKDF-SHA256(ikm=KEK, salt=salt, info=info, length=32)

GCM additional data::

    aad = lp(ciphertext[0:21]) || lp(N) || lp(A)

so an edited header, a ciphertext moved to another CryptoKey, and a wrong
caller AAD all fail authentication. (The nonce, bytes 21-32, is authenticated
by GCM as the IV.)

Nonce safety. A :class:`CiphertextWriter` is one writer session: it picks a
random 16-byte salt when created, after every ``max_messages_per_salt``
(default 2**32) encryptions, and whenever it finds itself in a forked child.
Under one salt the nonce is a counter (``u32(0) || u64(counter)``, i.e. the
counter as 12 bytes big-endian), so nonces never repeat under a salt. Each
GCM subkey is bound to one salt, so it sees at most 2**32 messages, all with
distinct nonces. Salts are random 128-bit values; across ``n`` writer
sessions the chance that any two collide is at most ``n**2 / 2**129``. Readers
don't care about the per-salt limit: it is writer policy, not format. See
docs/crypto.md for the numbers.

Failures. Any bad ciphertext (short, truncated, extended, garbage, wrong
format or version, wrong key/AAD/KEK) raises :class:`InvalidCiphertextError`
and nothing else. Size limits (64 KiB) are checked by the service, not here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable

from cachetools import TTLCache
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from valv.core.crypto.errors import InvalidCiphertextError
from valv.core.crypto.kek import KEK_SIZE
from valv.core.crypto.secrets import BytesLike, SecretBytes

__all__ = [
    "AEAD_INFO_LABEL",
    "DEFAULT_CACHE_MAXSIZE",
    "DEFAULT_CACHE_TTL_SECONDS",
    "FORMAT_VERSION",
    "HEADER_LEN",
    "MAX_MESSAGES_PER_SALT",
    "MAX_VERSION_ID",
    "MIN_CIPHERTEXT_LEN",
    "NONCE_LEN",
    "SALT_LEN",
    "TAG_LEN",
    "CiphertextCodec",
    "CiphertextWriter",
    "SubkeyCache",
    "derive_subkey",
    "read_version_id",
]

FORMAT_VERSION = 1
VERSION_ID_LEN = 4
SALT_LEN = 16
NONCE_LEN = 12
TAG_LEN = 16
AAD_HEADER_LEN = 1 + VERSION_ID_LEN + SALT_LEN  # bytes 0-20, bound as AAD
HEADER_LEN = AAD_HEADER_LEN + NONCE_LEN  # 33
MIN_CIPHERTEXT_LEN = HEADER_LEN + TAG_LEN  # 49: empty plaintext
MAX_VERSION_ID = 2**32 - 1
MAX_MESSAGES_PER_SALT = 2**32
AEAD_INFO_LABEL = b"valv/aead/v1"
SUBKEY_LEN = 32

DEFAULT_CACHE_MAXSIZE = 4096
DEFAULT_CACHE_TTL_SECONDS = 600.0

_PREFIX = struct.Struct(">BI")  # format version, version id
_U32 = struct.Struct(">I")

KekLike = SecretBytes | BytesLike


# -- encoding helpers ---------------------------------------------------------


def _lp(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def _kek_bytes(kek: KekLike) -> memoryview:
    """A read-only view of the KEK, for this call only: no copy of it is made
    (a ``bytes`` copy could not be wiped, and every call would leave one)."""
    if isinstance(kek, SecretBytes):
        material = kek.view()  # raises ValueError for a zeroized SecretBytes
    elif isinstance(kek, bytes | bytearray | memoryview):
        material = memoryview(kek).toreadonly()
    else:
        raise TypeError(f"kek must be SecretBytes or bytes, not {type(kek).__name__}")
    if material.nbytes != KEK_SIZE or material.format != "B":
        raise ValueError(f"a KEK must be {KEK_SIZE} bytes, got {len(material)}")
    if hmac.compare_digest(material, bytes(KEK_SIZE)):
        raise ValueError("refusing an all-zero KEK (was it zeroized while in use?)")
    return material


def _key_name_bytes(key_name: str) -> bytes:
    if not isinstance(key_name, str) or not key_name:
        raise ValueError("key_name must be a non-empty CryptoKey resource name")
    if "/cryptoKeyVersions/" in key_name:
        raise ValueError(
            f"key_name must be the CryptoKey name, not a CryptoKeyVersion name: {key_name!r}"
        )
    return key_name.encode("utf-8")


def _check_version_id(version_id: int) -> None:
    if isinstance(version_id, bool) or not isinstance(version_id, int):
        raise TypeError("version_id must be an int")
    if not 1 <= version_id <= MAX_VERSION_ID:
        raise ValueError(f"version_id must be in 1..{MAX_VERSION_ID}, got {version_id}")


def _as_bytes(value: BytesLike, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{what} must be bytes, not {type(value).__name__}")


def _subkey_info(key_name: bytes, version_id: int) -> bytes:
    return AEAD_INFO_LABEL + _lp(key_name) + _U32.pack(version_id)


def _derive(kek: memoryview, key_name: bytes, version_id: int, salt: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=SUBKEY_LEN,
        salt=salt,
        info=_subkey_info(key_name, version_id),
    ).derive(kek)


def _gcm_aad(header: bytes, key_name: bytes, aad: bytes) -> bytes:
    return _lp(header) + _lp(key_name) + _lp(aad)


def derive_subkey(kek: KekLike, *, key_name: str, version_id: int, salt: bytes) -> bytes:
    """The AES-256-GCM subkey for (KEK, CryptoKey name, version id, salt).

    Exposed for tests and interoperability checks; normal code goes through
    :class:`CiphertextCodec`, which caches subkeys.
    """
    _check_version_id(version_id)
    if len(salt) != SALT_LEN:
        raise ValueError(f"salt must be {SALT_LEN} bytes")
    return _derive(_kek_bytes(kek), _key_name_bytes(key_name), version_id, bytes(salt))


def read_version_id(ciphertext: BytesLike) -> int:
    """Parse only the header and return the CryptoKeyVersion id.

    Raises :class:`InvalidCiphertextError` if the input is too short to be a
    ciphertext, has an unknown format version, or names version 0.
    """
    data = _as_bytes(ciphertext, "ciphertext")
    if len(data) < MIN_CIPHERTEXT_LEN:
        raise InvalidCiphertextError("too short")
    fmt, version_id = _PREFIX.unpack_from(data)
    if fmt != FORMAT_VERSION:
        raise InvalidCiphertextError("unknown format version")
    if version_id == 0:
        raise InvalidCiphertextError("version id 0")
    return int(version_id)


# -- subkey cache -------------------------------------------------------------

_CacheKey = tuple[bytes, bytes, int, bytes]


class SubkeyCache:
    """Bounded LRU+TTL cache of derived subkeys, ready to use as ``AESGCM``.

    Keys are ``(sha256(KEK), CryptoKey name, version id, salt)``; the raw KEK
    is never a key. Values are ``AESGCM`` objects: ``cryptography`` keeps its
    own immutable copy of the subkey in them, which cannot be zeroized; its
    lifetime is bounded by ``maxsize`` and ``ttl_seconds`` and by
    :meth:`clear`. Thread-safe.
    """

    def __init__(
        self,
        maxsize: int = DEFAULT_CACHE_MAXSIZE,
        ttl_seconds: float = DEFAULT_CACHE_TTL_SECONDS,
        *,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self._cache: TTLCache[_CacheKey, AESGCM] = TTLCache(maxsize, ttl_seconds, timer)
        # (CryptoKey name, version id) -> the cache keys put for it, so that
        # evict_version costs what it evicts, not a scan of the cache (a sidecar
        # calls it each time a KEK is wiped). Keys the cache has since dropped by
        # itself linger here until the version is evicted or the index is
        # rebuilt, which happens once it holds more than 4 x maxsize keys.
        self._by_version: dict[tuple[bytes, int], set[_CacheKey]] = {}
        self._indexed = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        _FORK_RESET.add(self)

    @staticmethod
    def _key(kek: memoryview, key_name: bytes, version_id: int, salt: bytes) -> _CacheKey:
        return (hashlib.sha256(kek).digest(), key_name, version_id, salt)

    def _get(self, ck: _CacheKey) -> AESGCM | None:
        with self._lock:
            aead = self._cache.get(ck)
            if aead is None:
                self.misses += 1
            else:
                self.hits += 1
            return aead

    def _put(self, ck: _CacheKey, aead: AESGCM) -> None:
        with self._lock:
            self._cache[ck] = aead
            keys = self._by_version.setdefault((ck[1], ck[2]), set())
            if ck not in keys:
                keys.add(ck)
                self._indexed += 1
                if self._indexed > 4 * self._cache.maxsize:
                    self._reindex()

    def _reindex(self) -> None:
        self._by_version = {}
        self._indexed = 0
        for ck in list(self._cache.keys()):
            self._by_version.setdefault((ck[1], ck[2]), set()).add(ck)
            self._indexed += 1

    def evict_version(self, key_name: str, version_id: int) -> int:
        """Drop every cached subkey of one CryptoKeyVersion; returns how many."""
        with self._lock:
            keys = self._by_version.pop((key_name.encode("utf-8"), version_id), None)
            if not keys:
                return 0
            self._indexed -= len(keys)
            return sum(self._cache.pop(ck, None) is not None for ck in keys)

    def clear(self) -> None:
        """Drop every cached subkey."""
        with self._lock:
            self._cache.clear()
            self._by_version.clear()
            self._indexed = 0

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SubkeyCache(size={len(self._cache)}, maxsize={self._cache.maxsize})"


# -- writer -------------------------------------------------------------------


class CiphertextWriter:
    """One writer session: owns the salt and the nonce counter.

    Create one per process (a :class:`CiphertextCodec` does). Thread-safe and
    fork-safe: a forked child never continues its parent's (salt, counter).
    """

    def __init__(
        self,
        *,
        cache: SubkeyCache | None = None,
        max_messages_per_salt: int = MAX_MESSAGES_PER_SALT,
    ) -> None:
        if not 1 <= max_messages_per_salt <= MAX_MESSAGES_PER_SALT:
            raise ValueError(f"max_messages_per_salt must be in 1..{MAX_MESSAGES_PER_SALT}")
        self._cache = cache if cache is not None else SubkeyCache()
        self._max = max_messages_per_salt
        self._lock = threading.Lock()
        self._salt = b""
        self._count = 0
        self._pid = 0
        self._salts_chosen = 0
        self._new_salt()
        _FORK_RESET.add(self)

    def _new_salt(self) -> None:
        self._salt = os.urandom(SALT_LEN)
        self._count = 0
        self._pid = os.getpid()
        self._salts_chosen += 1

    def _after_fork_in_child(self) -> None:
        # The parent's lock may have been held by another thread at fork time.
        self._lock = threading.Lock()
        self._new_salt()

    def _next(self) -> tuple[bytes, bytes]:
        with self._lock:
            if self._pid != os.getpid() or self._count >= self._max:
                self._new_salt()
            salt, counter = self._salt, self._count
            self._count += 1
        return salt, counter.to_bytes(NONCE_LEN, "big")

    @property
    def salt(self) -> bytes:
        """The current salt (not secret; it is in every ciphertext header)."""
        with self._lock:
            return self._salt

    @property
    def messages_under_salt(self) -> int:
        """Encryptions done under the current salt."""
        with self._lock:
            return self._count

    @property
    def salts_chosen(self) -> int:
        """How many salts this writer has picked so far (1 after creation)."""
        with self._lock:
            return self._salts_chosen

    @property
    def max_messages_per_salt(self) -> int:
        return self._max

    def encrypt(
        self,
        kek: KekLike,
        *,
        key_name: str,
        version_id: int,
        plaintext: BytesLike,
        aad: BytesLike,
    ) -> bytes:
        """Encrypt ``plaintext`` for ``key_name`` version ``version_id``."""
        kek_b = _kek_bytes(kek)
        name = _key_name_bytes(key_name)
        _check_version_id(version_id)
        pt = _as_bytes(plaintext, "plaintext")
        aad_b = _as_bytes(aad, "aad")
        salt, nonce = self._next()
        header = _PREFIX.pack(FORMAT_VERSION, version_id) + salt
        ck = SubkeyCache._key(kek_b, name, version_id, salt)
        aead = self._cache._get(ck)
        if aead is None:
            aead = AESGCM(_derive(kek_b, name, version_id, salt))
            self._cache._put(ck, aead)
        return header + nonce + aead.encrypt(nonce, pt, _gcm_aad(header, name, aad_b))

    def __repr__(self) -> str:
        return f"CiphertextWriter(salt={self._salt.hex()}, messages_under_salt={self._count})"


# -- codec --------------------------------------------------------------------


class CiphertextCodec:
    """A writer session plus a subkey cache: encrypt and decrypt.

    Each server (and each test) owns one: one writer session per process.
    """

    def __init__(
        self,
        *,
        max_messages_per_salt: int = MAX_MESSAGES_PER_SALT,
        cache_maxsize: int = DEFAULT_CACHE_MAXSIZE,
        cache_ttl_seconds: float = DEFAULT_CACHE_TTL_SECONDS,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = SubkeyCache(cache_maxsize, cache_ttl_seconds, timer=timer)
        self.writer = CiphertextWriter(
            cache=self.cache, max_messages_per_salt=max_messages_per_salt
        )

    def encrypt(
        self,
        kek: KekLike,
        *,
        key_name: str,
        version_id: int,
        plaintext: BytesLike,
        aad: BytesLike,
    ) -> bytes:
        """See :meth:`CiphertextWriter.encrypt`."""
        return self.writer.encrypt(
            kek, key_name=key_name, version_id=version_id, plaintext=plaintext, aad=aad
        )

    def decrypt(
        self,
        kek: KekLike,
        *,
        key_name: str,
        version_id: int,
        ciphertext: BytesLike,
        aad: BytesLike,
    ) -> bytes:
        """Decrypt and authenticate; any bad input raises InvalidCiphertextError.

        ``kek``, ``key_name`` and ``version_id`` come from the server (a bad
        one is a programming error: ValueError/TypeError). ``ciphertext`` and
        ``aad`` come from the caller.
        """
        kek_b = _kek_bytes(kek)
        name = _key_name_bytes(key_name)
        _check_version_id(version_id)
        data = _as_bytes(ciphertext, "ciphertext")
        aad_b = _as_bytes(aad, "aad")
        if read_version_id(data) != version_id:
            raise InvalidCiphertextError("version id mismatch")
        salt = data[1 + VERSION_ID_LEN : AAD_HEADER_LEN]
        nonce = data[AAD_HEADER_LEN:HEADER_LEN]
        ck = SubkeyCache._key(kek_b, name, version_id, salt)
        aead = self.cache._get(ck)
        cached = aead is not None
        if aead is None:
            aead = AESGCM(_derive(kek_b, name, version_id, salt))
        try:
            plaintext = aead.decrypt(
                nonce, data[HEADER_LEN:], _gcm_aad(data[:AAD_HEADER_LEN], name, aad_b)
            )
        except (InvalidTag, ValueError, OverflowError):
            raise InvalidCiphertextError("authentication failed") from None
        if not cached:
            # Only cache after authentication, so garbage salts can't flush the cache.
            self.cache._put(ck, aead)
        return plaintext

    read_version_id = staticmethod(read_version_id)

    def __repr__(self) -> str:
        return f"CiphertextCodec({self.writer!r}, {self.cache!r})"


# -- fork safety --------------------------------------------------------------

_FORK_RESET: weakref.WeakSet[SubkeyCache | CiphertextWriter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for obj in list(_FORK_RESET):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
