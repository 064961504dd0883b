"""The sidecar end to end: real ``valv central`` and ``valv sidecar`` processes, driven
through Google's official client (google.cloud.kms_v1) over TCP and the unix socket.

What is checked (DESIGN.md §5):

- ciphertexts made by either side open on the other, with and without AAD;
- the sidecar answers a table of bad, refused and good Encrypt/Decrypt requests
  exactly as central does (status, message, details), in dev mode and with
  authentication (the sidecar's principal holding only some roles);
- every other RPC is forwarded and keeps central's status and message;
- revocations (disable, destroy, a new primary, an IAM binding removed, a change
  made through a second central) reach a sidecar that served the key from its
  cache a moment before, in under a second;
- a central outage: cached keys serve until their TTL, then UNAVAILABLE, never
  open; a restarted central is picked up again;
- the cache limits (TTL, max uses) and miss coalescing, counted from /metrics;
- no plaintext and no KEK in either process's logs;
- usage the sidecar served reaches central's audit log;
- the sidecar reaches central over mTLS, acting as its certificate's identity;
- the unix socket is 0600 and a non-loopback listen address is refused.

No fixed sleeps: every wait polls a condition with a deadline (tests.helpers.wait_for).
Measured revocation latencies are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcAsyncIOTransport,
)
from grpclib.client import Channel

from tests.helpers import CALL, STARTUP_DEADLINE_S, CentralProcess, wait_for
from tests.sidecar_support import (
    As,
    SidecarProcess,
    central_on_same_port,
    failure,
    kms_client,
    write_policy,
    write_tokens,
)
from tests.test_tls import CA, SPIFFE_ID
from valv._proto.valv.sidecar import v1 as sidecar_pb
from valv.core.material import open_sealed

ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
VState = kms_v1.CryptoKeyVersion.CryptoKeyVersionState

KIB64 = 64 * 1024
# Ciphertext framing (DESIGN.md §3): header 21 bytes, nonce 12, tag 16.
HEADER_LEN, NONCE_LEN, TAG_LEN = 21, 12, 16
MAX_CIPHERTEXT = KIB64 + HEADER_LEN + NONCE_LEN + TAG_LEN

REVOCATION_BOUND_S = 1.0
# Measured in this run: printed by each revocation test and once more at the end.
LATENCIES: dict[str, float] = {}

ADMIN = "user:admin@example.com"
APP = "serviceAccount:app@example.com"
SIDECAR = "serviceAccount:sidecar@example.com"
TOKENS = {member: f"token-{uuid.uuid4().hex}" for member in (ADMIN, APP, SIDECAR)}

ENCRYPTER = "roles/cloudkms.cryptoKeyEncrypter"
DECRYPTER = "roles/cloudkms.cryptoKeyDecrypter"
ENCRYPTER_DECRYPTER = "roles/cloudkms.cryptoKeyEncrypterDecrypter"
SIDECAR_ROLE = "roles/valv.sidecar"

# Flags of the shared centrals: versions can be destroyed (for real) within seconds.
FAST_DESTROY = ("--min-destroy-duration", "1", "--scheduler-interval", "0.2")


def crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


def new_project() -> str:
    return f"p-{uuid.uuid4().hex[:12]}"


def make_ring(admin: Any, project: str | None = None) -> str:
    location = f"projects/{project or new_project()}/locations/global"
    return str(admin.create_key_ring(parent=location, key_ring_id="ring", key_ring={}).name)


def make_key(admin: Any, ring: str, key_id: str = "key", **crypto_key: Any) -> str:
    return str(admin.create_crypto_key(parent=ring, crypto_key_id=key_id,
                                       crypto_key={"purpose": ENCRYPT_DECRYPT, **crypto_key}).name)


def set_state(admin: Any, version: str, state: int) -> None:
    admin.update_crypto_key_version(crypto_key_version={"name": version, "state": state},
                                    update_mask={"paths": ["state"]})


def grant(admin: Any, key: str, bindings: dict[str, list[str]]) -> None:
    admin.set_iam_policy(resource=key, policy={"bindings": [
        {"role": role, "members": members} for role, members in bindings.items()]})


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after[name] - before[name]


def sidecar_metrics_delta(sidecar: SidecarProcess, action: Callable[[], Any],
                          ) -> tuple[Any, dict[str, float]]:
    """Run ``action`` and return its result and how every sidecar counter moved."""
    before = sidecar.metrics()
    result = action()
    after = sidecar.metrics()
    return result, {name: after[name] - before[name] for name in after}


@pytest.fixture(scope="module", autouse=True)
def latency_summary() -> Iterator[None]:
    yield
    if LATENCIES:
        print("\nrevocation latencies (change sent -> the sidecar refuses Encrypt and Decrypt): "
              + ", ".join(f"{what} {seconds * 1000:.0f} ms"
                          for what, seconds in LATENCIES.items()))


# ---- processes shared by the tests that don't disturb each other ---------------------------------


@dataclass
class Pair:
    """A central, a sidecar attached to it, and the clients tests use."""

    central: CentralProcess
    sidecar: SidecarProcess
    admin: Any  # manages keys at central
    maker: Any  # may encrypt/decrypt with every key at central (makes ciphertexts)
    direct: Any  # at central, as the sidecar's own identity
    local: Any  # through the sidecar (TCP)
    mode: str
    # The flags that give another sidecar the same identity (a token file).
    identity: tuple[str, ...] = ()

    def spawn_sidecar(self, work: Path, *extra_args: str) -> SidecarProcess:
        """Another sidecar of this central, with the same identity, started (and ready).

        Tests that count fetches make their keys before they start such a sidecar: its
        watch stream begins at the log's head, so no event about that setup can arrive
        after its first fetch and drop the material (which would cost a second fetch).
        """
        return SidecarProcess(work, self.central.addr, *self.identity, *extra_args).start()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Dev mode (everyone is user:dev): a central and a sidecar with a unix socket."""
    work = tmp_path_factory.mktemp("dev")
    central = CentralProcess(work / "central", *FAST_DESTROY).start()
    sidecar = SidecarProcess(work, central.addr, "--unix-socket", str(work / "kms.sock"))
    try:
        sidecar.start()
        direct = As(central.client(), None)
        yield Pair(central, sidecar, admin=direct, maker=direct, direct=direct,
                   local=As(sidecar.client(), None), mode="dev")
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0, sidecar.logs()
        central.stop()


def start_authenticated_central(home: Path, *extra: str,
                                sidecars: tuple[str, ...] = (SIDECAR,)) -> CentralProcess:
    """Static tokens for ADMIN (cloudkms.admin everywhere), APP (encrypterDecrypter
    everywhere) and SIDECAR (a sidecar identity, with nothing but what a test grants
    it on keys)."""
    home.mkdir(parents=True, exist_ok=True)
    tokens = write_tokens(home / "tokens.json", TOKENS)
    policy = write_policy(home / "root-policy.json", {"roles/cloudkms.admin": [ADMIN],
                                                      ENCRYPTER_DECRYPTER: [APP],
                                                      SIDECAR_ROLE: list(sidecars)})
    return CentralProcess(home / "central", "--tokens-file", str(tokens),
                          "--root-policy-file", str(policy), "--dev-root-key",
                          *FAST_DESTROY, *extra).start()


def sidecar_token_file(home: Path) -> Path:
    path = home / "sidecar.token"
    path.write_text(TOKENS[SIDECAR] + "\n")
    return path


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """Authenticated: the sidecar calls central as SIDECAR (its token file)."""
    work = tmp_path_factory.mktemp("auth")
    central = start_authenticated_central(work)
    identity = ("--token-file", str(sidecar_token_file(work)))
    sidecar = SidecarProcess(work, central.addr, *identity)
    try:
        sidecar.start()
        client = central.client()
        yield Pair(central, sidecar, admin=As(client, TOKENS[ADMIN]),
                   maker=As(client, TOKENS[APP]), direct=As(client, TOKENS[SIDECAR]),
                   local=As(sidecar.client(), None), mode="auth", identity=identity)
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0, sidecar.logs()
        central.stop()


