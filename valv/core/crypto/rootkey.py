"""Root master keys (RMKs) and the keyring that wraps KEKs with them.

Key hierarchy (see docs/crypto.md)::

    RMK (256-bit, outside storage)
      ├─ HKDF info "valv/rmk-id/v1", 8 bytes  -> RMK id (16 hex chars, public)
      ├─ HKDF info "valv/kek-wrap/v1"         -> KEK wrapping key (AES-256-GCM)
      ├─ HKDF info "valv/storage-seal/v1"     -> storage sealing key
      └─ HKDF info "valv/page-token/v1"       -> page-token HMAC key (newest RMK)

All HKDFs are HKDF-SHA256 with no salt, 32-byte outputs except the id.

Wrapped KEK blob: ``nonce (12 random bytes) || AES-256-GCM ct || tag (16)``.
The GCM AAD is ``lp(version_name) || lp(algorithm) || lp(rmk_id)`` where
``lp(x) = uint32_be(len(x)) || x`` over UTF-8 bytes. A wrapped KEK copied to
another record (another version name), relabelled with another algorithm, or
presented under another RMK id therefore fails to unwrap.

A root key is software (:class:`RootKey`, bytes in memory, from a file or the
environment) or lives in a PKCS#11 token (``valv.core.crypto.pkcs11``). Both
implement :class:`RootKeyBase`: an id, a KDF for the host-side subkeys (the
storage seal key and the page-token key) and an AES-256-GCM cipher that wraps
KEKs. :class:`RootKeyring` builds the wrap format and AAD once, for both, so a
token key wraps exactly the same bytes as a software one, only inside the token.

Loading: a root key file holds base64 of 32 bytes (whitespace around it is
ignored) or exactly 32 raw bytes, and must not be accessible to group or
others. There is never a fallback to a derived or zero key. This module does
not log; callers log (the dev-key warning in particular).
"""

from __future__ import annotations

import abc
import base64
import binascii
import hmac
import os
import secrets
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from valv.core.crypto.errors import (
    CryptoError,
    KeyUnwrapError,
    RootKeyConfigError,
    UnknownRootKeyError,
)
from valv.core.crypto.secrets import BytesLike, SecretBytes

__all__ = [
    "DEV_ROOT_KEY_FILENAME",
    "ROOT_KEY_SIZE",
    "KekCipher",
    "RootKey",
    "RootKeyBase",
    "RootKeyring",
    "create_dev_root_key_file",
    "load_or_create_dev_root_key",
    "load_root_key_file",
    "parse_root_key_text",
]

ROOT_KEY_SIZE = 32
DEV_ROOT_KEY_FILENAME = "master.key"

RMK_ID_INFO = b"valv/rmk-id/v1"
RMK_ID_LEN = 8
KEK_WRAP_INFO = b"valv/kek-wrap/v1"
STORAGE_SEAL_INFO = b"valv/storage-seal/v1"
PAGE_TOKEN_INFO = b"valv/page-token/v1"

WRAP_NONCE_LEN = 12
WRAP_TAG_LEN = 16

# Largest key file we read: base64 of 32 bytes is 44 chars; leave room for
# whitespace and a trailing newline but don't slurp arbitrary files.
_MAX_KEY_FILE_LEN = 4096

PathLike = str | os.PathLike[str]


