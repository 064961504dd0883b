"""Test support for root keys: key files, a SoftHSM2 token, the sqlite file's seals.

The SoftHSM2 token lives in a temp dir made once per test process, named by
``SOFTHSM2_CONF`` in this process's environment (so the in-process PKCS#11
library and every central or ``valv rmk`` subprocess see the same token).
Tests that need it are skipped, with the reason, only where the library is
not installed; ``.ci/run`` installs it, so in CI they run.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from valv.core.storage.sealed import rmk_id_of

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "valv-test"
SO_PIN = "87654321"
USER_PIN = "1234-user-pin"


def write_key_file(path: Path, material: bytes | None = None) -> Path:
    """A root key file (base64 of 32 random bytes, mode 0600)."""
    path.write_bytes(base64.b64encode(material or os.urandom(32)) + b"\n")
    path.chmod(0o600)
    return path


def run_valv(*args: str, env: dict[str, str] | None = None, timeout: float = 120
             ) -> subprocess.CompletedProcess[str]:
    """``python -m valv ARGS`` with this process's environment, less any VALV_
    settings from the developer's shell, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VALV_")}
    return subprocess.run([sys.executable, "-m", "valv", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, timeout=timeout)


def assert_config_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2 with one clear ``error:`` line on stderr, no traceback; returns the line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def sealed_values(db: Path) -> Iterator[tuple[bytes, bytes]]:
    """Every (key, sealed value) in a store's sqlite file (a live one too: WAL)."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT k, v FROM kv ORDER BY k").fetchall()
    for key, value in rows:
        yield bytes(key), bytes(value)


def seal_ids(db: Path) -> dict[str, int]:
    """How many values in the sqlite file are sealed under each RMK id."""
    counts: dict[str, int] = {}
    for key, value in sealed_values(db):
        rmk = rmk_id_of(value, key)
        counts[rmk] = counts.get(rmk, 0) + 1
    return counts


def find_softhsm_module() -> str | None:
    for path in SOFTHSM_MODULES:
        if os.path.isfile(path):
            return path
    return None


class SoftHsm:
    """One initialised SoftHSM2 token for this test process."""

    def __init__(self, module: str, root: Path) -> None:
        self.module = module
        self.root = root
        self.conf = root / "softhsm2.conf"
        (root / "tokens").mkdir()
        self.conf.write_text(f"directories.tokendir = {root / 'tokens'}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", TOKEN_LABEL,
                        "--so-pin", SO_PIN, "--pin", USER_PIN],
                       check=True, capture_output=True, env=os.environ.copy())
        self.token_label = TOKEN_LABEL
        self.pin = USER_PIN

    def _session(self) -> Any:
        import pkcs11

        token = pkcs11.lib(self.module).get_token(token_label=self.token_label)
        try:
            return token.open(rw=True, user_pin=self.pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            return token.open(rw=True)  # Valv in this process is logged in already

    def create_key(self, label: str, *, extractable: bool = False, sensitive: bool = True,
                   sign: bool = True, bits: int = 256) -> None:
        """An AES key made with python-pkcs11, non-extractable unless asked."""
        from pkcs11 import Attribute, KeyType

        with self._session() as session:
            session.generate_key(
                KeyType.AES, bits, label=label, store=True,
                template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                          Attribute.SENSITIVE: sensitive, Attribute.EXTRACTABLE: extractable,
                          Attribute.ENCRYPT: True, Attribute.DECRYPT: True,
                          Attribute.SIGN: sign, Attribute.VERIFY: sign})

    def key_attributes(self, label: str) -> dict[str, Any]:
        """What the token says about a key; ``value`` is whether its bytes can be read."""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass

        with self._session() as session:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            try:
                key[Attribute.VALUE]
                readable = True
            except pkcs11.exceptions.AttributeSensitive:
                readable = False
            return {"extractable": key[Attribute.EXTRACTABLE],
                    "sensitive": key[Attribute.SENSITIVE],
                    "never_extractable": key[Attribute.NEVER_EXTRACTABLE],
                    "value_readable": readable}

    def cmac(self, label: str, data: bytes) -> bytes:
        from pkcs11 import Mechanism, ObjectClass

        with self._session() as session:
            key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=label)
            return bytes(key.sign(data, mechanism=Mechanism.AES_CMAC))

    def env(self, *key_labels: str, pin: str | None = None) -> dict[str, str]:
        """Environment that makes a Valv process use these token keys (oldest first)."""
        return {"VALV_PKCS11_MODULE": self.module, "VALV_PKCS11_TOKEN_LABEL": self.token_label,
                "VALV_PKCS11_KEY_LABEL": ",".join(key_labels),
                "VALV_PKCS11_PIN": self.pin if pin is None else pin}


_softhsm: SoftHsm | None = None


def softhsm() -> SoftHsm:
    """The process's SoftHSM2 token; skips the test if SoftHSM2 is not installed."""
    global _softhsm
    if _softhsm is not None:
        return _softhsm
    module = find_softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        pytest.skip("python-pkcs11 is not installed (pip install -e '.[test]')")
    root = Path(tempfile.mkdtemp(prefix="valv-softhsm-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _softhsm = SoftHsm(module, root)
    return _softhsm
