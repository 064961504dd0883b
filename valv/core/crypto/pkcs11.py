"""Root keys in a PKCS#11 token (an HSM, or SoftHSM2 for tests).

The RMK is a non-extractable, sensitive AES-256 secret key in the token. It
never leaves the token; Valv asks the token to compute with it:

- **KEK wrap/unwrap**: ``CKM_AES_GCM`` in the token with the RMK itself, a
  random 96-bit nonce and the same AAD as software wrapping (canonical version
  name, algorithm, RMK id). The wrapped blob has the software format:
  ``nonce || ciphertext || tag``.
- **Host-side subkeys** (storage seal key, page-token key) and the **RMK id**
  come from a KDF computed in the token: NIST SP 800-108 in counter mode with
  ``CKM_AES_CMAC`` as the PRF::

      K(i) = AES-CMAC(RMK, u32(i) || label || 0x00 || "valv" || u32(L))
      out  = (K(1) || K(2) || ...)[: L/8]

  with ``label`` the same info string the software key uses with HKDF
  (``valv/storage-seal/v1`` ...) and ``L`` the output length in bits. It is
  deterministic, so every central (and ``valv rmk rotate``) on the same token
  gets the same subkeys with no state outside the token; the id is the KDF's
  8-byte output for ``valv/rmk-id/v1`` in hex, which reveals nothing of the key.

The key must allow ``CKA_ENCRYPT``, ``CKA_DECRYPT`` and ``CKA_SIGN`` and must
be ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``; Valv refuses it otherwise.
It must also have been generated in the token and kept secret there ever
since: ``CKA_LOCAL``, ``CKA_ALWAYS_SENSITIVE`` and ``CKA_NEVER_EXTRACTABLE``.
A key created from known bytes (``C_CreateObject``) or unwrapped into the
token has none of them, and is refused unless ``allow_imported_key``
(``--pkcs11-allow-imported-key``) says it was moved into the token on
purpose. The token must offer ``CKM_AES_GCM`` and ``CKM_AES_CMAC``.

Errors: a GCM tag that does not verify is tampering (``InvalidTag``, then
``KeyUnwrapError``: DATA_LOSS). Any other failure of the token is
:class:`RootKeyUnavailableError` (UNAVAILABLE), never reported as tampering.
Tokens report a bad tag in different ways, some with codes that also mean a
device failure (SoftHSM2 says ``CKR_GENERAL_ERROR``); for those Valv asks the
token to wrap and unwrap a probe with the same key: if that works the data
was bad, otherwise the token is.

Sessions: one logged-in session per (module, token) per process, shared by
every key of that token and used under a lock (a PKCS#11 session is not
thread-safe). If the session is lost (token removed, HSM restarted), the next
operation logs in again once before giving up with
:class:`RootKeyUnavailableError`. For that the PIN is kept in memory as long
as the session's users are open.
"""

from __future__ import annotations

import hmac
import logging
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pkcs11
from cryptography.exceptions import InvalidTag
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from valv.core.crypto.errors import RootKeyConfigError, RootKeyUnavailableError
from valv.core.crypto.keysources import ENV_PKCS11_PIN, Pkcs11Config
from valv.core.crypto.rootkey import (
    RMK_ID_INFO,
    RMK_ID_LEN,
    ROOT_KEY_SIZE,
    KekCipher,
    RootKeyBase,
)
from valv.core.crypto.secrets import SecretBytes

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as Pkcs11Lib

__all__ = [
    "Pkcs11RootKey",
    "RootKeyUnavailableError",
    "generate_token_key",
    "open_token_keys",
]

log = logging.getLogger("valv.pkcs11")

T = TypeVar("T")
# A token's secret key object: python-pkcs11 builds its class from mixins at
# run time (SecretKey + EncryptMixin + SignMixin ...), which no static type names.
_Key = Any

KDF_CONTEXT = b"valv"
GCM_TAG_BITS = 128
_MAX_PIN_FILE_LEN = 1024