def _hkdf(key: BytesLike, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


def _lp(data: bytes) -> bytes:
    """Length-prefix ``data`` with a 4-byte big-endian length."""
    return struct.pack(">I", len(data)) + data


def _encode_label(value: str, what: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")
    return value.encode("utf-8")


class KekCipher(Protocol):
    """AES-256-GCM under a root key's KEK-wrapping key, wherever that key lives.

    Only :class:`RootKeyring` uses this: it picks the nonce and builds the AAD,
    so the wrap format is defined in one place for every kind of root key.
    """

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """``ciphertext || 16-byte tag``."""
        ...

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        """The plaintext; raises ``cryptography.exceptions.InvalidTag`` if it fails."""
        ...

    def close(self) -> None:
        """Wipe or release whatever the cipher holds. It is unusable afterwards."""
        ...


class RootKeyBase(abc.ABC):
    """A root master key: in memory (:class:`RootKey`) or in a PKCS#11 token.

    The keyring needs three things of it, and nothing else:

    - :attr:`key_id`, a public fingerprint that never reveals the key;
    - :meth:`derive`, a KDF keyed by the root key, for the host-side subkeys
      (storage seal key, page-token key);
    - :meth:`_kek_cipher`, the AES-256-GCM cipher that wraps KEKs.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def key_id(self) -> str:
        """Public fingerprint of the key (16 hex characters)."""

    @property
    def kind(self) -> str:
        """Where the key lives, for logs: ``software`` or ``pkcs11``."""
        return "software"

    @abc.abstractmethod
    def derive(self, info: bytes, length: int = 32) -> SecretBytes:
        """A subkey of this root key for ``info`` (a fresh copy the caller owns)."""

    @abc.abstractmethod
    def _kek_cipher(self) -> KekCipher:
        """A new KEK-wrapping cipher the caller owns (and closes)."""

    @abc.abstractmethod
    def zeroize(self) -> None:
        """Wipe or release this object's key material. Ciphers and subkeys
        already handed out are unaffected."""

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"{type(self).__name__} cannot be pickled")


class _SoftwareKekCipher:
    """AES-256-GCM in memory, under ``HKDF(RMK, "valv/kek-wrap/v1")``."""

    __slots__ = ("_key",)

    def __init__(self, key: SecretBytes) -> None:
        self._key = key

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return AESGCM(bytes(self._key)).encrypt(nonce, data, aad)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return AESGCM(bytes(self._key)).decrypt(nonce, data, aad)

    def close(self) -> None:
        self._key.zeroize()


class RootKey(RootKeyBase):
    """A 256-bit root master key in memory. Its repr shows only the public id."""

    __slots__ = ("_key", "_key_id")

    def __init__(self, material: BytesLike | SecretBytes) -> None:
        key = material if isinstance(material, SecretBytes) else SecretBytes(material)
        if len(key) != ROOT_KEY_SIZE:
            n = len(key)
            if key is not material:
                key.zeroize()
            raise RootKeyConfigError(
                f"a root key must be exactly {ROOT_KEY_SIZE} bytes, got {n} bytes"
            )
        if key is material:
            key = SecretBytes(key)  # own a private copy
        if hmac.compare_digest(bytes(key), bytes(ROOT_KEY_SIZE)):
            key.zeroize()
            raise RootKeyConfigError("refusing an all-zero root key")
        self._key = key
        self._key_id = _hkdf(key.view(), RMK_ID_INFO, RMK_ID_LEN).hex()

    @classmethod
    def generate(cls) -> RootKey:
        """A fresh random root key (os.urandom)."""
        with SecretBytes(os.urandom(ROOT_KEY_SIZE)) as material:
            return cls(material)

    @property
    def key_id(self) -> str:
        """Public fingerprint: hex of HKDF-SHA256(key, info="valv/rmk-id/v1", length=8)."""
        return self._key_id

    def derive(self, info: bytes, length: int = 32) -> SecretBytes:
        """HKDF-SHA256 subkey of this root key with the given ``info``."""
        return SecretBytes(_hkdf(self._key.view(), info, length))

    def _kek_cipher(self) -> KekCipher:
        return _SoftwareKekCipher(self.derive(KEK_WRAP_INFO))

    def zeroize(self) -> None:
        """Wipe the key material. Subkeys already derived are unaffected."""
        self._key.zeroize()

    def __del__(self) -> None:
        # Safe: this private copy is never exposed (derive() returns copies).
        key = getattr(self, "_key", None)
        if key is not None:
            key.zeroize()

    def __repr__(self) -> str:
        return f"RootKey(id={self._key_id})"

    __str__ = __repr__


@dataclass(slots=True)
class _RootEntry:
    key_id: str
    kind: str
    cipher: KekCipher
    seal_key: SecretBytes


class RootKeyring:
    """The configured root keys. The last (newest) wraps; any one unwraps.

    Every subkey is derived once here and cached as :class:`SecretBytes`, and
    each key's KEK cipher is opened once; the keyring keeps no reference to the
    key objects, so callers may zeroize those after construction.
    :meth:`zeroize` wipes all subkeys and closes the ciphers. Methods are safe
    to call from several threads.
    """

    __slots__ = ("_by_id", "_entries", "_page_token_key", "_zeroized")

    def __init__(self, keys: Sequence[RootKeyBase]) -> None:
        if isinstance(keys, RootKeyBase):
            keys = [keys]
        if not keys:
            raise RootKeyConfigError("at least one root key must be configured")
        entries: list[_RootEntry] = []
        by_id: dict[str, _RootEntry] = {}
        for key in keys:
            if not isinstance(key, RootKeyBase):
                raise TypeError(f"RootKeyring needs RootKey objects, not {type(key).__name__}")
            if key.key_id in by_id:
                for entry in entries:
                    entry.cipher.close()
                raise RootKeyConfigError(
                    f"root key {key.key_id} is configured more than once; "
                    "list each root key once, oldest first"
                )
            try:
                seal_key = key.derive(STORAGE_SEAL_INFO)
                entry = _RootEntry(key_id=key.key_id, kind=key.kind,
                                   cipher=key._kek_cipher(), seal_key=seal_key)
            except BaseException:
                for done in entries:
                    done.cipher.close()
                raise
            entries.append(entry)
            by_id[entry.key_id] = entry
        try:
            self._page_token_key = keys[-1].derive(PAGE_TOKEN_INFO)
        except BaseException:
            for done in entries:
                done.cipher.close()
            raise
        self._entries: tuple[_RootEntry, ...] = tuple(entries)
        self._by_id = by_id
        self._zeroized = False

    # -- introspection --------------------------------------------------------

    @property
    def ids(self) -> tuple[str, ...]:
        """The configured RMK ids, oldest first."""
        return tuple(e.key_id for e in self._entries)

    @property
    def newest_id(self) -> str:
        """The id of the RMK that wraps and seals new data."""
        return self._entries[-1].key_id

    def describe(self) -> list[dict[str, str]]:
        """``[{"id", "kind"}]``, oldest first: what is configured, for logs and status."""
        return [{"id": e.key_id, "kind": e.kind} for e in self._entries]

    def __contains__(self, rmk_id: object) -> bool:
        return rmk_id in self._by_id

    def needs_rewrap(self, rmk_id: str) -> bool:
        """True if material wrapped under ``rmk_id`` should be rewrapped."""
        return rmk_id != self.newest_id

    def _entry(self, rmk_id: str) -> _RootEntry:
        if self._zeroized:
            raise CryptoError("the root keyring has been zeroized and can no longer be used")
        entry = self._by_id.get(rmk_id)
        if entry is None:
            configured = ", ".join(self.ids)
            raise UnknownRootKeyError(
                f"root key {rmk_id!r} is not configured (configured root key ids: "
                f"{configured}); data wrapped or sealed under it cannot be read until "
                "that root key is added back to the configuration"
            )
        return entry

    # -- KEK wrapping ---------------------------------------------------------

    @staticmethod
    def _wrap_aad(version_name: str, algorithm: str, rmk_id: str) -> bytes:
        return (
            _lp(_encode_label(version_name, "version_name"))
            + _lp(_encode_label(algorithm, "algorithm"))
            + _lp(rmk_id.encode("ascii"))
        )

    def wrap_kek(
        self, kek: BytesLike | SecretBytes, *, version_name: str, algorithm: str
    ) -> tuple[str, bytes]:
        """Wrap ``kek`` under the newest RMK. Returns ``(rmk_id, blob)``.

        ``version_name`` must be the canonical CryptoKeyVersion resource name
        and ``algorithm`` the version's algorithm name; both are bound as AAD.
        """
        material = bytes(kek)
        if not material:
            raise ValueError("refusing to wrap empty key material")
        if hmac.compare_digest(material, bytes(len(material))):
            raise ValueError("refusing to wrap all-zero key material")
        entry = self._entry(self.newest_id)
        aad = self._wrap_aad(version_name, algorithm, entry.key_id)
        nonce = os.urandom(WRAP_NONCE_LEN)
        sealed = entry.cipher.encrypt(nonce, material, aad)
        return entry.key_id, nonce + sealed

    def unwrap_kek(
        self, rmk_id: str, blob: bytes, *, version_name: str, algorithm: str
    ) -> SecretBytes:
        """Unwrap a blob made by :meth:`wrap_kek` under any configured RMK.

        Raises :class:`UnknownRootKeyError` if ``rmk_id`` is not configured and
        :class:`KeyUnwrapError` if the blob fails to authenticate.
        """
        entry = self._entry(rmk_id)
        aad = self._wrap_aad(version_name, algorithm, entry.key_id)
        failure = KeyUnwrapError(
            f"cannot unwrap the key material of {version_name} under root key {rmk_id}: "
            "it failed authentication (the stored material was altered, copied from "
            "another key version, or recorded with a different algorithm)"
        )
        data = bytes(blob) if isinstance(blob, bytes | bytearray | memoryview) else None
        if data is None or len(data) < WRAP_NONCE_LEN + WRAP_TAG_LEN:
            raise failure
        try:
            plain = entry.cipher.decrypt(data[:WRAP_NONCE_LEN], data[WRAP_NONCE_LEN:], aad)
        except InvalidTag:
            raise failure from None
        return SecretBytes(plain)

    def rewrap_kek(
        self, rmk_id: str, blob: bytes, *, version_name: str, algorithm: str
    ) -> tuple[str, bytes]:
        """Unwrap under ``rmk_id`` and wrap again under the newest RMK."""
        with self.unwrap_kek(rmk_id, blob, version_name=version_name, algorithm=algorithm) as k:
            return self.wrap_kek(k, version_name=version_name, algorithm=algorithm)

    # -- other subkeys --------------------------------------------------------

    def seal_key_for(self, rmk_id: str) -> SecretBytes:
        """Storage sealing key of ``rmk_id`` (a fresh copy the caller owns)."""
        return SecretBytes(self._entry(rmk_id).seal_key)

    def newest_seal_key(self) -> tuple[str, SecretBytes]:
        """``(rmk_id, key)``: the storage sealing key to seal new records with."""
        rmk_id = self.newest_id
        return rmk_id, self.seal_key_for(rmk_id)

    def page_token_key(self) -> SecretBytes:
        """HMAC key for page tokens (from the newest RMK; a fresh copy)."""
        if self._zeroized:
            raise CryptoError("the root keyring has been zeroized and can no longer be used")
        return SecretBytes(self._page_token_key)

    # -- lifetime -------------------------------------------------------------

    def zeroize(self) -> None:
        """Wipe every cached subkey and close the KEK ciphers (token sessions).

        The keyring is unusable afterwards. Calling it again does nothing.
        """
        if self._zeroized:
            return
        self._zeroized = True
        for entry in self._entries:
            entry.cipher.close()
            entry.seal_key.zeroize()
        self._page_token_key.zeroize()

    def __del__(self) -> None:
        # Safe: callers only ever receive copies of these subkeys.
        if not getattr(self, "_zeroized", True):
            self.zeroize()

    def __repr__(self) -> str:
        return f"RootKeyring(ids={list(self.ids)!r}, newest={self.newest_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("RootKeyring cannot be pickled")


# -- loading ------------------------------------------------------------------


def _parse_key_file(data: bytes, path: str) -> SecretBytes:
    if len(data) == ROOT_KEY_SIZE:
        # 32 random bytes are almost never all printable ASCII (chance ~2**-45);
        # 32 printable characters are a passphrase or a hex/base64 string of
        # too little entropy, and a key must never come from a password.
        if all(0x20 <= b < 0x7F for b in data):
            raise RootKeyConfigError(
                f"root key file {path} holds 32 printable characters, which looks like a "
                "passphrase or a short hex string, not 32 random bytes; create a key with "
                "`head -c 32 /dev/urandom | base64 > FILE`"
            )
        return SecretBytes(data)
    text = data.strip()
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is None or len(decoded) != ROOT_KEY_SIZE:
        raise RootKeyConfigError(
            f"root key file {path} must contain base64 of exactly {ROOT_KEY_SIZE} bytes "
            f"(44 characters) or exactly {ROOT_KEY_SIZE} raw bytes; it contains "
            f"{len(data)} bytes that are neither"
        )
    return SecretBytes(decoded)


def parse_root_key_text(text: str, what: str) -> RootKey:
    """A root key from base64 of exactly 32 bytes (e.g. an environment variable).

    ``what`` names the source in error messages (never the value itself).
    """
    stripped = text.strip()
    try:
        decoded = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise RootKeyConfigError(
            f"{what} is not valid base64; it must hold base64 of exactly {ROOT_KEY_SIZE} "
            "random bytes (create one with `head -c 32 /dev/urandom | base64`)"
        ) from None
    with SecretBytes(decoded) as material:
        if len(material) != ROOT_KEY_SIZE:
            raise RootKeyConfigError(
                f"{what} decodes to {len(material)} bytes; a root key is exactly "
                f"{ROOT_KEY_SIZE} bytes (44 base64 characters)"
            )
        return RootKey(material)


def load_root_key_file(path: PathLike) -> RootKey:
    """Load a root key from ``path``.

    The file holds base64 of 32 bytes or 32 raw bytes, must be a regular file
    (symlinks to one are followed, as Kubernetes secret mounts use them) and
    must grant no permissions to group or others.
    """
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise RootKeyConfigError(f"root key file {p} does not exist") from None
    except OSError as exc:
        raise RootKeyConfigError(f"cannot open root key file {p}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RootKeyConfigError(f"root key file {p} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise RootKeyConfigError(
                f"root key file {p} has mode {mode:04o}, which lets group or others access "
                f"it; restrict it to the owner (chmod 600 {p}; in Kubernetes set the "
                "secret volume's defaultMode to 0400)"
            )
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, _MAX_KEY_FILE_LEN + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > _MAX_KEY_FILE_LEN:
                raise RootKeyConfigError(
                    f"root key file {p} is too large to be a root key "
                    f"(expected base64 of {ROOT_KEY_SIZE} bytes)"
                )
    finally:
        os.close(fd)
    if total == 0:
        raise RootKeyConfigError(f"root key file {p} is empty")
    with _parse_key_file(b"".join(chunks), p) as material:
        return RootKey(material)


def create_dev_root_key_file(path: PathLike) -> RootKey:
    """Create a new random root key file at ``path`` (development only).

    The file is created with ``O_CREAT | O_EXCL`` and mode 0600 and holds the
    key in base64; an existing file is never overwritten. A missing parent
    directory is created with mode 0700.
    """
    p = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
    if os.path.lexists(p):
        raise RootKeyConfigError(f"root key file {p} already exists; refusing to overwrite it")
    # Written to a private temporary file first and then linked into place, so
    # a process starting at the same moment never reads a half-written key:
    # the name appears complete or not at all (link fails if it exists).
    tmp = f"{p}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o600)
    except OSError as exc:
        raise RootKeyConfigError(
            f"cannot create root key file {p}: {exc.strerror or exc}"
        ) from None
    material = SecretBytes(os.urandom(ROOT_KEY_SIZE))
    try:
        try:
            os.fchmod(fd, 0o600)
            encoded = bytearray(base64.b64encode(bytes(material)) + b"\n")
            try:
                view = memoryview(encoded)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                view.release()
            finally:
                encoded[:] = bytes(len(encoded))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, p)
        except FileExistsError:
            raise RootKeyConfigError(
                f"root key file {p} already exists; refusing to overwrite it"
            ) from None
    except BaseException:
        material.zeroize()
        raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    _fsync_dir(parent)
    with material:
        return RootKey(material)


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def load_or_create_dev_root_key(data_dir: PathLike) -> tuple[RootKey, bool]:
    """Load ``<data_dir>/master.key``, creating it first if it is missing.

    Returns ``(root_key, created)``. The caller must log a loud warning when
    it runs with a development key (and especially when ``created``).
    """
    path = os.path.join(os.fspath(data_dir), DEV_ROOT_KEY_FILENAME)
    if not os.path.lexists(path):
        try:
            return create_dev_root_key_file(path), True
        except RootKeyConfigError:
            if not os.path.lexists(path):
                raise
            # Another process created it first; fall through and load theirs.
    return load_root_key_file(path), False
