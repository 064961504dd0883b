"""The sidecar's forwarder, through real processes and Google's official client.

A central and a sidecar pointing at it: every call through the sidecar gives
what the same call gives directly (results, status codes and messages), the
sidecar calls central with its own token (re-read when the file changes), it
listens on loopback and a unix socket only, and the caller's deadline holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from tests.helpers import CALL, STARTUP_DEADLINE_S, CentralProcess, wait_for
from tests.test_authn import last_principal, root_key_env, write_tokens_file

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT


class SidecarProcess:
    """A real ``valv sidecar`` process on 127.0.0.1 with an OS-assigned port."""

    def __init__(self, work: Path, central: str, *extra_args: str) -> None:
        self.work = work
        self.central = central
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.unix_socket: str | None = None
        self.log_path = work / "sidecar.log"

    def start(self) -> SidecarProcess:
        self.work.mkdir(parents=True, exist_ok=True)
        ready = self.work / "sidecar-ready.json"
        ready.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "valv", "sidecar", "--addr", "127.0.0.1:0",
                 "--central", self.central, "--ready-file", str(ready), *self.extra_args],
                stdout=log, stderr=log)

        def is_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sidecar exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            return ready.exists()

        wait_for(is_ready, deadline_s=STARTUP_DEADLINE_S, what="the sidecar to start")
        info = json.loads(ready.read_text())
        self.addr, self.unix_socket = info["addr"], info["unix_socket"]
        return self

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def client(self, target: str | None = None) -> Client:
        return Client(transport=KeyManagementServiceGrpcTransport(
            channel=grpc.insecure_channel(target or self.addr)))


def run_sidecar(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "valv", "sidecar", *args], capture_output=True,
                          text=True, timeout=STARTUP_DEADLINE_S, check=False)


def failure(call: Any) -> gexc.GoogleAPICallError:
    with pytest.raises(gexc.GoogleAPICallError) as info:
        call()
    return info.value


# ---- dev mode: the same answers as central -----------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[CentralProcess, SidecarProcess]]:
    work = tmp_path_factory.mktemp("sidecar")
    central = CentralProcess(work / "central").start()
    sidecar = SidecarProcess(work, central.addr, "--unix-socket",
                             str(work / "sidecar.sock")).start()
    yield central, sidecar
    assert sidecar.stop() == 0
    central.stop()


def test_a_key_workflow_through_the_sidecar_matches_central(
        pair: tuple[CentralProcess, SidecarProcess], location: str) -> None:
    central, sidecar = pair
    direct, local = central.client(), sidecar.client()
    ring = local.create_key_ring(request={"parent": location, "key_ring_id": "ring"}, **CALL)
    assert direct.get_key_ring(request={"name": ring.name}, **CALL) == ring
    key = local.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                           "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)
    assert direct.get_crypto_key(request={"name": key.name}, **CALL) == key
    encrypted = local.encrypt(request={"name": key.name, "plaintext": b"secret",
                                       "additional_authenticated_data": b"aad"}, **CALL)
    # Either way round: the sidecar's ciphertext decrypts directly and vice versa.
    decrypted = direct.decrypt(request={"name": key.name, "ciphertext": encrypted.ciphertext,
                                        "additional_authenticated_data": b"aad"}, **CALL)
    assert decrypted.plaintext == b"secret"
    direct_ct = direct.encrypt(request={"name": key.name, "plaintext": b"x"}, **CALL).ciphertext
    assert local.decrypt(request={"name": key.name, "ciphertext": direct_ct},
                         **CALL).plaintext == b"x"
    assert (list(local.list_crypto_keys(request={"parent": ring.name}, **CALL))
            == list(direct.list_crypto_keys(request={"parent": ring.name}, **CALL)))
    assert (list(local.list_key_rings(request={"parent": location}, **CALL))
            == list(direct.list_key_rings(request={"parent": location}, **CALL)))
    assert (local.get_location(request={"name": location}, **CALL)
            == direct.get_location(request={"name": location}, **CALL))
    policy = local.set_iam_policy(request={"resource": key.name, "policy": {"bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter",
         "members": ["user:bob@example.com"]}]}}, **CALL)
    assert direct.get_iam_policy(request={"resource": key.name}, **CALL) == policy
    assert local.get_iam_policy(request={"resource": key.name}, **CALL) == policy


@pytest.mark.parametrize("call", [
    lambda kms, loc: kms.get_key_ring(request={"name": "not/a/valid/name"}, **CALL),
    lambda kms, loc: kms.get_crypto_key(request={"name": f"{loc}/keyRings/none/cryptoKeys/k"},
                                        **CALL),
    lambda kms, loc: kms.encrypt(request={"name": f"{loc}/keyRings/none/cryptoKeys/k",
                                          "plaintext": b"x"}, **CALL),
    lambda kms, loc: kms.create_key_ring(request={"parent": loc, "key_ring_id": "bad id!"},
                                         **CALL),
    lambda kms, loc: kms.get_location(request={"name": "projects/p/locations/mars"}, **CALL),
], ids=["bad-name", "missing-key", "encrypt-missing-key", "bad-id", "unknown-location"])
def test_errors_are_central_errors(pair: tuple[CentralProcess, SidecarProcess], location: str,
                                   call: Any) -> None:
    central, sidecar = pair
    direct = failure(lambda: call(central.client(), location))
    local = failure(lambda: call(sidecar.client(), location))
    assert type(local) is type(direct)
    assert local.grpc_status_code == direct.grpc_status_code
    assert local.message == direct.message
    assert direct.grpc_status_code in (grpc.StatusCode.INVALID_ARGUMENT,
                                       grpc.StatusCode.NOT_FOUND)


def test_the_unix_socket_serves_with_mode_0600(pair: tuple[CentralProcess, SidecarProcess],
                                               location: str) -> None:
    _, sidecar = pair
    assert sidecar.unix_socket is not None
    assert os.stat(sidecar.unix_socket).st_mode & 0o777 == 0o600
    kms = sidecar.client(f"unix:{sidecar.unix_socket}")
    ring = kms.create_key_ring(request={"parent": location, "key_ring_id": "r"}, **CALL)
    assert ring.name == f"{location}/keyRings/r"


def test_a_non_loopback_address_is_refused() -> None:
    result = run_sidecar("--central", "127.0.0.1:1", "--addr", "0.0.0.0:0")
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    result = run_sidecar("--central", "127.0.0.1:1", "--addr", "127.0.0.1:0",
                         "--token-file", str(tmp_path / "none"))
    assert result.returncode == 2
    assert "token file" in result.stderr


def test_the_callers_deadline_reaches_central(tmp_path: Path) -> None:
    """A central that accepts connections and never answers: the call ends at its deadline."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        sidecar = SidecarProcess(tmp_path, f"127.0.0.1:{silent.getsockname()[1]}").start()
        try:
            started = time.monotonic()
            error = failure(lambda: sidecar.client().list_key_rings(
                request={"parent": "projects/p/locations/global"}, retry=None, timeout=0.5))
            assert isinstance(error, gexc.DeadlineExceeded), error
            assert time.monotonic() - started < 5
        finally:
            assert sidecar.stop() == 0
    finally:
        silent.close()


