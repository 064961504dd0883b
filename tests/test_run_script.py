"""The README's run command, ./run.sh, end to end: central plus a sidecar on the
embedded store with a development root key made on first start, and the example
it prints works against both. Uses the repository's .venv as run.sh does (./test.sh
and CI create it); skipped without one rather than installing from the network."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from google.cloud import kms_v1

from tests.helpers import CALL, STARTUP_DEADLINE_S, wait_for
from tests.sidecar_support import kms_client

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv" / "bin" / "python"

def _installed() -> bool:
    """As run.sh decides: an install marker newer than pyproject.toml (else it would
    install from the network in the middle of the suite)."""
    project = (REPO / "pyproject.toml").stat().st_mtime
    return any(marker.exists() and marker.stat().st_mtime >= project
               for marker in (REPO / ".venv" / ".valv-dev-installed",
                              REPO / ".venv" / ".valv-installed"))


pytestmark = pytest.mark.skipif(
    not _installed(),
    reason="no up-to-date install in the .venv next to run.sh (./test.sh or .ci/run make one)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_run_sh_starts_central_and_a_sidecar_and_prints_how_to_call_them(
        tmp_path: Path) -> None:
    data = tmp_path / "valv-data"
    central, sidecar = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VALV_")}
    env.update(VALV_DATA_DIR=str(data), VALV_CENTRAL_ADDR=central, VALV_SIDECAR_ADDR=sidecar)
    proc = subprocess.Popen(["bash", str(REPO / "run.sh")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")),
                              daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        def banner() -> bool:
            assert proc.poll() is None, "".join(lines)
            return any("Valv is running" in line for line in lines)

        wait_for(banner, deadline_s=2 * STARTUP_DEADLINE_S, what="run.sh's banner",
                 interval_s=0.05)
        output = "".join(lines)
        # How to call each, with the addresses it was given.
        assert f"central  {central}" in output and f"sidecar  {sidecar}" in output, output
        assert f"unix:{data / 'sidecar.sock'}" in output, output
        # The development root key: made on first start, owner-only, loudly announced.
        assert stat.S_IMODE((data / "master.key").stat().st_mode) == 0o600
        assert "DEVELOPMENT ROOT KEY IN USE" in output and "was just created" in output, output

        # The example it points to works, through TCP and the unix socket.
        for address in (sidecar, f"unix:{data / 'sidecar.sock'}"):
            example = subprocess.run(
                [str(VENV_PYTHON), str(REPO / "examples" / "quickstart.py"),
                 "--central", central, "--sidecar", address],
                capture_output=True, text=True, timeout=60, env=env)
            assert example.returncode == 0, example.stdout + example.stderr
            assert "sidecar wrapped" in example.stdout, example.stdout
        # And Google's client works against the sidecar.
        client = kms_client(sidecar)
        key = "projects/demo/locations/global/keyRings/quickstart/cryptoKeys/orders"
        made = client.encrypt(request={"name": key, "plaintext": b"dek"}, **CALL)
        assert isinstance(made, kms_v1.EncryptResponse)
        assert kms_client(central).decrypt(
            request={"name": key, "ciphertext": made.ciphertext}, **CALL).plaintext == b"dek"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C stops both
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
    # Both are gone: nothing listens on either address any more.
    for address in (central, sidecar):
        host, port = address.rsplit(":", 1)
        with socket.socket() as probe:
            assert probe.connect_ex((host, int(port))) != 0, f"{address} still listening"