# ---- 1. ciphertext interop -----------------------------------------------------------------------


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_ciphertexts_interoperate_both_ways(dev: Pair, via: str) -> None:
    key = make_key(dev.admin, make_ring(dev.admin))
    local = As(dev.sidecar.client() if via == "tcp" else dev.sidecar.unix_client(), None)
    direct = dev.direct

    def round_trips() -> None:
        for aad in (b"", b"context: tenant=42"):
            extra = {"additional_authenticated_data": aad} if aad else {}
            # sidecar Encrypt -> central Decrypt
            plaintext = os.urandom(32)
            made = local.encrypt(name=key, plaintext=plaintext, plaintext_crc32c=crc32c(plaintext),
                                 **extra)
            assert made.name == f"{key}/cryptoKeyVersions/1"
            assert made.verified_plaintext_crc32c
            assert made.ciphertext_crc32c == crc32c(made.ciphertext)
            opened = direct.decrypt(name=key, ciphertext=made.ciphertext, **extra)
            assert opened.plaintext == plaintext and opened.used_primary
            if aad:  # the AAD is bound: central refuses the sidecar's ciphertext without it
                assert isinstance(failure(lambda c=made.ciphertext: direct.decrypt(
                    name=key, ciphertext=c)), gexc.InvalidArgument)
            # central Encrypt -> sidecar Decrypt
            plaintext = os.urandom(32)
            made = direct.encrypt(name=key, plaintext=plaintext, **extra)
            opened = local.decrypt(name=key, ciphertext=made.ciphertext,
                                   ciphertext_crc32c=crc32c(made.ciphertext), **extra)
            assert opened.plaintext == plaintext and opened.used_primary
            assert opened.plaintext_crc32c == crc32c(plaintext)
            if aad:
                assert isinstance(failure(lambda c=made.ciphertext: local.decrypt(
                    name=key, ciphertext=c, additional_authenticated_data=b"other")),
                    gexc.InvalidArgument)

    _, moved = sidecar_metrics_delta(dev.sidecar, round_trips)
    # Answered in the sidecar: 4 good calls, nothing forwarded, material of both purposes.
    assert moved["valv_sidecar_local_calls_total"] == 4
    assert moved["valv_sidecar_forwarded_calls_total"] == 0
    assert moved["valv_sidecar_central_fetches_total"] >= 2


# ---- 2. identical answers ------------------------------------------------------------------------


@dataclass
class World:
    """Keys and ciphertexts in every state the table needs, made before any sidecar call."""

    pair: Pair
    location: str
    ring: str
    keys: dict[str, str]
    ciphertexts: dict[str, bytes]

    def version(self, key: str, n: int) -> str:
        return f"{self.keys[key]}/cryptoKeyVersions/{n}"


def build_world(pair: Pair) -> World:
    admin, maker = pair.admin, pair.maker
    ring = make_ring(admin)
    location = ring.rsplit("/keyRings/", 1)[0]
    keys = {name: make_key(admin, ring, name) for name in
            ("a", "other", "offp", "enc-only", "dec-only", "none")}
    keys["d"] = make_key(admin, ring, "d", destroy_scheduled_duration=timedelta(seconds=1))
    a, d = keys["a"], keys["d"]
    for _ in range(3):  # a: v2 (to disable), v3 (to schedule for destruction), v4 (enabled)
        admin.create_crypto_key_version(parent=a, crypto_key_version={})
    admin.create_crypto_key_version(parent=d, crypto_key_version={})
    if pair.mode == "auth":
        for name in ("a", "d", "other", "offp"):
            grant(admin, keys[name], {ENCRYPTER_DECRYPTER: [SIDECAR]})
        grant(admin, keys["enc-only"], {ENCRYPTER: [SIDECAR]})
        grant(admin, keys["dec-only"], {DECRYPTER: [SIDECAR]})

    def encrypt(name: str, aad: bytes = b"") -> bytes:
        return bytes(maker.encrypt(name=name, plaintext=b"the DEK",
                                   additional_authenticated_data=aad).ciphertext)

    ciphertexts = {
        "a1": encrypt(a, b"aad"),
        "a2": encrypt(f"{a}/cryptoKeyVersions/2"),
        "a3": encrypt(f"{a}/cryptoKeyVersions/3"),
        "a4": encrypt(f"{a}/cryptoKeyVersions/4"),
        "d2": encrypt(f"{d}/cryptoKeyVersions/2"),
        "other": encrypt(keys["other"], b"aad"),
        "offp": encrypt(keys["offp"]),
        "enc-only": encrypt(keys["enc-only"]),
        "dec-only": encrypt(keys["dec-only"]),
        "none": encrypt(keys["none"]),
    }
    set_state(admin, f"{a}/cryptoKeyVersions/2", VState.DISABLED)
    admin.destroy_crypto_key_version(name=f"{a}/cryptoKeyVersions/3")
    set_state(admin, f"{keys['offp']}/cryptoKeyVersions/1", VState.DISABLED)
    admin.destroy_crypto_key_version(name=f"{d}/cryptoKeyVersions/2")
    wait_for(lambda: admin.get_crypto_key_version(name=f"{d}/cryptoKeyVersions/2").state
             == VState.DESTROYED, deadline_s=15, what="d/2 to be destroyed", interval_s=0.05)
    return World(pair, location, ring, keys, ciphertexts)


@pytest.fixture(scope="module")
def dev_world(dev: Pair) -> World:
    return build_world(dev)


@pytest.fixture(scope="module")
def auth_world(auth: Pair) -> World:
    return build_world(auth)


def with_header_version(ciphertext: bytes, version_id: int) -> bytes:
    return ciphertext[:1] + struct.pack(">I", version_id) + ciphertext[5:]


def flip(ciphertext: bytes, index: int) -> bytes:
    data = bytearray(ciphertext)
    data[index] ^= 0x01
    return bytes(data)


# Where the sidecar answers: "local" (its own AEAD, nothing forwarded), "fetch" (central
# refused the material: relayed, nothing forwarded), "forward" (not a valid request: central
# answers it), "fetch-then-forward" (refused at the fetch, then forwarded for central's exact
# words). A pair (dev, auth) when the modes differ; None: not checked.
Where = str | tuple[str, str] | None
Case = tuple[str, str, Callable[[World], dict[str, Any]], Where]
W = World

