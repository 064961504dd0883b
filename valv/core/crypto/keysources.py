"""Where root master keys come from: files, the environment, or a PKCS#11 token.

Sources (docs/crypto.md "Root key sources"):

- ``file``: ``VALV_MASTER_KEY_FILE``, one or more key files, oldest first.
- ``env``: ``VALV_MASTER_KEY``, base64 of 32 bytes; several keys may be given
  comma-separated, oldest first.
- ``pkcs11``: AES-256 keys in a PKCS#11 token, by label, oldest first
  (``VALV_PKCS11_KEY_LABEL``), with the module, token label and PIN.

The **selected** source (``--master-key-source`` / ``VALV_MASTER_KEY_SOURCE``)
holds the newest key, the one that wraps and seals: the last key it lists.
Keys of any other configured source are older keys, kept only so that what
they wrapped can still be read while an RMK rotation moves it over (e.g. from
a key file to a token). Left unset, the source is the one that is configured;
if several are, Valv refuses to guess. With nothing configured at all, the
development key in the data dir is used (and a loud warning logged by the
caller; central refuses that when authentication is configured, unless told
otherwise: :func:`configured_sources` says whether anything is configured).
Any misconfiguration is a :class:`RootKeyConfigError`: there is
never a fallback to a derived, zero or development key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from valv.core.crypto.errors import RootKeyConfigError
from valv.core.crypto.rootkey import (
    DEV_ROOT_KEY_FILENAME,
    RootKeyBase,
    RootKeyring,
    load_or_create_dev_root_key,
    load_root_key_file,
    parse_root_key_text,
)

__all__ = [
    "ENV_MASTER_KEY",
    "ENV_PKCS11_PIN",
    "SOURCES",
    "LoadedRootKeys",
    "Pkcs11Config",
    "RootKeyConfig",
    "configured_sources",
    "load_keyring",
]

SOURCES = ("file", "env", "pkcs11")
ENV_MASTER_KEY = "VALV_MASTER_KEY"
ENV_PKCS11_PIN = "VALV_PKCS11_PIN"


@dataclass(frozen=True, slots=True)
class Pkcs11Config:
    """Where the token keys are. The PIN is not here: it is read at load time
    from ``VALV_PKCS11_PIN`` (then removed from the process's environment) or
    from ``pin_file``, never from the command line."""

    module: str | None = None
    token_label: str | None = None
    key_labels: tuple[str, ...] = ()
    pin_file: Path | None = None
    # Accept keys that were not generated in the token (no CKA_LOCAL,
    # CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE), e.g. imported from a
    # key file: --pkcs11-allow-imported-key.
    allow_imported_key: bool = False

    @classmethod
    def from_flags(cls, module: str | None, token_label: str | None, key_labels: str | None,
                   pin_file: str | None, *, allow_imported_key: bool = False) -> Pkcs11Config:
        """From flag values; ``key_labels`` comma-separated, oldest first."""
        labels = tuple(x.strip() for x in (key_labels or "").split(",") if x.strip())
        return cls(module=module or None, token_label=token_label or None, key_labels=labels,
                   pin_file=Path(pin_file) if pin_file else None,
                   allow_imported_key=allow_imported_key)

    @property
    def configured(self) -> bool:
        return bool(self.module or self.token_label or self.key_labels or self.pin_file)


@dataclass(frozen=True, slots=True)
class RootKeyConfig:
    """The root key settings of a process (central, fsck, rmk rotate)."""

    source: str | None = None  # None: the one configured (or the dev key)
    files: tuple[Path, ...] = ()
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)


@dataclass(slots=True)
class LoadedRootKeys:
    keyring: RootKeyring
    source: str  # "file", "env", "pkcs11" or "dev"
    dev_key_path: Path | None = None  # set when the development key is in use
    dev_key_created: bool = False


def configured_sources(config: RootKeyConfig,
                       environ: Mapping[str, str] | None = None) -> list[str]:
    """The root key sources ``config`` and the environment configure; empty: the dev key."""
    return _configured_sources(config, os.environ if environ is None else environ)


def _configured_sources(config: RootKeyConfig, environ: Mapping[str, str]) -> list[str]:
    found = []
    if config.files:
        found.append("file")
    if ENV_MASTER_KEY in environ:
        found.append("env")
    if config.pkcs11.configured:
        found.append("pkcs11")
    return found


def _env_keys(environ: Mapping[str, str]) -> list[RootKeyBase]:
    text = environ.get(ENV_MASTER_KEY, "")
    parts = [p for p in (part.strip() for part in text.split(",")) if p]
    if not parts:
        raise RootKeyConfigError(
            f"{ENV_MASTER_KEY} is set but empty; set it to base64 of 32 random bytes "
            "(several comma-separated, oldest first), or unset it"
        )
    keys: list[RootKeyBase] = []
    try:
        for i, part in enumerate(parts, 1):
            what = (ENV_MASTER_KEY if len(parts) == 1
                    else f"{ENV_MASTER_KEY} (key {i} of {len(parts)})")
            keys.append(parse_root_key_text(part, what))
    except BaseException:
        _release(keys)
        raise
    return keys


def _load_source(source: str, config: RootKeyConfig,
                 environ: Mapping[str, str]) -> list[RootKeyBase]:
    if source == "file":
        if not config.files:
            raise RootKeyConfigError(
                "--master-key-source is file but no key file is configured; set "
                "--master-key-file / VALV_MASTER_KEY_FILE"
            )
        keys: list[RootKeyBase] = []
        try:
            for path in config.files:
                keys.append(load_root_key_file(path))
        except BaseException:
            _release(keys)
            raise
        return keys
    if source == "env":
        if ENV_MASTER_KEY not in environ:
            raise RootKeyConfigError(
                f"--master-key-source is env but {ENV_MASTER_KEY} is not set; set it to base64 "
                "of 32 random bytes"
            )
        return _env_keys(environ)
    if source == "pkcs11":
        try:
            from valv.core.crypto.pkcs11 import open_token_keys  # optional dependency
        except ImportError as exc:
            raise RootKeyConfigError(
                f"the pkcs11 root key source needs python-pkcs11 ({exc}); install it with "
                "`pip install 'valv[pkcs11]'`"
            ) from None
        return list(open_token_keys(config.pkcs11, environ))
    raise RootKeyConfigError(
        f"unknown root key source {source!r}; use one of {', '.join(SOURCES)}"
    )


def _release(keys: list[RootKeyBase]) -> None:
    for key in keys:
        key.zeroize()


def load_keyring(config: RootKeyConfig, *, data_dir: Path, create_dev_key: bool = True,
                 environ: Mapping[str, str] | None = None) -> LoadedRootKeys:
    """Load every configured root key into a keyring (newest last).

    ``create_dev_key=False`` (tools such as fsck) uses an existing development
    key but never creates one. The caller logs the development-key warning.
    """
    env = os.environ if environ is None else environ
    source = (config.source or "").strip().lower() or None
    if source is not None and source not in SOURCES:
        raise RootKeyConfigError(
            f"unknown root key source {config.source!r}; use one of {', '.join(SOURCES)}"
        )
    configured = _configured_sources(config, env)
    if source is None:
        if len(configured) > 1:
            raise RootKeyConfigError(
                f"root keys are configured in several sources ({', '.join(configured)}); set "
                "--master-key-source / VALV_MASTER_KEY_SOURCE to the one that holds the newest "
                "key (the others are then kept as older keys for an RMK rotation)"
            )
        if not configured:
            path = data_dir / DEV_ROOT_KEY_FILENAME
            if create_dev_key:
                key, created = load_or_create_dev_root_key(data_dir)
            else:
                key, created = load_root_key_file(path), False
            try:
                ring = RootKeyring([key])
            finally:
                key.zeroize()  # the keyring keeps only derived subkeys
            return LoadedRootKeys(ring, "dev", dev_key_path=path, dev_key_created=created)
        source = configured[0]
    keys: list[RootKeyBase] = []
    try:
        for other in configured:
            if other != source:
                keys.extend(_load_source(other, config, env))
        keys.extend(_load_source(source, config, env))
        ring = RootKeyring(keys)
    finally:
        _release(keys)  # the keyring keeps only what it derived or opened
    return LoadedRootKeys(ring, source)
