"""Test support for real ``valv sidecar`` processes (like tests.helpers.CentralProcess).

``SidecarProcess`` starts ``python -m valv sidecar`` on 127.0.0.1 with an
OS-assigned port, always with ``--metrics-addr 127.0.0.1:0`` so tests can read
its Prometheus counters and probe ``/readyz``, and by default waits until the
watch stream to central is connected (``/readyz`` 200): the first HELLO drops
everything cached, so counting fetches before it would be racy.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from tests.helpers import CALL, STARTUP_DEADLINE_S, CentralProcess, wait_for

Client = kms_v1.KeyManagementServiceClient


def kms_client(target: str, credentials: grpc.ChannelCredentials | None = None) -> Client:
    """Google's official client on a gRPC channel to ``target`` (host:port or unix:/path)."""
    channel = (grpc.secure_channel(target, credentials) if credentials is not None
               else grpc.insecure_channel(target))
    return Client(transport=KeyManagementServiceGrpcTransport(channel=channel))


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, the plain ``name value`` lines (no labels are used)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


class SidecarProcess:
    """A real ``valv sidecar`` process with its metrics endpoint."""

    def __init__(self, work: Path, central: str, *extra_args: str, name: str = "sidecar",
                 env: dict[str, str] | None = None) -> None:
        """``env``: VALV_* settings for the process, on top of this one's environment
        without its own VALV_* (flags given here win over them, as in the CLI)."""
        self.work = work
        self.env = env
        self.central = central
        self.extra_args = extra_args
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.unix_socket: str | None = None
        self.metrics_url = ""
        self.log_path = work / f"{name}.log"

    def start(self, *, wait_ready: bool = True) -> SidecarProcess:
        self.work.mkdir(parents=True, exist_ok=True)
        ready = self.work / f"{self.name}-ready.json"
        ready.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "valv", "sidecar", "--addr", "127.0.0.1:0",
                 "--central", self.central, "--ready-file", str(ready),
                 "--metrics-addr", "127.0.0.1:0", *self.extra_args],
                stdout=log, stderr=log,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("VALV_")},
                     **(self.env or {})})

        def started() -> bool:
            self._check_alive()
            return ready.exists()

        wait_for(started, deadline_s=STARTUP_DEADLINE_S, what=f"{self.name} to start")
        info = json.loads(ready.read_text())
        self.addr, self.unix_socket = info["addr"], info["unix_socket"]
        self.metrics_url = f"http://{info['metrics']}"
        if wait_ready:
            self.wait_ready()
        return self

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")

    def wait_ready(self, deadline_s: float = STARTUP_DEADLINE_S) -> None:
        def ready() -> bool:
            self._check_alive()
            return self.readyz()[0] == 200

        wait_for(ready, deadline_s=deadline_s, what=f"{self.name}'s /readyz to be 200",
                 interval_s=0.02)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    # -- probes --------------------------------------------------------------------------

    def readyz(self) -> tuple[int, str]:
        return http_get(self.metrics_url + "/readyz")

    def healthz(self) -> tuple[int, str]:
        return http_get(self.metrics_url + "/healthz")

    def metrics(self) -> dict[str, float]:
        status, text = http_get(self.metrics_url + "/metrics")
        assert status == 200, text
        return parse_metrics(text)

    def metric(self, name: str) -> float:
        return self.metrics()[name]

    # -- clients -------------------------------------------------------------------------

    def client(self) -> Client:
        return kms_client(self.addr)

    def unix_client(self) -> Client:
        assert self.unix_socket is not None, "started without --unix-socket"
        return kms_client(f"unix:{self.unix_socket}")


# ---- authenticated centrals -----------------------------------------------------------------


def write_tokens(path: Path, tokens: dict[str, str]) -> Path:
    """A tokens file for ``{member: token}`` (only SHA-256 hashes are written)."""
    path.write_text(json.dumps(
        {member: hashlib.sha256(token.encode()).hexdigest() for member, token in tokens.items()}))
    return path


def write_policy(path: Path, bindings: dict[str, list[str]]) -> Path:
    """A root IAM policy file for ``{role: [members]}``."""
    path.write_text(json.dumps({"bindings": [
        {"role": role, "members": members} for role, members in bindings.items()]}))
    return path


class As:
    """Google's client calling as one member: its bearer token on every call."""

    def __init__(self, client: Client, token: str | None) -> None:
        self.client = client
        self.metadata = [("authorization", f"Bearer {token}")] if token else []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        call = getattr(self.client, method)

        def with_token(**request: Any) -> Any:
            return call(request=request, metadata=self.metadata, **CALL)

        return with_token


def failure(call: Callable[[], Any]) -> gexc.GoogleAPICallError:
    """The error ``call`` fails with (it must fail)."""
    try:
        call()
    except gexc.GoogleAPICallError as exc:
        return exc
    raise AssertionError("the call succeeded")


def central_on_same_port(previous: CentralProcess, *extra_args: str,
                         env: dict[str, str] | None = None) -> CentralProcess:
    """A new central on ``previous``'s data dir and port (after ``previous`` stopped)."""
    port = previous.addr.rsplit(":", 1)[1]
    process = CentralProcess(previous.data_dir, *previous.extra_args, *extra_args,
                             "--addr", f"127.0.0.1:{port}", env=env or previous.env)
    process.log_path = previous.log_path
    return process