# The session (not the data) is gone: log in again and retry once.
_SESSION_LOST: tuple[type[Exception], ...] = (
    p11.SessionHandleInvalid, p11.SessionClosed, p11.DeviceRemoved, p11.TokenNotPresent,
    p11.UserNotLoggedIn, p11.ObjectHandleInvalid, p11.KeyHandleInvalid,
    p11.TokenNotRecognised,
)
# How tokens report a GCM tag that does not verify: codes about the data.
_BAD_CIPHERTEXT: tuple[type[Exception], ...] = (
    p11.EncryptedDataInvalid, p11.EncryptedDataLenRange, p11.DataInvalid, p11.DataLenRange,
)
# Codes some tokens use for a bad tag (SoftHSM2: CKR_GENERAL_ERROR) that also
# mean the token itself failed: a probe tells which (_token_works).
_BAD_CIPHERTEXT_OR_TOKEN: tuple[type[Exception], ...] = (p11.GeneralError, p11.FunctionFailed)
_PROBE_AAD = b"valv/pkcs11-probe/v1"


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _TokenConnection:
    """One logged-in session to one token, shared by this process's users of it."""

    def __init__(self, module: str, token: pkcs11.Token, pin: str) -> None:
        self.module = module
        self.token = token
        self.label = token.label
        self._pin = pin
        self._lock = threading.Lock()
        self._session: pkcs11.Session | None = None
        self._keys: dict[str, _Key] = {}
        self.refs = 0

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(self._pin.encode(), pin.encode())

    def _open(self) -> pkcs11.Session:
        if self._session is None:
            try:
                self._session = self.token.open(user_pin=self._pin)
            except p11.UserAlreadyLoggedIn:
                # Login state is per application: another part of this process
                # is logged in already, so a plain session has the user's rights.
                self._session = self.token.open()
            self._keys.clear()
        return self._session

    def _drop(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            try:
                session.close()
            except p11.PKCS11Error:
                pass

    def login(self) -> None:
        """Open the session now, so a wrong PIN is a startup error."""
        with self._lock:
            self._open()

    def find_key(self, label: str) -> _Key:
        """The secret key labelled ``label`` (raises pkcs11's NoSuchKey etc.)."""
        with self._lock:
            return self._find(label)

    def _find(self, label: str) -> _Key:
        key = self._keys.get(label)
        if key is None:
            found = self._open().get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            key = self._keys[label] = found
        return key

    def run(self, label: str, op: Callable[[_Key], T], what: str) -> T:
        """``op(key)`` under the session lock; re-login once if the session was lost."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    return op(self._find(label))
                except _SESSION_LOST as exc:
                    self._drop()
                    if attempt == 2:
                        raise self._unavailable(what, exc) from None
                except p11.PinIncorrect as exc:
                    self._drop()
                    raise self._unavailable(what, exc) from None
                except p11.NoSuchKey:
                    self._drop()
                    raise RootKeyUnavailableError(
                        f"PKCS#11 token {self.label!r} no longer has a key labelled {label!r} "
                        f"({what})"
                    ) from None
                except p11.PKCS11Error as exc:
                    # The token or its library failed (CKR_DEVICE_ERROR,
                    # CKR_GENERAL_ERROR...): not a statement about the data.
                    self._drop()
                    raise self._unavailable(what, exc) from None
            raise AssertionError("unreachable")

    def _unavailable(self, what: str, exc: BaseException) -> RootKeyUnavailableError:
        return RootKeyUnavailableError(
            f"PKCS#11 token {self.label!r} ({self.module}) failed during {what}: "
            f"{_describe(exc)}; check the token and restart if it persists"
        )

    def close(self) -> None:
        with self._lock:
            self._drop()
            self._pin = ""


_connections: dict[tuple[str, str], _TokenConnection] = {}
_connections_lock = threading.Lock()


def _release_connection(conn: _TokenConnection) -> None:
    with _connections_lock:
        conn.refs -= 1
        if conn.refs > 0:
            return
        if _connections.get((conn.module, conn.label)) is conn:
            del _connections[(conn.module, conn.label)]
    conn.close()


def _kdf(conn: _TokenConnection, label: str, info: bytes, length: int) -> SecretBytes:
    """SP 800-108 counter-mode KDF with AES-CMAC (in the token) as the PRF."""
    if not 0 < length <= 255 * 16:
        raise ValueError("bad KDF output length")
    bits = struct.pack(">I", length * 8)
    blocks = []
    for i in range(1, (length + 15) // 16 + 1):
        data = struct.pack(">I", i) + info + b"\x00" + KDF_CONTEXT + bits

        def cmac(key: _Key, data: bytes = data) -> bytes:
            return bytes(key.sign(data, mechanism=Mechanism.AES_CMAC))

        blocks.append(conn.run(label, cmac, "key derivation"))
    out = b"".join(blocks)
    if len(out) < length:
        raise RootKeyUnavailableError(
            f"PKCS#11 token {conn.label!r} returned a short AES-CMAC ({len(blocks[0])} bytes)")
    return SecretBytes(out[:length])


class _TokenKekCipher:
    """AES-256-GCM inside the token, with the RMK itself."""

    __slots__ = ("_closed", "_conn", "_label")

    def __init__(self, conn: _TokenConnection, label: str) -> None:
        self._conn = conn
        self._label = label
        self._closed = False

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        params = GCMParams(bytes(nonce), bytes(aad), GCM_TAG_BITS)
        out = self._conn.run(self._label, lambda k: k.encrypt(
            bytes(data), mechanism=Mechanism.AES_GCM, mechanism_param=params), "KEK wrapping")
        return bytes(out)

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        params = GCMParams(bytes(nonce), bytes(aad), GCM_TAG_BITS)

        def op(key: _Key) -> bytes:
            try:
                return bytes(key.decrypt(bytes(data), mechanism=Mechanism.AES_GCM,
                                         mechanism_param=params))
            except _BAD_CIPHERTEXT:
                raise InvalidTag() from None
            except _BAD_CIPHERTEXT_OR_TOKEN:
                if _token_works(key):
                    raise InvalidTag() from None  # the token is fine: the data is not
                raise  # the token failed: RootKeyUnavailableError (run)

        return self._conn.run(self._label, op, "KEK unwrapping")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release_connection(self._conn)


def _token_works(key: _Key) -> bool:
    """Whether the token still wraps and unwraps a random probe with ``key``."""
    probe = os.urandom(32)
    params = GCMParams(os.urandom(12), _PROBE_AAD, GCM_TAG_BITS)
    try:
        sealed = bytes(key.encrypt(probe, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        opened = bytes(key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params))
    except p11.PKCS11Error:
        return False
    return hmac.compare_digest(opened, probe)


class Pkcs11RootKey(RootKeyBase):
    """A root key held in a PKCS#11 token, found by its label."""

    __slots__ = ("_conn", "_key_id", "_label", "_released")

    def __init__(self, conn: _TokenConnection, label: str) -> None:
        self._conn = conn
        self._label = label
        self._released = False
        self._key_id = _kdf(conn, label, RMK_ID_INFO, RMK_ID_LEN).view().hex()

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def kind(self) -> str:
        return "pkcs11"

    @property
    def label(self) -> str:
        return self._label

    def derive(self, info: bytes, length: int = 32) -> SecretBytes:
        """SP 800-108 counter-mode KDF, AES-CMAC in the token, label ``info``."""
        return _kdf(self._conn, self._label, info, length)

    def _kek_cipher(self) -> KekCipher:
        with _connections_lock:
            self._conn.refs += 1
        return _TokenKekCipher(self._conn, self._label)

    def zeroize(self) -> None:
        """Release this object's share of the token session (no key bytes are held)."""
        if not self._released:
            self._released = True
            _release_connection(self._conn)

    def __del__(self) -> None:
        if not getattr(self, "_released", True):
            self.zeroize()

    def __repr__(self) -> str:
        return (f"Pkcs11RootKey(id={self._key_id}, token={self._conn.label!r}, "
                f"label={self._label!r})")

    __str__ = __repr__


# -- loading ------------------------------------------------------------------


# Whether this process has taken the PIN out of its environment (see _read_pin).
_pin_taken_from_environ = False


def _read_pin(config: Pkcs11Config, environ: Mapping[str, str]) -> str:
    global _pin_taken_from_environ
    env_pin = environ.get(ENV_PKCS11_PIN)
    if env_pin is not None and environ is os.environ:
        # Read once, then gone: child processes don't inherit it and nothing
        # later in this process finds it in the environment. (The kernel's copy
        # of the initial environment, /proc/PID/environ, keeps it: a PIN file
        # avoids that.)
        os.environ.pop(ENV_PKCS11_PIN, None)
        _pin_taken_from_environ = True
    if env_pin is not None and config.pin_file is not None:
        raise RootKeyConfigError(
            f"both {ENV_PKCS11_PIN} and --pkcs11-pin-file / VALV_PKCS11_PIN_FILE are set; "
            "give the token PIN one way"
        )
    if env_pin is not None:
        pin = env_pin.strip()
        if not pin:
            raise RootKeyConfigError(f"{ENV_PKCS11_PIN} is set but empty")
        return pin
    if config.pin_file is None:
        taken = (f" ({ENV_PKCS11_PIN} was removed from this process's environment when it "
                 "was first read)" if _pin_taken_from_environ else "")
        raise RootKeyConfigError(
            f"the PKCS#11 token PIN is not configured; set {ENV_PKCS11_PIN} or "
            "--pkcs11-pin-file / VALV_PKCS11_PIN_FILE (the PIN is never a command-line flag)"
            + taken
        )
    path = os.fspath(config.pin_file)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise RootKeyConfigError(
            f"cannot open PKCS#11 PIN file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RootKeyConfigError(f"PKCS#11 PIN file {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise RootKeyConfigError(
                f"PKCS#11 PIN file {path} has mode {mode:04o}, which lets group or others read "
                f"it; restrict it to the owner (chmod 600 {path})"
            )
        data = os.read(fd, _MAX_PIN_FILE_LEN + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_PIN_FILE_LEN:
        raise RootKeyConfigError(f"PKCS#11 PIN file {path} is too large to hold a PIN")
    try:
        pin = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise RootKeyConfigError(f"PKCS#11 PIN file {path} is not UTF-8 text") from None
    if not pin:
        raise RootKeyConfigError(f"PKCS#11 PIN file {path} is empty")
    return pin


def _connect(config: Pkcs11Config, environ: Mapping[str, str]) -> _TokenConnection:
    """A connection (with one reference for the caller) to the configured token."""
    if not config.module:
        raise RootKeyConfigError(
            "the pkcs11 root key source needs --pkcs11-module / VALV_PKCS11_MODULE, the path "
            "of the token's PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so)"
        )
    if not config.token_label:
        raise RootKeyConfigError(
            "the pkcs11 root key source needs --pkcs11-token-label / VALV_PKCS11_TOKEN_LABEL")
    if not config.key_labels:
        raise RootKeyConfigError(
            "the pkcs11 root key source needs --pkcs11-key-label / VALV_PKCS11_KEY_LABEL, the "
            "label(s) of the AES-256 key(s) in the token, comma-separated, oldest first")
    pin = _read_pin(config, environ)
    module, token_label = config.module, config.token_label
    if not os.path.isfile(module):
        raise RootKeyConfigError(f"PKCS#11 module {module} does not exist or is not a file")
    with _connections_lock:
        conn = _connections.get((module, token_label))
        if conn is not None:
            if not conn.pin_matches(pin):
                raise RootKeyConfigError(
                    f"wrong PIN for PKCS#11 token {token_label!r} (this process is already "
                    "logged in to it with another PIN)")
            conn.refs += 1
            return conn
        try:
            lib = pkcs11.lib(module)
        except p11.PKCS11Error as exc:
            raise RootKeyConfigError(
                f"cannot load PKCS#11 module {module}: {_describe(exc)}") from None
        try:
            token = lib.get_token(token_label=token_label)
        except p11.NoSuchToken:
            labels = sorted({t.label for t in _tokens(lib) if t.label})
            raise RootKeyConfigError(
                f"PKCS#11 module {module} has no token labelled {token_label!r} (tokens: "
                f"{', '.join(repr(x) for x in labels) or 'none'})") from None
        except p11.MultipleTokensReturned:
            raise RootKeyConfigError(
                f"PKCS#11 module {module} has several tokens labelled {token_label!r}; give "
                "each token a unique label") from None
        except p11.PKCS11Error as exc:
            raise RootKeyConfigError(
                f"cannot list the tokens of PKCS#11 module {module}: {_describe(exc)}") from None
        _check_mechanisms(token, module)
        conn = _TokenConnection(module, token, pin)
        try:
            conn.login()
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange):
            raise RootKeyConfigError(
                f"wrong PIN for PKCS#11 token {token_label!r} (the user PIN, from "
                f"{ENV_PKCS11_PIN} or the PIN file)") from None
        except p11.PinLocked:
            raise RootKeyConfigError(
                f"the user PIN of PKCS#11 token {token_label!r} is locked; unlock it with the "
                "security officer PIN") from None
        except p11.PKCS11Error as exc:
            raise RootKeyConfigError(
                f"cannot log in to PKCS#11 token {token_label!r}: {_describe(exc)}") from None
        conn.refs = 1
        _connections[(module, token_label)] = conn
        return conn


def _tokens(lib: Pkcs11Lib) -> Iterable[pkcs11.Token]:
    try:
        return list(lib.get_tokens())
    except p11.PKCS11Error:
        return []


def _check_mechanisms(token: pkcs11.Token, module: str) -> None:
    try:
        mechanisms = set(token.slot.get_mechanisms())
    except p11.PKCS11Error as exc:
        raise RootKeyConfigError(
            f"cannot list the mechanisms of PKCS#11 token {token.label!r}: {_describe(exc)}"
        ) from None
    missing = [m.name for m in (Mechanism.AES_GCM, Mechanism.AES_CMAC) if m not in mechanisms]
    if missing:
        raise RootKeyConfigError(
            f"PKCS#11 token {token.label!r} ({module}) does not offer {', '.join(missing)}, "
            "which Valv needs to wrap KEKs (AES-GCM) and derive subkeys (AES-CMAC)"
        )


# Attributes that together say a key was generated in the token and has never
# been outside it in clear (PKCS#11 sets them; no one can set them to true).
_ORIGIN_ATTRIBUTES = (
    (Attribute.LOCAL, "CKA_LOCAL"),
    (Attribute.ALWAYS_SENSITIVE, "CKA_ALWAYS_SENSITIVE"),
    (Attribute.NEVER_EXTRACTABLE, "CKA_NEVER_EXTRACTABLE"),
)


def _check_key(conn: _TokenConnection, label: str, *, allow_imported: bool = False) -> None:
    where = f"key {label!r} in PKCS#11 token {conn.label!r}"
    try:
        key = conn.find_key(label)
    except p11.NoSuchKey:
        raise RootKeyConfigError(
            f"PKCS#11 token {conn.label!r} has no secret key labelled {label!r}; create one "
            f"with `valv rmk pkcs11-keygen --pkcs11-key-label {label}`") from None
    except p11.MultipleObjectsReturned:
        raise RootKeyConfigError(
            f"PKCS#11 token {conn.label!r} has several secret keys labelled {label!r}; "
            "give the root key a unique label") from None
    except p11.PKCS11Error as exc:
        raise RootKeyConfigError(f"cannot find {where}: {_describe(exc)}") from None
    try:
        key_type = key[Attribute.KEY_TYPE]
        size = key[Attribute.VALUE_LEN]
        flags = {a: bool(key[a]) for a in (Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                                           Attribute.ENCRYPT, Attribute.DECRYPT,
                                           Attribute.SIGN)}
        origin = {name: _flag(key, attribute) for attribute, name in _ORIGIN_ATTRIBUTES}
    except p11.PKCS11Error as exc:
        raise RootKeyConfigError(f"cannot read the attributes of {where}: {_describe(exc)}"
                                 ) from None
    if key_type != KeyType.AES or size != ROOT_KEY_SIZE:
        raise RootKeyConfigError(f"{where} must be an AES-256 key (it is {key_type!r}, "
                                 f"{size} bytes)")
    if flags[Attribute.EXTRACTABLE] or not flags[Attribute.SENSITIVE]:
        raise RootKeyConfigError(
            f"{where} can leave the token (CKA_EXTRACTABLE or not CKA_SENSITIVE); a root key "
            "must be sensitive and non-extractable")
    unproven = [name for name, value in origin.items() if value is not True]
    if unproven:
        if not allow_imported:
            raise RootKeyConfigError(
                f"{where} was not generated in the token and kept secret there ever since "
                f"(not {', '.join(unproven)}): its value may exist outside the token, e.g. "
                "if it was imported in clear. Create the root key in the token with `valv rmk "
                "pkcs11-keygen`, or, for a key you deliberately moved into the token, pass "
                "--pkcs11-allow-imported-key (VALV_PKCS11_ALLOW_IMPORTED_KEY=1)")
        log.warning(
            "PKCS#11 root key %r in token %r was not generated in the token (not %s); "
            "accepted because --pkcs11-allow-imported-key is set: whoever held its value "
            "outside the token can decrypt every key it protects",
            label, conn.label, ", ".join(unproven),
            extra={"fields": {"key_label": label, "token": conn.label,
                              "not_set": unproven}})
    lacking = [a.name for a in (Attribute.ENCRYPT, Attribute.DECRYPT, Attribute.SIGN)
               if not flags[a]]
    if lacking:
        raise RootKeyConfigError(
            f"{where} does not allow {', '.join(lacking)}; Valv needs encrypt and decrypt "
            "(AES-GCM wrapping) and sign (AES-CMAC key derivation)")


def _flag(key: _Key, attribute: Attribute) -> bool | None:
    """A boolean attribute of ``key``; None if the token does not report it."""
    try:
        return bool(key[attribute])
    except (p11.AttributeTypeInvalid, p11.AttributeSensitive):
        return None


def open_token_keys(config: Pkcs11Config,
                    environ: Mapping[str, str] | None = None) -> list[Pkcs11RootKey]:
    """The configured token keys, oldest first. Raises RootKeyConfigError with a
    one-line reason for any misconfiguration (module, token, PIN, key, mechanism)."""
    env = os.environ if environ is None else environ
    labels = [label.strip() for label in config.key_labels if label.strip()]
    conn = _connect(Pkcs11Config(config.module, config.token_label, tuple(labels),
                                 config.pin_file), env)
    keys: list[Pkcs11RootKey] = []
    try:
        for label in labels:
            _check_key(conn, label, allow_imported=config.allow_imported_key)
            with _connections_lock:
                conn.refs += 1
            try:
                keys.append(Pkcs11RootKey(conn, label))
            except BaseException:
                _release_connection(conn)
                raise
    except BaseException:
        for key in keys:
            key.zeroize()
        raise
    finally:
        _release_connection(conn)
    return keys


def generate_token_key(config: Pkcs11Config, label: str,
                       environ: Mapping[str, str] | None = None) -> str:
    """Create a new non-extractable AES-256 root key labelled ``label`` in the token.

    Returns its RMK id. Refuses if a key with that label exists.
    """
    env = os.environ if environ is None else environ
    conn = _connect(Pkcs11Config(config.module, config.token_label, (label,),
                                 config.pin_file), env)
    try:
        try:
            conn.find_key(label)
        except p11.NoSuchKey:
            pass
        except p11.MultipleObjectsReturned:
            raise RootKeyConfigError(
                f"PKCS#11 token {conn.label!r} already has keys labelled {label!r}") from None
        else:
            raise RootKeyConfigError(
                f"PKCS#11 token {conn.label!r} already has a key labelled {label!r}; "
                "refusing to create another")
        try:
            with conn.token.open(rw=True) as session:  # the login is per application
                session.generate_key(
                    KeyType.AES, ROOT_KEY_SIZE * 8, label=label, store=True,
                    template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                              Attribute.SIGN: True, Attribute.VERIFY: True,
                              Attribute.WRAP: False, Attribute.UNWRAP: False,
                              Attribute.DERIVE: False, Attribute.MODIFIABLE: False})
        except p11.PKCS11Error as exc:
            raise RootKeyConfigError(
                f"cannot create key {label!r} in PKCS#11 token {conn.label!r}: {_describe(exc)}"
            ) from None
        _check_key(conn, label)
        with _connections_lock:
            conn.refs += 1
        key = Pkcs11RootKey(conn, label)
        try:
            return key.key_id
        finally:
            key.zeroize()
    finally:
        _release_connection(conn)