CASES: list[Case] = [
    # -- Encrypt
    ("enc-ok", "encrypt", lambda w: {"name": w.keys["a"], "plaintext": b"dek"}, "local"),
    ("enc-ok-aad-crcs", "encrypt", lambda w: {
        "name": w.keys["a"], "plaintext": b"dek", "plaintext_crc32c": crc32c(b"dek"),
        "additional_authenticated_data": b"ctx",
        "additional_authenticated_data_crc32c": crc32c(b"ctx")}, "local"),
    ("enc-max-plaintext", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"p" * KIB64,
                "additional_authenticated_data": b"a" * KIB64}, "local"),
    ("enc-empty-plaintext", "encrypt", lambda w: {"name": w.keys["a"], "plaintext": b""},
     None),
    # A CRC32C wrapper that is present with value 0 is not an absent one.
    ("enc-empty-plaintext-crc-zero", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"", "plaintext_crc32c": 0,
                "additional_authenticated_data_crc32c": 0}, None),
    ("enc-plaintext-crc-zero", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x", "plaintext_crc32c": 0}, None),
    ("enc-aad-crc-zero", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x", "additional_authenticated_data": b"a",
                "additional_authenticated_data_crc32c": 0}, None),
    ("enc-plaintext-crc-huge", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x", "plaintext_crc32c": 2**63 - 1}, None),
    ("enc-plaintext-crc-plus-2-32", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x",
                "plaintext_crc32c": crc32c(b"x") + 2**32}, None),
    ("enc-unicode-name", "encrypt",
     lambda w: {"name": f"{w.ring}/cryptoKeys/k\u00e9y", "plaintext": b"x"}, "forward"),
    ("enc-empty-name", "encrypt", lambda w: {"name": "", "plaintext": b"x"}, "forward"),
    ("enc-bad-name", "encrypt", lambda w: {"name": "not/a/key", "plaintext": b"x"}, "forward"),
    ("enc-bad-id", "encrypt",
     lambda w: {"name": f"{w.ring}/cryptoKeys/bad id!", "plaintext": b"x"}, "forward"),
    ("enc-key-ring-name", "encrypt", lambda w: {"name": w.ring, "plaintext": b"x"}, "forward"),
    ("enc-oversize-plaintext", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"p" * (KIB64 + 1)}, "forward"),
    ("enc-oversize-aad", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x",
                "additional_authenticated_data": b"a" * (KIB64 + 1)}, "forward"),
    ("enc-oversize-no-permission", "encrypt",
     lambda w: {"name": w.keys["none"], "plaintext": b"p" * (KIB64 + 1)}, "forward"),
    ("enc-plaintext-crc-mismatch", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x", "plaintext_crc32c": crc32c(b"y")},
     "forward"),
    ("enc-aad-crc-mismatch", "encrypt",
     lambda w: {"name": w.keys["a"], "plaintext": b"x", "additional_authenticated_data": b"a",
                "additional_authenticated_data_crc32c": crc32c(b"b")}, "forward"),
    ("enc-missing-key", "encrypt",
     lambda w: {"name": f"{w.ring}/cryptoKeys/missing", "plaintext": b"x"}, "fetch"),
    ("enc-missing-ring", "encrypt",
     lambda w: {"name": f"{w.location}/keyRings/missing/cryptoKeys/k", "plaintext": b"x"},
     "fetch"),
    ("enc-missing-version", "encrypt",
     lambda w: {"name": w.version("a", 9), "plaintext": b"x"}, "fetch"),
    ("enc-version-name-primary", "encrypt",
     lambda w: {"name": w.version("a", 1), "plaintext": b"x"}, "local"),
    ("enc-version-name-not-primary", "encrypt",
     lambda w: {"name": w.version("a", 4), "plaintext": b"x"}, "local"),
    ("enc-disabled-version", "encrypt",
     lambda w: {"name": w.version("a", 2), "plaintext": b"x"}, "fetch"),
    ("enc-destroy-scheduled-version", "encrypt",
     lambda w: {"name": w.version("a", 3), "plaintext": b"x"}, "fetch"),
    ("enc-destroyed-version", "encrypt",
     lambda w: {"name": w.version("d", 2), "plaintext": b"x"}, "fetch"),
    ("enc-primary-disabled", "encrypt",
     lambda w: {"name": w.keys["offp"], "plaintext": b"x"}, "fetch"),
    ("enc-decrypter-only", "encrypt",
     lambda w: {"name": w.keys["dec-only"], "plaintext": b"x"}, ("local", "fetch")),
    ("enc-no-binding", "encrypt",
     lambda w: {"name": w.keys["none"], "plaintext": b"x"}, ("local", "fetch")),
    # The fetch is refused naming the key; central's Encrypt names the version, so the
    # sidecar forwards the call for central's own words.
    ("enc-no-binding-version-name", "encrypt",
     lambda w: {"name": f"{w.keys['none']}/cryptoKeyVersions/1", "plaintext": b"x"},
     ("local", "fetch-then-forward")),
    # -- Decrypt
    ("dec-ok", "decrypt", lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                                     "additional_authenticated_data": b"aad"}, "local"),
    ("dec-ok-crcs", "decrypt", lambda w: {
        "name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
        "ciphertext_crc32c": crc32c(w.ciphertexts["a1"]),
        "additional_authenticated_data": b"aad",
        "additional_authenticated_data_crc32c": crc32c(b"aad")}, "local"),
    ("dec-not-primary", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a4"]}, "local"),
    ("dec-empty-name", "decrypt", lambda w: {"name": "", "ciphertext": w.ciphertexts["a1"]},
     "forward"),
    ("dec-bad-name", "decrypt",
     lambda w: {"name": "not/a/key", "ciphertext": w.ciphertexts["a1"]}, "forward"),
    ("dec-version-name", "decrypt",
     lambda w: {"name": w.version("a", 1), "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"aad"}, "forward"),
    ("dec-oversize-ciphertext", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": b"c" * (MAX_CIPHERTEXT + 1)}, "forward"),
    ("dec-oversize-aad", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"a" * (KIB64 + 1)}, "forward"),
    ("dec-ciphertext-crc-zero", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"aad", "ciphertext_crc32c": 0}, None),
    ("dec-empty-aad-crc-zero", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a4"],
                "additional_authenticated_data_crc32c": 0}, None),
    ("dec-ciphertext-crc-mismatch", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"aad", "ciphertext_crc32c": 12345},
     "forward"),
    ("dec-aad-crc-mismatch", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"aad",
                "additional_authenticated_data_crc32c": crc32c(b"other")}, "forward"),
    ("dec-wrong-aad", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"wrong"}, "local"),
    ("dec-missing-aad", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"]}, "local"),
    ("dec-garbage", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": b"garbage, not a ciphertext"}, "forward"),
    ("dec-empty-ciphertext", "decrypt", lambda w: {"name": w.keys["a"], "ciphertext": b""},
     "forward"),
    ("dec-truncated", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"][:40],
                "additional_authenticated_data": b"aad"}, None),
    ("dec-header-only", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a1"][:HEADER_LEN],
                "additional_authenticated_data": b"aad"}, "forward"),
    ("dec-format-version-2", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": b"\x02" + w.ciphertexts["a1"][1:],
                "additional_authenticated_data": b"aad"}, "forward"),
    ("dec-version-zero", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": with_header_version(w.ciphertexts["a1"], 0),
                "additional_authenticated_data": b"aad"}, "forward"),
    ("dec-unknown-version", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": with_header_version(w.ciphertexts["a1"], 9),
                "additional_authenticated_data": b"aad"}, "fetch"),
    ("dec-flipped-tag", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": flip(w.ciphertexts["a1"], -1),
                "additional_authenticated_data": b"aad"}, "local"),
    ("dec-edited-salt", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": flip(w.ciphertexts["a1"], 7),
                "additional_authenticated_data": b"aad"}, "local"),
    ("dec-other-keys-ciphertext", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["other"],
                "additional_authenticated_data": b"aad"}, "local"),
    ("dec-missing-key", "decrypt",
     lambda w: {"name": f"{w.ring}/cryptoKeys/missing", "ciphertext": w.ciphertexts["a1"],
                "additional_authenticated_data": b"aad"}, "fetch"),
    ("dec-disabled-version", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a2"]}, "fetch"),
    ("dec-destroy-scheduled-version", "decrypt",
     lambda w: {"name": w.keys["a"], "ciphertext": w.ciphertexts["a3"]}, "fetch"),
    ("dec-destroyed-version", "decrypt",
     lambda w: {"name": w.keys["d"], "ciphertext": w.ciphertexts["d2"]}, "fetch"),
    ("dec-primary-disabled", "decrypt",
     lambda w: {"name": w.keys["offp"], "ciphertext": w.ciphertexts["offp"]}, "fetch"),
    ("dec-encrypter-only", "decrypt",
     lambda w: {"name": w.keys["enc-only"], "ciphertext": w.ciphertexts["enc-only"]},
     ("local", "fetch")),
    ("dec-no-binding", "decrypt",
     lambda w: {"name": w.keys["none"], "ciphertext": w.ciphertexts["none"]},
     ("local", "fetch")),
    ("dec-no-binding-garbage", "decrypt",
     lambda w: {"name": w.keys["none"], "ciphertext": b"garbage"}, "forward"),
]


def normalized(response: Any) -> tuple[Any, ...]:
    """What must be equal between central's and the sidecar's answers (ciphertexts differ:
    fresh nonces)."""
    if isinstance(response, kms_v1.EncryptResponse):
        return ("EncryptResponse", response.name, response.verified_plaintext_crc32c,
                response.verified_additional_authenticated_data_crc32c,
                response.ciphertext_crc32c == crc32c(response.ciphertext),
                len(response.ciphertext), response.protection_level)
    assert isinstance(response, kms_v1.DecryptResponse), response
    return ("DecryptResponse", response.plaintext, response.plaintext_crc32c,
            response.used_primary, response.protection_level)


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """A call's answer: ("ok", normalized reply) or ("error", code, message, details,
    the raw grpc-status-details-bin)."""
    try:
        response = call()
    except gexc.GoogleAPICallError as exc:
        rpc = exc.response
        trailing = dict(rpc.trailing_metadata() or ()) if isinstance(rpc, grpc.Call) else {}
        code = exc.grpc_status_code
        return ("error", code.name if code else None, exc.message, list(exc.details or []),
                trailing.get("grpc-status-details-bin"))
    return ("ok", normalized(response))


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
@pytest.mark.parametrize("mode", ["dev", "auth"])
def test_the_sidecar_answers_exactly_as_central(request: pytest.FixtureRequest, mode: str,
                                                case: Case) -> None:
    world: World = request.getfixturevalue(f"{mode}_world")
    pair = world.pair
    name, rpc, build, where = case
    message = build(world)
    direct = outcome(lambda: getattr(pair.direct, rpc)(**message))
    local, moved = sidecar_metrics_delta(
        pair.sidecar, lambda: outcome(lambda: getattr(pair.local, rpc)(**message)))
    assert local == direct
    if isinstance(where, tuple):
        where = where[0] if mode == "dev" else where[1]
    if where == "forward":
        assert moved["valv_sidecar_forwarded_calls_total"] == 1, moved
    elif where == "fetch-then-forward":
        assert moved["valv_sidecar_central_fetch_failures_total"] == 1, moved
        assert moved["valv_sidecar_forwarded_calls_total"] == 1, moved
    elif where in ("local", "fetch"):
        assert moved["valv_sidecar_forwarded_calls_total"] == 0, moved
        if where == "local":
            assert moved["valv_sidecar_local_calls_total"] == (1 if local[0] == "ok" else 0)
        else:
            assert local[0] == "error"
            assert moved["valv_sidecar_central_fetch_failures_total"] == 1, moved
    if mode == "auth" and name in ("enc-decrypter-only", "dec-encrypter-only",
                                   "enc-no-binding", "dec-no-binding"):
        assert local[1] == "PERMISSION_DENIED"


# ---- 3. forwarded RPCs ---------------------------------------------------------------------------


