"""Shared test helpers: real central processes and Google's official client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

# Google's client retries UNAVAILABLE for a minute by default: fail fast instead.
CALL: dict[str, Any] = {"retry": None, "timeout": 10}

STARTUP_DEADLINE_S = 30.0


def wait_for(condition: Callable[[], Any], *, deadline_s: float, what: str,
             interval_s: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something truthy, or fail after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(interval_s)


class CentralProcess:
    """A real ``valv central`` process on 127.0.0.1 with an OS-assigned port."""

    def __init__(self, data_dir: Path, *extra_args: str, env: dict[str, str] | None = None
                 ) -> None:
        self.data_dir = data_dir
        self.extra_args = extra_args
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.log_path = data_dir / "central.log"

    def start(self) -> CentralProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready = self.data_dir / "ready.json"
        ready.unlink(missing_ok=True)
        env = {**os.environ, **self.env}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "valv", "central", "--addr", "127.0.0.1:0",
                 "--data-dir", str(self.data_dir), "--ready-file", str(ready),
                 *self.extra_args],
                stdout=log, stderr=log, env=env)

        def is_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"central exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            return ready.exists()

        wait_for(is_ready, deadline_s=STARTUP_DEADLINE_S, what="central to start")
        self.addr = json.loads(ready.read_text())["addr"]
        return self

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

    def restart(self) -> CentralProcess:
        self.stop()
        return self.start()

    def logs(self) -> str:
        return self.log_path.read_text()

    def client(self) -> kms_v1.KeyManagementServiceClient:
        channel = grpc.insecure_channel(self.addr)
        return kms_v1.KeyManagementServiceClient(
            transport=KeyManagementServiceGrpcTransport(channel=channel))