def test_an_unreachable_central_is_unavailable(tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sidecar = SidecarProcess(tmp_path, f"127.0.0.1:{port}").start()
    try:
        error = failure(lambda: sidecar.client().list_key_rings(
            request={"parent": "projects/p/locations/global"}, **CALL))
        assert isinstance(error, gexc.ServiceUnavailable), error
        assert "unreachable" in str(error.message)
    finally:
        sidecar.stop()


# ---- authenticated central: the sidecar's own identity ------------------------------------------

FIRST_TOKEN = "sidecar-first-" + os.urandom(12).hex()
SECOND_TOKEN = "sidecar-second-" + os.urandom(12).hex()


def test_the_sidecar_calls_with_its_own_token_and_follows_its_rotation(tmp_path: Path) -> None:
    first, second = "serviceAccount:sidecar-a", "serviceAccount:sidecar-b"
    tokens = write_tokens_file(tmp_path / "tokens.json",
                               {first: FIRST_TOKEN, second: SECOND_TOKEN})
    policy = tmp_path / "root-policy.json"
    policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": [first, second]},
        {"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter", "members": [first, second]},
        {"role": "roles/valv.sidecar", "members": [first, second]}]}))
    central = CentralProcess(tmp_path / "central", "--tokens-file", str(tokens),
                             "--root-policy-file", str(policy), "--log-level", "debug",
                             env=root_key_env()).start()
    token_file = tmp_path / "token"
    token_file.write_text(FIRST_TOKEN + "\n")
    sidecar = SidecarProcess(tmp_path, central.addr, "--token-file", str(token_file)).start()
    try:
        location = "projects/sidecar-authn/locations/global"
        direct_error = failure(lambda: central.client().list_key_rings(
            request={"parent": location}, **CALL))
        assert isinstance(direct_error, gexc.Unauthenticated), direct_error

        local = sidecar.client()
        ring = local.create_key_ring(request={"parent": location, "key_ring_id": "r"}, **CALL)
        key = local.create_crypto_key(request={"parent": ring.name, "crypto_key_id": "k",
                                               "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                      **CALL)
        ciphertext = local.encrypt(request={"name": key.name, "plaintext": b"p"},
                                   **CALL).ciphertext
        assert last_principal(central)[0] == first
        # A local caller's own credentials are dropped: it acts as the sidecar.
        plaintext = local.decrypt(request={"name": key.name, "ciphertext": ciphertext},
                                  metadata=[("authorization", "Bearer not-a-token")],
                                  **CALL).plaintext
        assert plaintext == b"p"
        assert last_principal(central)[0] == first

        # The token rotates (as a projected Kubernetes token does): the next calls use it.
        replacement = tmp_path / "token.new"
        replacement.write_text(SECOND_TOKEN + "\n")
        replacement.replace(token_file)

        def uses_the_new_token() -> bool:
            local.get_key_ring(request={"name": ring.name}, **CALL)
            return last_principal(central)[0] == second

        wait_for(uses_the_new_token, deadline_s=10, what="the sidecar to use the new token",
                 interval_s=0.1)
        assert "token file changed" in sidecar.log_path.read_text()
    finally:
        assert sidecar.stop() == 0
        central.stop()