def test_every_other_rpc_is_forwarded_with_centrals_answers(dev: Pair) -> None:
    direct, local = dev.direct, dev.local
    location = f"projects/{new_project()}/locations/global"

    def through_the_sidecar() -> tuple[str, str]:
        ring = local.create_key_ring(parent=location, key_ring_id="ring", key_ring={})
        assert direct.get_key_ring(name=ring.name) == ring
        assert local.get_key_ring(name=ring.name) == ring
        assert list(local.list_key_rings(parent=location)) == [ring]
        key = local.create_crypto_key(parent=ring.name, crypto_key_id="k",
                                      crypto_key={"purpose": ENCRYPT_DECRYPT,
                                                  "labels": {"team": "a"}})
        assert direct.get_crypto_key(name=key.name) == key
        assert local.get_crypto_key(name=key.name) == key
        updated = local.update_crypto_key(crypto_key={"name": key.name, "labels": {"team": "b"}},
                                          update_mask={"paths": ["labels"]})
        assert updated.labels == {"team": "b"}
        assert direct.get_crypto_key(name=key.name) == updated
        assert list(local.list_crypto_keys(parent=ring.name)) == \
            list(direct.list_crypto_keys(parent=ring.name))
        v2 = local.create_crypto_key_version(parent=key.name, crypto_key_version={})
        assert direct.get_crypto_key_version(name=v2.name) == v2
        assert list(local.list_crypto_key_versions(parent=key.name)) == \
            list(direct.list_crypto_key_versions(parent=key.name))
        primary = local.update_crypto_key_primary_version(name=key.name,
                                                          crypto_key_version_id="2")
        assert primary.primary.name == v2.name
        disabled = local.update_crypto_key_version(
            crypto_key_version={"name": f"{key.name}/cryptoKeyVersions/1",
                                "state": VState.DISABLED}, update_mask={"paths": ["state"]})
        assert disabled.state == VState.DISABLED
        scheduled = local.destroy_crypto_key_version(name=f"{key.name}/cryptoKeyVersions/1")
        assert scheduled.state == VState.DESTROY_SCHEDULED
        restored = local.restore_crypto_key_version(name=scheduled.name)
        assert restored.state == VState.DISABLED
        assert direct.get_crypto_key_version(name=restored.name) == restored
        policy = local.set_iam_policy(resource=key.name, policy={"bindings": [
            {"role": ENCRYPTER_DECRYPTER, "members": ["user:bob@example.com"]}]})
        assert local.get_iam_policy(resource=key.name) == policy
        assert direct.get_iam_policy(resource=key.name) == policy
        assert len(local.generate_random_bytes(
            location=location, length_bytes=32,
            protection_level=kms_v1.ProtectionLevel.HSM).data) == 32
        return ring.name, key.name

    (ring, key), moved = sidecar_metrics_delta(dev.sidecar, through_the_sidecar)
    assert moved["valv_sidecar_forwarded_calls_total"] == 16
    assert moved["valv_sidecar_local_calls_total"] == 0
    assert moved["valv_sidecar_central_fetches_total"] == 0

    # Locations (the google.cloud.location mixin), through Google's client's mixin methods.
    project = location.rsplit("/locations/", 1)[0]
    assert dev.sidecar.client().get_location(request={"name": location}, **CALL) == \
        dev.central.client().get_location(request={"name": location}, **CALL)
    listed = dev.sidecar.client().list_locations(request={"name": project}, **CALL)
    assert [loc.name for loc in listed.locations] == [location]

    errors: list[Callable[[Any], Any]] = [
        lambda c: c.get_key_ring(name="not/a/valid/name"),
        lambda c: c.get_key_ring(name=f"{location}/keyRings/missing"),
        lambda c: c.create_key_ring(parent=location, key_ring_id="ring", key_ring={}),
        lambda c: c.create_key_ring(parent=location, key_ring_id="bad id!", key_ring={}),
        lambda c: c.get_crypto_key(name=f"{ring}/cryptoKeys/missing"),
        lambda c: c.update_crypto_key(crypto_key={"name": key, "labels": {"a": "b"}},
                                      update_mask={"paths": ["purpose"]}),
        lambda c: c.list_crypto_keys(parent=ring, page_token="not-a-token"),
        lambda c: c.update_crypto_key_primary_version(name=key, crypto_key_version_id="1"),
        lambda c: c.update_crypto_key_primary_version(name=key, crypto_key_version_id="9"),
        lambda c: c.restore_crypto_key_version(name=f"{key}/cryptoKeyVersions/2"),
        lambda c: c.get_iam_policy(resource="not/a/resource"),
        lambda c: c.set_iam_policy(resource=key, policy={"bindings": [
            {"role": "roles/not.a.role", "members": ["user:x@example.com"]}]}),
        lambda c: c.generate_random_bytes(location=location, length_bytes=0,
                                          protection_level=kms_v1.ProtectionLevel.HSM),
        lambda c: c.client.get_location(request={"name": "projects/p/locations/mars"}, **CALL),
    ]
    for number, call in enumerate(errors):
        expected = outcome(lambda call=call: call(direct))
        got = outcome(lambda call=call: call(local))
        assert expected[0] == "error", (number, expected)
        assert got == expected, number


def test_forwarded_refusals_keep_centrals_status_and_message(auth: Pair) -> None:
    """Authenticated: the sidecar forwards as its own principal, and central's refusal
    comes back as sent."""
    ring = make_ring(auth.admin)
    key = make_key(auth.admin, ring)
    grant(auth.admin, key, {ENCRYPTER_DECRYPTER: [SIDECAR]})
    calls: list[Callable[[Any], Any]] = [
        lambda c: c.get_crypto_key(name=key),
        lambda c: c.list_crypto_keys(parent=ring),
        lambda c: c.create_crypto_key(parent=ring, crypto_key_id="k2",
                                      crypto_key={"purpose": ENCRYPT_DECRYPT}),
        lambda c: c.set_iam_policy(resource=key, policy={"bindings": []}),
        lambda c: c.get_iam_policy(resource=key),
        lambda c: c.update_crypto_key_version(
            crypto_key_version={"name": f"{key}/cryptoKeyVersions/1", "state": VState.DISABLED},
            update_mask={"paths": ["state"]}),
    ]
    for number, call in enumerate(calls):
        expected = outcome(lambda call=call: call(auth.direct))
        assert expected[:2] == ("error", "PERMISSION_DENIED"), (number, expected)
        assert outcome(lambda call=call: call(auth.local)) == expected, number
    # And a local caller's own token is ignored: it acts as the sidecar, not as ADMIN.
    admin_through_sidecar = As(auth.sidecar.client(), TOKENS[ADMIN])
    assert outcome(lambda: admin_through_sidecar.get_crypto_key(name=key)) == \
        outcome(lambda: auth.direct.get_crypto_key(name=key))


# ---- 4. permission denied on fetch ---------------------------------------------------------------


def test_fetch_refused_for_lack_of_use_permission_is_centrals_permission_denied(
        auth: Pair) -> None:
    key = make_key(auth.admin, make_ring(auth.admin))
    grant(auth.admin, key, {DECRYPTER: [SIDECAR]})
    ciphertext = auth.maker.encrypt(name=key, plaintext=b"dek").ciphertext

    expected = outcome(lambda: auth.direct.encrypt(name=key, plaintext=b"dek"))
    got, moved = sidecar_metrics_delta(
        auth.sidecar, lambda: outcome(lambda: auth.local.encrypt(name=key, plaintext=b"dek")))
    assert got == expected
    assert got[1] == "PERMISSION_DENIED"
    assert got[2] == (f"Permission 'cloudkms.cryptoKeyVersions.useToEncrypt' denied on "
                      f"resource '{key}' (or it may not exist).")
    # Refused by central at the fetch, not forwarded; nothing cached.
    assert moved["valv_sidecar_central_fetches_total"] == 1
    assert moved["valv_sidecar_central_fetch_failures_total"] == 1
    assert moved["valv_sidecar_forwarded_calls_total"] == 0
    # Decrypt, which the role does allow, is answered locally.
    assert auth.local.decrypt(name=key, ciphertext=ciphertext).plaintext == b"dek"


def test_a_sidecar_whose_identity_is_no_sidecar_gets_no_material(
        auth: Pair, tmp_path: Path) -> None:
    """APP may use every key but is not granted roles/valv.sidecar: a sidecar running
    as APP is never ready, and its local calls say why instead of serving."""
    key = make_key(auth.admin, make_ring(auth.admin))
    token = tmp_path / "app.token"
    token.write_text(TOKENS[APP] + "\n")
    sidecar = SidecarProcess(tmp_path, auth.central.addr, "--token-file", str(token))
    try:
        sidecar.start(wait_ready=False)
        wait_for(lambda: "valv.sidecar.connect" in sidecar.readyz()[1],
                 deadline_s=STARTUP_DEADLINE_S, what="/readyz to say why it is not ready")
        assert sidecar.readyz()[0] == 503
        local = As(sidecar.client(), None)
        for name in (key, f"{key}/cryptoKeyVersions/1"):
            got = outcome(lambda name=name: local.encrypt(name=name, plaintext=b"dek"))
            assert got[:2] == ("error", "PERMISSION_DENIED"), got
            assert "roles/valv.sidecar" in got[2], got
        assert sidecar.metric("valv_sidecar_local_calls_total") == 0
        assert sidecar.metric("valv_sidecar_forwarded_calls_total") == 0
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0, sidecar.logs()


# ---- 5. revocation latency -----------------------------------------------------------------------


def warm_from_cache(sidecar: SidecarProcess, local: Any, key: str) -> None:
    """Encrypt once (a fetch), then five more that the cache answers alone."""
    before = sidecar.metrics()
    local.encrypt(name=key, plaintext=b"warm")
    middle = sidecar.metrics()
    assert metric_delta(before, middle, "valv_sidecar_central_fetches_total") == 1
    before = middle
    for _ in range(5):
        local.encrypt(name=key, plaintext=b"warm")
    after = sidecar.metrics()
    assert metric_delta(before, after, "valv_sidecar_local_calls_total") == 5
    assert metric_delta(before, after, "valv_sidecar_central_fetches_total") == 0
    assert metric_delta(before, after, "valv_sidecar_cache_hits_total") == 5


def time_until(condition: Callable[[], Any], change: Callable[[], Any], what: str, *,
               then: Callable[[], Any] | None = None) -> tuple[float, Any]:
    """Make ``change`` and poll ``condition`` (then ``then``, if given) until it holds: the
    seconds from just before the change was sent (so central's own latency is included)
    until both held, and what ``condition`` returned."""
    started = time.monotonic()
    change()
    result = wait_for(condition, deadline_s=10, what=what, interval_s=0.002)
    if then is not None:
        wait_for(then, deadline_s=10, what=f"{what} (Decrypt too)", interval_s=0.002)
    return time.monotonic() - started, result


def refused(local: Any, key: str) -> Callable[[], gexc.GoogleAPICallError | None]:
    def attempt() -> gexc.GoogleAPICallError | None:
        try:
            local.encrypt(name=key, plaintext=b"after")
        except gexc.GoogleAPICallError as exc:
            return exc
        return None
    return attempt


def assert_dropped_by_the_watch_stream(before: dict[str, float], after: dict[str, float]
                                       ) -> None:
    """The cached material left because a change event said so (not by TTL or max uses)."""
    assert metric_delta(before, after, "valv_sidecar_watch_events_total") >= 1
    assert metric_delta(before, after, "valv_sidecar_cache_invalidations_total") >= 1
    assert metric_delta(before, after, "valv_sidecar_cache_expirations_total") == 0
    assert metric_delta(before, after, "valv_sidecar_cache_exhausted_total") == 0


def record_latency(what: str, seconds: float) -> None:
    LATENCIES[what] = seconds
    print(f"\nrevocation latency [{what}]: {seconds * 1000:.0f} ms")
    assert seconds < REVOCATION_BOUND_S, f"{what}: the sidecar took {seconds:.3f} s to refuse"


@pytest.mark.parametrize("change", ["disable", "destroy", "new-primary", "iam-binding-removed",
                                    "key-ring-iam-binding-removed"])
def test_revocation_reaches_the_sidecar_within_a_second(request: pytest.FixtureRequest,
                                                        tmp_path: Path, change: str) -> None:
    """Encrypt is polled until it refuses (or, for a new primary, uses it); then Decrypt of
    a version-1 ciphertext, cached as well, must refuse too (or report used_primary false)."""
    pair: Pair = request.getfixturevalue("auth" if "iam" in change else "dev")
    admin = pair.admin
    ring = make_ring(admin)
    key = make_key(admin, ring)
    if change == "iam-binding-removed":
        grant(admin, key, {ENCRYPTER_DECRYPTER: [SIDECAR]})
    elif change == "key-ring-iam-binding-removed":  # a KeyRing's policy covers its keys
        grant(admin, ring, {ENCRYPTER_DECRYPTER: [SIDECAR]})
    v1, v2 = f"{key}/cryptoKeyVersions/1", f"{key}/cryptoKeyVersions/2"
    if change == "new-primary":
        admin.create_crypto_key_version(parent=key, crypto_key_version={})
    ciphertext = pair.maker.encrypt(name=key, plaintext=b"dek").ciphertext
    sidecar = pair.spawn_sidecar(tmp_path)  # after the setup: see Pair.spawn_sidecar
    try:
        local = As(sidecar.client(), None)
        assert local.decrypt(name=key, ciphertext=ciphertext).used_primary
        warm_from_cache(sidecar, local, key)
        assert local.decrypt(name=key, ciphertext=ciphertext).used_primary
        warm = sidecar.metrics()
        assert warm["valv_sidecar_central_fetches_total"] == 2  # one per purpose, no more

        def decrypt() -> Any:
            return local.decrypt(name=key, ciphertext=ciphertext)

        if change == "new-primary":
            def uses_v2() -> bool:
                return bool(local.encrypt(name=key, plaintext=b"after").name == v2)

            def v1_not_primary() -> bool:
                return not decrypt().used_primary

            latency, _ = time_until(
                uses_v2, lambda: admin.update_crypto_key_primary_version(
                    name=key, crypto_key_version_id="2"), "the sidecar to encrypt with v2",
                then=v1_not_primary)
            record_latency(change, latency)
            assert_dropped_by_the_watch_stream(warm, sidecar.metrics())
            assert outcome(decrypt) == outcome(
                lambda: pair.direct.decrypt(name=key, ciphertext=ciphertext))
            return

        def make_change() -> None:
            if change == "disable":
                set_state(admin, v1, VState.DISABLED)
            elif change == "destroy":
                admin.destroy_crypto_key_version(name=v1)
            elif change == "iam-binding-removed":
                grant(admin, key, {})
            else:
                grant(admin, ring, {})

        def decrypt_refused() -> gexc.GoogleAPICallError | None:
            try:
                decrypt()
            except gexc.GoogleAPICallError as exc:
                return exc
            return None

        latency, error = time_until(refused(local, key), make_change, "the sidecar to refuse",
                                    then=decrypt_refused)
        record_latency(change, latency)
        assert_dropped_by_the_watch_stream(warm, sidecar.metrics())
        # The refusals are central's own answers to the same caller.
        assert outcome(lambda: local.encrypt(name=key, plaintext=b"x")) == \
            outcome(lambda: pair.direct.encrypt(name=key, plaintext=b"x"))
        assert outcome(decrypt) == outcome(
            lambda: pair.direct.decrypt(name=key, ciphertext=ciphertext))
        expected = gexc.PermissionDenied if "iam" in change else gexc.FailedPrecondition
        assert isinstance(error, expected), error
    finally:
        assert sidecar.stop() == 0


# ---- 6. central outage and recovery --------------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_central_outage_serves_cached_keys_until_their_ttl_then_recovers(
        tmp_path: Path, how: str) -> None:
    ttl = 4.0
    central = CentralProcess(tmp_path / "central").start()
    sidecar = SidecarProcess(tmp_path, central.addr, "--cache-ttl", f"{ttl:g}s")
    restarted: CentralProcess | None = None
    try:
        admin = As(central.client(), None)
        ring = make_ring(admin)
        cached, uncached = make_key(admin, ring, "cached"), make_key(admin, ring, "uncached")
        ciphertext = admin.encrypt(name=cached, plaintext=b"dek").ciphertext
        sidecar.start()  # after the setup: see Pair.spawn_sidecar
        local = As(sidecar.client(), None)
        fetching = time.monotonic()
        local.encrypt(name=cached, plaintext=b"dek")
        local.decrypt(name=cached, ciphertext=ciphertext)
        fetched = time.monotonic()

        central.stop(getattr(signal, how))
        # A cached key keeps serving, both ways, without central.
        before = sidecar.metrics()
        assert local.decrypt(name=cached, ciphertext=ciphertext).plaintext == b"dek"
        made = local.encrypt(name=cached, plaintext=b"while central is down").ciphertext
        assert local.decrypt(name=cached, ciphertext=made).plaintext == b"while central is down"
        assert metric_delta(before, sidecar.metrics(), "valv_sidecar_central_fetches_total") == 0
        wait_for(lambda: sidecar.readyz()[0] == 503, deadline_s=10,
                 what="/readyz to report the lost watch stream")
        assert "not connected" in sidecar.readyz()[1]
        assert sidecar.healthz()[0] == 200

        # A key that is not cached can't be served: UNAVAILABLE, saying why.
        error = failure(lambda: local.encrypt(name=uncached, plaintext=b"dek"))
        assert isinstance(error, gexc.ServiceUnavailable), error
        assert f"central at {central.addr} is unreachable" in error.message
        assert f"the primary version of {uncached} is not cached" in error.message
        assert "never serves key material past its TTL" in error.message
        error = failure(lambda: local.get_crypto_key(name=cached))  # forwarded
        assert isinstance(error, gexc.ServiceUnavailable), error
        assert "unreachable" in error.message

        # Until the TTL the cached key serves; then it is UNAVAILABLE too, never open.
        for rpc, call in (("encrypt", lambda: local.encrypt(name=cached, plaintext=b"x")),
                          ("decrypt", lambda: local.decrypt(name=cached,
                                                            ciphertext=ciphertext))):
            def expired(call: Callable[[], Any] = call) -> gexc.GoogleAPICallError | None:
                try:
                    call()
                except gexc.GoogleAPICallError as exc:
                    return exc
                return None

            error = wait_for(expired, deadline_s=ttl + 10, what=f"{rpc} to stop at the TTL",
                             interval_s=0.02)
            refused_at = time.monotonic()
            assert isinstance(error, gexc.ServiceUnavailable), error
            assert "is not cached" in error.message
            # Not before the TTL (it ran from a fetch made after `fetching`) ...
            assert refused_at - fetching >= ttl, (rpc, refused_at - fetching)
            # ... and not long after (the sidecar wipes expired material about every second).
            assert refused_at - fetched <= ttl + 3, (rpc, refused_at - fetched)
        assert sidecar.metric("valv_sidecar_cache_entries") == 0
        assert failure(lambda: local.decrypt(name=cached, ciphertext=made)).grpc_status_code \
            == grpc.StatusCode.UNAVAILABLE

        # Central comes back on the same port and data dir: the sidecar recovers.
        restarted = central_on_same_port(central).start()
        assert restarted.addr == central.addr

        def serves() -> bool:
            try:
                local.encrypt(name=cached, plaintext=b"x")
            except gexc.ServiceUnavailable:
                return False
            return True

        wait_for(serves, deadline_s=20, what="the sidecar to serve again", interval_s=0.05)
        assert local.decrypt(name=cached, ciphertext=made).plaintext == b"while central is down"
        assert local.encrypt(name=uncached, plaintext=b"x").name.startswith(uncached)
        sidecar.wait_ready(deadline_s=20)  # the watch stream reconnects (backoff <= 5 s)
        assert sidecar.metric("valv_sidecar_watch_connected") == 1
    finally:
        sidecar.stop()
        if restarted is not None:
            restarted.stop()
        central.stop()


def test_changes_missed_while_the_watch_was_down_are_replayed_on_reconnect(
        tmp_path: Path) -> None:
    """Central #1 dies; the key is disabled through central #2 (same store) meanwhile. The
    sidecar keeps serving its cached copy (until the TTL, by design), and once central #1
    is back its resumed watch stream replays the change: refused right after reconnecting,
    long before the 60 s TTL."""
    first = CentralProcess(tmp_path / "data").start()
    second = CentralProcess(tmp_path / "data")
    second.log_path = tmp_path / "central-2.log"
    restarted: CentralProcess | None = None
    sidecar = SidecarProcess(tmp_path, first.addr)
    try:
        second.start()
        via_second = As(second.client(), None)
        key = make_key(via_second, make_ring(via_second))
        sidecar.start()  # after the setup: see Pair.spawn_sidecar
        local = As(sidecar.client(), None)
        warm_from_cache(sidecar, local, key)
        warm = sidecar.metrics()

        first.stop(signal.SIGKILL)
        wait_for(lambda: sidecar.readyz()[0] == 503, deadline_s=10,
                 what="/readyz to report the lost watch stream")
        set_state(via_second, f"{key}/cryptoKeyVersions/1", VState.DISABLED)
        # Nobody can tell the sidecar yet: its cached copy serves (until its TTL).
        assert local.encrypt(name=key, plaintext=b"x").name.endswith("/cryptoKeyVersions/1")

        restarted = central_on_same_port(first).start()
        sidecar.wait_ready(deadline_s=20)  # reconnected (backoff <= 5 s)
        error = wait_for(refused(local, key), deadline_s=2.0,
                         what="the replayed change to reach the sidecar", interval_s=0.005)
        assert isinstance(error, gexc.FailedPrecondition), error
        assert_dropped_by_the_watch_stream(warm, sidecar.metrics())
        assert sidecar.metric("valv_sidecar_watch_resets_total") == 0  # resumed, not reset
    finally:
        if sidecar.proc is not None:
            sidecar.stop()
        if restarted is not None:
            restarted.stop()
        if second.proc is not None:
            second.stop()
        first.stop()


# ---- 7. TTL expiry -------------------------------------------------------------------------------


@pytest.mark.parametrize("whose", ["sidecar", "central"])
def test_an_entry_is_fetched_again_after_its_ttl(tmp_path: Path, dev: Pair, whose: str) -> None:
    """The sidecar's --cache-ttl, or central's shorter --sidecar-material-ttl. 4 s: the
    four calls below must come before refresh-ahead starts (the TTL's last fifth), or
    a loaded machine could see a second fetch."""
    central: CentralProcess | None = None
    if whose == "sidecar":
        key = make_key(dev.admin, make_ring(dev.admin))
        sidecar = dev.spawn_sidecar(tmp_path, "--cache-ttl", "4s")
    else:
        central = CentralProcess(tmp_path / "central", "--sidecar-material-ttl", "4s").start()
        admin = As(central.client(), None)
        key = make_key(admin, make_ring(admin))
        sidecar = SidecarProcess(tmp_path, central.addr).start()  # its own TTL: 60 s
    try:
        local = As(sidecar.client(), None)
        started = time.monotonic()
        local.encrypt(name=key, plaintext=b"dek")
        fetched = sidecar.metrics()
        assert fetched["valv_sidecar_central_fetches_total"] == 1
        assert fetched["valv_sidecar_cache_entries"] == 1
        for _ in range(3):
            local.encrypt(name=key, plaintext=b"dek")
        assert sidecar.metric("valv_sidecar_central_fetches_total") == 1

        wait_for(lambda: sidecar.metric("valv_sidecar_cache_expirations_total") >= 1,
                 deadline_s=10, what="the entry to expire", interval_s=0.05)
        assert time.monotonic() - started >= 4.0
        after = sidecar.metrics()
        assert after["valv_sidecar_cache_entries"] == 0
        assert after["valv_sidecar_central_fetches_total"] == 1
        local.encrypt(name=key, plaintext=b"dek")
        assert sidecar.metric("valv_sidecar_central_fetches_total") == 2
    finally:
        assert sidecar.stop() == 0
        if central is not None:
            central.stop()


# ---- 8. max uses ---------------------------------------------------------------------------------


def test_max_uses_bounds_each_fetch(tmp_path: Path, dev: Pair) -> None:
    key = make_key(dev.admin, make_ring(dev.admin))
    sidecar = dev.spawn_sidecar(tmp_path, "--cache-max-uses", "5")
    try:
        local = As(sidecar.client(), None)

        def twelve() -> None:
            for _ in range(12):
                local.encrypt(name=key, plaintext=b"dek")

        _, moved = sidecar_metrics_delta(sidecar, twelve)
        assert moved["valv_sidecar_central_fetches_total"] == 3
        assert moved["valv_sidecar_cache_exhausted_total"] == 2
        assert moved["valv_sidecar_local_calls_total"] == 12
    finally:
        assert sidecar.stop() == 0


# ---- 9. miss coalescing --------------------------------------------------------------------------


def test_concurrent_misses_share_one_fetch(tmp_path: Path, dev: Pair) -> None:
    n = 50
    key = make_key(dev.admin, make_ring(dev.admin))
    sidecar = dev.spawn_sidecar(tmp_path)
    try:

        async def burst() -> list[kms_v1.EncryptResponse]:
            channel = grpc.aio.insecure_channel(sidecar.addr)
            client = kms_v1.KeyManagementServiceAsyncClient(
                transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel))
            try:
                await channel.channel_ready()
                return list(await asyncio.gather(*(
                    client.encrypt(request={"name": key, "plaintext": f"dek {i}".encode()},
                                   retry=None, timeout=10) for i in range(n))))
            finally:
                await channel.close()

        replies, moved = sidecar_metrics_delta(sidecar, lambda: asyncio.run(burst()))
        assert moved["valv_sidecar_central_fetches_total"] == 1
        assert moved["valv_sidecar_local_calls_total"] == n
        assert moved["valv_sidecar_cache_hits_total"] + moved["valv_sidecar_cache_misses_total"] \
            == n
        print(f"\ncoalescing: {moved['valv_sidecar_cache_misses_total']:g} of {n} calls "
              "missed and shared one fetch")
        for i, reply in enumerate(replies):
            assert dev.direct.decrypt(name=key, ciphertext=reply.ciphertext).plaintext == \
                f"dek {i}".encode()
    finally:
        assert sidecar.stop() == 0


class GatedProxy:
    """A TCP proxy to central that can hold what central sends back (``hold``)
    until ``release``: a fetch then stays in flight exactly as long as a test
    needs, with no timing assumptions. Runs on an event loop of its own thread."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rsplit(":", 1)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.open = asyncio.Event()  # set: central's bytes flow (created on self.loop)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    def start(self) -> GatedProxy:
        self.thread.start()

        async def start() -> int:
            self.open.set()
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            return int(self.server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def hold(self) -> None:
        self.loop.call_soon_threadsafe(self.open.clear)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.open.set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       gated: bool) -> None:
            try:
                while data := await src.read(65536):
                    if gated:
                        await self.open.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def stop(self) -> None:
        async def stop() -> None:
            self.open.set()
            if self.server is not None:
                self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_a_short_caller_deadline_does_not_fail_the_shared_fetch(tmp_path: Path,
                                                                dev: Pair) -> None:
    """The first caller to miss has 0.3 s; central's answer to the fetch it starts is
    held back (a gated proxy) until that call has ended with DEADLINE_EXCEEDED and a
    second caller has joined the fetch. Released, the fetch serves the second caller
    (before, it inherited the first caller's deadline and failed everyone with
    UNAVAILABLE)."""
    key = make_key(dev.admin, make_ring(dev.admin))
    proxy = GatedProxy(dev.central.addr).start()
    sidecar = SidecarProcess(tmp_path, f"127.0.0.1:{proxy.port}")
    try:
        sidecar.start()
        before = sidecar.metrics()

        def moved(name: str) -> float:
            return metric_delta(before, sidecar.metrics(), name)

        async def both() -> list[Any]:
            channel = grpc.aio.insecure_channel(sidecar.addr)
            client = kms_v1.KeyManagementServiceAsyncClient(
                transport=KeyManagementServiceGrpcAsyncIOTransport(channel=channel))
            try:
                await channel.channel_ready()
                proxy.hold()
                short = asyncio.ensure_future(client.encrypt(
                    request={"name": key, "plaintext": b"dek"}, retry=None, timeout=0.3))
                await asyncio.to_thread(
                    wait_for, lambda: moved("valv_sidecar_central_fetches_total") == 1,
                    deadline_s=10, what="the first caller's fetch", interval_s=0.01)
                patient = asyncio.ensure_future(client.encrypt(
                    request={"name": key, "plaintext": b"dek"}, retry=None, timeout=30))
                # Both missed (the second joined the fetch in flight); the first is over.
                await asyncio.to_thread(
                    wait_for, lambda: moved("valv_sidecar_cache_misses_total") == 2,
                    deadline_s=10, what="the second caller to join the fetch",
                    interval_s=0.01)
                await asyncio.wait({short}, timeout=10)
                assert short.done()
                proxy.release()
                return list(await asyncio.gather(short, patient, return_exceptions=True))
            finally:
                proxy.release()
                await channel.close()

        short, patient = asyncio.run(both())
        assert isinstance(short, gexc.DeadlineExceeded), short
        assert isinstance(patient, kms_v1.EncryptResponse), patient
        assert {name: moved(name) for name in (
            "valv_sidecar_central_fetches_total", "valv_sidecar_central_fetch_failures_total")
        } == {"valv_sidecar_central_fetches_total": 1,
              "valv_sidecar_central_fetch_failures_total": 0}
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0
        proxy.stop()


# ---- 10. a change through another central --------------------------------------------------------


def test_a_change_through_a_second_central_reaches_the_sidecar(tmp_path: Path) -> None:
    first = CentralProcess(tmp_path / "data").start()
    second = CentralProcess(tmp_path / "data")
    second.log_path = tmp_path / "central-2.log"
    sidecar = SidecarProcess(tmp_path, first.addr)
    try:
        second.start()
        assert second.addr != first.addr
        via_second = As(second.client(), None)
        key = make_key(via_second, make_ring(via_second))
        sidecar.start()  # after the setup: see Pair.spawn_sidecar
        local = As(sidecar.client(), None)
        warm_from_cache(sidecar, local, key)
        warm = sidecar.metrics()
        latency, error = time_until(
            refused(local, key),
            lambda: set_state(via_second, f"{key}/cryptoKeyVersions/1", VState.DISABLED),
            "the sidecar (on central #1) to refuse")
        record_latency("disable via a second central", latency)
        assert_dropped_by_the_watch_stream(warm, sidecar.metrics())
        assert isinstance(error, gexc.FailedPrecondition), error
        assert outcome(lambda: local.encrypt(name=key, plaintext=b"x")) == \
            outcome(lambda: As(first.client(), None).encrypt(name=key, plaintext=b"x"))
    finally:
        if sidecar.proc is not None:
            sidecar.stop()
        if second.proc is not None:
            second.stop()
        first.stop()


# ---- 11. no key bytes in logs --------------------------------------------------------------------


def fetch_kek(central: CentralProcess, key: str, purpose: str, version_id: int = 0) -> bytes:
    """The KEK, fetched the way a sidecar does (FetchVersion, sealed to our own X25519 key)."""
    private = X25519PrivateKey.generate()
    host, port = central.addr.rsplit(":", 1)

    async def run() -> sidecar_pb.FetchVersionResponse:
        channel = Channel(host, int(port))
        try:
            stub = sidecar_pb.KeyMaterialStub(channel, timeout=10)
            return await stub.fetch_version(sidecar_pb.FetchVersionRequest(
                crypto_key=key, version_id=version_id, purpose=sidecar_pb.Purpose[purpose],
                recipient_public_key=private.public_key().public_bytes(Encoding.Raw,
                                                                       PublicFormat.Raw)))
        finally:
            channel.close()

    response = asyncio.run(run())
    return bytes(open_sealed(response.sealed_material, private, version_name=response.version,
                             purpose=purpose))


def forms(secret: bytes) -> list[bytes]:
    """The ways ``secret`` could show up in a log line."""
    b64 = base64.b64encode(secret)
    urlsafe = base64.urlsafe_b64encode(secret)
    out = [secret, secret.hex().encode(), secret.hex().upper().encode(), b64, b64.rstrip(b"="),
           urlsafe, urlsafe.rstrip(b"="), repr(secret)[2:-1].encode(),
           json.dumps(secret.decode("latin-1"))[1:-1].encode()]
    return [form for form in out if len(form) >= 8]


def test_no_plaintext_or_key_bytes_in_either_processs_logs(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path / "central", "--log-level", "debug").start()
    sidecar = SidecarProcess(tmp_path, central.addr, "--log-level", "debug",
                             "--usage-report-interval", "1s")
    try:
        sidecar.start()
        admin, local = As(central.client(), None), As(sidecar.client(), None)
        key = make_key(admin, make_ring(admin))
        dek, aad = os.urandom(32), b"tenant=" + os.urandom(8).hex().encode()
        for client in (local, admin):
            made = client.encrypt(name=key, plaintext=dek, additional_authenticated_data=aad,
                                  plaintext_crc32c=crc32c(dek))
            for other in (local, admin):
                assert other.decrypt(name=key, ciphertext=made.ciphertext,
                                     additional_authenticated_data=aad).plaintext == dek
            failure(lambda c=client, m=made: c.decrypt(name=key, ciphertext=m.ciphertext))
            failure(lambda c=client: c.encrypt(name=key, plaintext=dek * 3000))
        wait_for(lambda: sidecar.metric("valv_sidecar_usage_reported_total") >= 3,
                 deadline_s=10, what="a usage report")
        keks = [fetch_kek(central, key, "ENCRYPT"), fetch_kek(central, key, "DECRYPT", 1)]
        assert keks[0] == keks[1] and len(keks[0]) == 32
    finally:
        assert sidecar.stop() == 0
        central.stop()
    logs = {"central": central.log_path.read_bytes(), "sidecar": sidecar.log_path.read_bytes()}
    for name, text in logs.items():
        assert b'"level": "debug"' in text, f"{name} logged nothing at debug level"
        for label, secret in (("KEK", keks[0]), ("plaintext", dek)):
            for form in forms(secret):
                assert form not in text, f"the {label} is in {name}'s log as {form!r}"


# ---- 12. usage reports in central's audit log ----------------------------------------------------


def audit_records(data_dir: Path, *filters: str) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "valv", "audit", "query", "--data-dir",
                             str(data_dir), *filters], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_local_uses_reach_centrals_audit_log(tmp_path: Path) -> None:
    encrypts, decrypts, failed = 23, 7, 3
    central = start_authenticated_central(tmp_path, "--audit-flush-interval", "3600")
    sidecar = SidecarProcess(tmp_path, central.addr, "--token-file",
                             str(sidecar_token_file(tmp_path)), "--usage-report-interval", "1s")
    try:
        admin = As(central.client(), TOKENS[ADMIN])
        key = make_key(admin, make_ring(admin))
        grant(admin, key, {ENCRYPTER_DECRYPTER: [SIDECAR]})
        sidecar.start()  # after the setup: see Pair.spawn_sidecar
        local = As(sidecar.client(), None)

        def uses() -> None:
            made = [local.encrypt(name=key, plaintext=b"dek").ciphertext
                    for _ in range(encrypts)]
            for ciphertext in made[:decrypts]:
                local.decrypt(name=key, ciphertext=ciphertext)
            for ciphertext in made[:failed]:  # answered (and counted) by the sidecar too
                error = failure(lambda c=ciphertext: local.decrypt(
                    name=key, ciphertext=c, additional_authenticated_data=b"wrong"))
                assert isinstance(error, gexc.InvalidArgument), error

        _, moved = sidecar_metrics_delta(sidecar, uses)
        assert moved["valv_sidecar_local_calls_total"] == encrypts + decrypts
        assert moved["valv_sidecar_forwarded_calls_total"] == 0
        wait_for(lambda: sidecar.metric("valv_sidecar_usage_reported_total")
                 >= encrypts + decrypts + failed, deadline_s=15, what="the usage report",
                 interval_s=0.05)
        assert sidecar.metric("valv_sidecar_usage_pending") == 0
        fetched = sidecar.metric("valv_sidecar_central_fetches_total")
        assert fetched == 2  # one per purpose
    finally:
        assert sidecar.stop() == 0
        central.stop()  # SIGTERM: the audit log's final flush
    version = f"{key}/cryptoKeyVersions/1"
    reported = audit_records(central.data_dir, "--reported")
    assert reported, "no reported usage in the audit log"
    totals: dict[tuple[str, str, str, str], int] = {}
    for record in reported:
        assert record["kind"] == "DATA_ACCESS_AGGREGATE"
        assert record["reported_by"] == "sidecar"
        entry = (record["principal"], record["rpc"], record.get("target", ""),
                 record.get("status", ""))
        totals[entry] = totals.get(entry, 0) + record["count"]
    assert totals == {(SIDECAR, "Encrypt", version, "OK"): encrypts,
                      (SIDECAR, "Decrypt", version, "OK"): decrypts,
                      (SIDECAR, "Decrypt", version, "INVALID_ARGUMENT"): failed}
    # Central's own record of the material it handed out: every fetch.
    fetches = [r for r in audit_records(central.data_dir, "--rpc", "FetchVersion")
               if r["principal"] == SIDECAR]
    assert sum(r["count"] for r in fetches) == fetched


# ---- 13. mTLS to central -------------------------------------------------------------------------


def test_the_sidecar_reaches_central_over_mtls_as_its_certificate(tmp_path: Path) -> None:
    ca = CA("valv sidecar e2e CA")
    server = ca.issue("valv central", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")], server=True)
    client_cert = ca.issue("api", [x509.UniformResourceIdentifier(SPIFFE_ID)], server=False)
    files = {"ca.pem": ca.pem, "server.pem": server.cert_pem, "server.key": server.key_pem,
             "client.pem": client_cert.cert_pem, "client.key": client_cert.key_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o600)
    central = start_authenticated_central(
        tmp_path, "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"),
        "--tls-client-ca-file", str(tmp_path / "ca.pem"), "--log-level", "debug",
        sidecars=(f"serviceAccount:{SPIFFE_ID}",))
    sidecar = SidecarProcess(tmp_path, central.addr,
                             "--central-ca-file", str(tmp_path / "ca.pem"),
                             "--client-cert-file", str(tmp_path / "client.pem"),
                             "--client-key-file", str(tmp_path / "client.key"))
    try:
        sidecar.start()  # /readyz 200: the watch stream is up, over mTLS
        member = f"serviceAccount:{SPIFFE_ID}"
        tls = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        admin = As(kms_client(central.addr, tls), TOKENS[ADMIN])
        as_cert = As(kms_client(central.addr, grpc.ssl_channel_credentials(
            root_certificates=ca.pem, private_key=client_cert.key_pem,
            certificate_chain=client_cert.cert_pem)), None)
        ring = make_ring(admin)
        allowed, denied = make_key(admin, ring, "allowed"), make_key(admin, ring, "denied")
        grant(admin, allowed, {ENCRYPTER_DECRYPTER: [member]})
        local = As(sidecar.client(), None)

        made = local.encrypt(name=allowed, plaintext=b"dek", additional_authenticated_data=b"a")
        assert made.name == f"{allowed}/cryptoKeyVersions/1"
        assert as_cert.decrypt(name=allowed, ciphertext=made.ciphertext,
                               additional_authenticated_data=b"a").plaintext == b"dek"
        assert local.decrypt(name=allowed, ciphertext=made.ciphertext,
                             additional_authenticated_data=b"a").plaintext == b"dek"
        assert sidecar.metric("valv_sidecar_local_calls_total") == 2

        # Permission follows the certificate's identity: the same answers as central
        # gives that certificate directly.
        for call in (lambda c: c.encrypt(name=denied, plaintext=b"dek"),
                     lambda c: c.get_crypto_key(name=allowed)):
            expected = outcome(lambda call=call: call(as_cert))
            assert expected[:2] == ("error", "PERMISSION_DENIED"), expected
            assert outcome(lambda call=call: call(local)) == expected
        lines = [json.loads(line) for line in central.logs().splitlines()
                 if line.startswith("{")]
        seen = {(line.get("rpc"), line.get("principal"), line.get("method")) for line in lines
                if line.get("msg") == "authenticated"}
        for rpc in ("FetchVersion", "Watch", "GetCryptoKey"):
            assert (rpc, member, "mtls") in seen, (rpc, seen)
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0
        central.stop()


# ---- 14. local callers only ----------------------------------------------------------------------


def test_the_unix_socket_is_0600_serves_and_is_removed_at_shutdown(tmp_path: Path,
                                                                    dev: Pair) -> None:
    path = tmp_path / "kms.sock"
    sidecar = dev.spawn_sidecar(tmp_path, "--unix-socket", str(path))
    try:
        assert sidecar.unix_socket == str(path)
        assert os.stat(path).st_mode & 0o777 == 0o600
        local = As(sidecar.unix_client(), None)
        key = make_key(dev.admin, make_ring(dev.admin))
        made = local.encrypt(name=key, plaintext=b"dek")
        assert dev.direct.decrypt(name=key, ciphertext=made.ciphertext).plaintext == b"dek"
        assert local.get_crypto_key(name=key).name == key  # forwarded over the socket too
    finally:
        assert sidecar.stop() == 0
    assert not path.exists()


def test_configured_from_the_environment_with_a_group_socket(tmp_path: Path,
                                                             dev: Pair) -> None:
    """Every flag has its VALV_* variable: here the unix socket, its mode (0660: an
    application container in the socket's group) and the cache TTL."""
    path = tmp_path / "kms.sock"
    # The key first: its creation's events must not reach the sidecar after the fetch
    # (they would drop the entry before its TTL).
    key = make_key(dev.admin, make_ring(dev.admin))
    sidecar = SidecarProcess(tmp_path, dev.central.addr, env={
        "VALV_UNIX_SOCKET": str(path), "VALV_UNIX_SOCKET_MODE": "0660",
        "VALV_CACHE_TTL": "2s"})
    try:
        sidecar.start()
        assert os.stat(path).st_mode & 0o777 == 0o660
        local = As(sidecar.unix_client(), None)
        assert local.encrypt(name=key, plaintext=b"dek").ciphertext
        wait_for(lambda: sidecar.metric("valv_sidecar_cache_expirations_total") >= 1,
                 deadline_s=10, what="the 2 s TTL from VALV_CACHE_TTL", interval_s=0.05)
    finally:
        if sidecar.proc is not None:
            assert sidecar.stop() == 0


@pytest.mark.parametrize("mode", ["0666", "0644", "777", "rw"])
def test_a_socket_others_could_reach_is_refused(tmp_path: Path, mode: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "sidecar", "--central", "127.0.0.1:1",
         "--unix-socket", str(tmp_path / "s.sock"), "--unix-socket-mode", mode],
        capture_output=True, text=True, timeout=STARTUP_DEADLINE_S, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "--unix-socket-mode" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.sock").exists()


@pytest.mark.parametrize("addr", ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"])
def test_a_non_loopback_listen_address_is_refused(addr: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "valv", "sidecar", "--central", "127.0.0.1:1", "--addr", addr],
        capture_output=True, text=True, timeout=STARTUP_DEADLINE_S, check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "loopback" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_a_watching_sidecar_promptly(tmp_path: Path, dev: Pair) -> None:
    """Nothing in flight, the watch stream open: SIGTERM ends the process at once (central
    never ends a Watch stream, so the sidecar must not wait for its trailers)."""
    sidecar = dev.spawn_sidecar(tmp_path)
    assert sidecar.metric("valv_sidecar_watch_connected") == 1
    started = time.monotonic()
    assert sidecar.stop() == 0
    assert time.monotonic() - started < 2.0, sidecar.logs()
