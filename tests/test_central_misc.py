"""Locations, UNIMPLEMENTED RPCs and process behaviour of ``valv central``.

Every test drives a real central process, through Google's official client
where there is an RPC to call.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from tests.helpers import CALL, STARTUP_DEADLINE_S, CentralProcess, wait_for

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT


def run_valv(*args: str, env: dict[str, str] | None = None,
             timeout: float = STARTUP_DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "valv", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          check=False)


def make_key(kms: Client, project: str, location: str = "global") -> str:
    ring = kms.create_key_ring(
        request={"parent": f"projects/{project}/locations/{location}", "key_ring_id": "r",
                 "key_ring": {}}, **CALL).name
    return kms.create_crypto_key(
        request={"parent": ring, "crypto_key_id": "k",
                 "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL).name


def round_trip(kms: Client, key: str, plaintext: bytes) -> bytes:
    ct = kms.encrypt(request={"name": key, "plaintext": plaintext}, **CALL).ciphertext
    return bytes(kms.decrypt(request={"name": key, "ciphertext": ct}, **CALL).plaintext)


# ---- Locations mixin --------------------------------------------------------------


def test_list_locations_lists_global(kms: Client) -> None:
    resp = kms.list_locations(request={"name": "projects/p"}, **CALL)
    names = [loc.name for loc in resp.locations]
    assert names == ["projects/p/locations/global"]
    assert resp.locations[0].location_id == "global"


def test_get_location(kms: Client) -> None:
    loc = kms.get_location(request={"name": "projects/p/locations/global"}, **CALL)
    assert loc.name == "projects/p/locations/global"
    assert loc.location_id == "global"
    with pytest.raises(gexc.NotFound) as info:
        kms.get_location(request={"name": "projects/p/locations/europe-west1"}, **CALL)
    assert "europe-west1" in str(info.value)
    with pytest.raises(gexc.InvalidArgument):
        kms.get_location(request={"name": "projects/p"}, **CALL)


def test_key_ring_in_unserved_location_is_not_found(kms: Client, project: str) -> None:
    with pytest.raises(gexc.NotFound):
        kms.create_key_ring(
            request={"parent": f"projects/{project}/locations/europe-west1",
                     "key_ring_id": "r", "key_ring": {}}, **CALL)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_configured_locations(tmp_path: Path, project: str, how: str) -> None:
    locations = "global,europe-west1"
    if how == "flag":
        process = CentralProcess(tmp_path / "c", "--locations", locations)
    else:
        process = CentralProcess(tmp_path / "c", env={"VALV_LOCATIONS": locations})
    process.start()
    try:
        kms = process.client()
        resp = kms.list_locations(request={"name": f"projects/{project}"}, **CALL)
        assert sorted(loc.location_id for loc in resp.locations) == ["europe-west1", "global"]
        loc = kms.get_location(
            request={"name": f"projects/{project}/locations/europe-west1"}, **CALL)
        assert loc.location_id == "europe-west1"
        key = make_key(kms, project, "europe-west1")
        assert key.startswith(f"projects/{project}/locations/europe-west1/keyRings/r/")
        assert round_trip(kms, key, b"in europe") == b"in europe"
        with pytest.raises(gexc.NotFound):
            kms.create_key_ring(
                request={"parent": f"projects/{project}/locations/us-east1",
                         "key_ring_id": "r", "key_ring": {}}, **CALL)
    finally:
        assert process.stop() == 0


# ---- UNIMPLEMENTED ------------------------------------------------------------------

V = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"
K = "projects/p/locations/global/keyRings/r/cryptoKeys/k"
R = "projects/p/locations/global/keyRings/r"
L = "projects/p/locations/global"

# Every RPC of Google's client that Valv does not serve yet, with a request for it.
NOT_BUILT: dict[str, dict[str, Any]] = {
    "asymmetric_sign": {"name": V, "data": b"x"},
    "asymmetric_decrypt": {"name": V, "ciphertext": b"x"},
    "mac_sign": {"name": V, "data": b"x"},
    "mac_verify": {"name": V, "data": b"x", "mac": b"x"},
    "raw_encrypt": {"name": V, "plaintext": b"x"},
    "raw_decrypt": {"name": V, "ciphertext": b"x"},
    "decapsulate": {"name": V, "ciphertext": b"x"},
    "get_public_key": {"name": V},
    "import_crypto_key_version": {"parent": K},
    "import_trusted_key_wrapped_crypto_key_version": {"parent": K},
    "export_trusted_key_wrapped_crypto_key_version": {"name": V},
    "create_import_job": {"parent": R, "import_job_id": "j", "import_job": {}},
    "get_import_job": {"name": f"{R}/importJobs/j"},
    "list_import_jobs": {"parent": R},
    "delete_crypto_key": {"name": K},
    "delete_crypto_key_version": {"name": V},
    "get_retired_resource": {"name": f"{L}/retiredResources/x"},
    "list_retired_resources": {"parent": L},
    "get_operation": {"name": "operations/x"},
}

# What Valv serves today.
BUILT = {
    "list_key_rings", "list_crypto_keys", "list_crypto_key_versions", "get_key_ring",
    "get_crypto_key", "get_crypto_key_version", "create_key_ring", "create_crypto_key",
    "create_crypto_key_version", "update_crypto_key", "update_crypto_key_version",
    "update_crypto_key_primary_version", "destroy_crypto_key_version",
    "restore_crypto_key_version", "encrypt", "decrypt", "generate_random_bytes",
    "list_locations", "get_location",
    "get_iam_policy", "set_iam_policy", "test_iam_permissions",  # tests/test_iam_client.py
}


def client_rpcs() -> set[str]:
    """Every RPC Google's client can call: the transport's callable properties."""
    non_rpc = {"grpc_channel", "operations_client", "kind"}
    return {name for name, value in vars(KeyManagementServiceGrpcTransport).items()
            if isinstance(value, property) and not name.startswith("_")
            and name not in non_rpc}


def test_unimplemented_list_covers_every_client_rpc() -> None:
    rpcs = client_rpcs()
    assert not set(NOT_BUILT) & BUILT
    assert rpcs == set(NOT_BUILT) | BUILT, (
        f"classify these RPCs: {sorted(rpcs ^ (set(NOT_BUILT) | BUILT))}")


@pytest.mark.parametrize("method", sorted(NOT_BUILT))
def test_unbuilt_rpc_is_unimplemented_naming_the_method(kms: Client, method: str) -> None:
    camel = "".join(part.capitalize() for part in method.split("_"))
    with pytest.raises(gexc.MethodNotImplemented) as info:
        # List pagers and long-running operation wrappers call the RPC right away.
        getattr(kms, method)(request=NOT_BUILT[method], **CALL)
    assert camel in str(info.value)


# ---- process behaviour ------------------------------------------------------------


def test_help_lists_every_setting_with_its_env_var() -> None:
    result = run_valv("central", "--help", env={"COLUMNS": "300"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z-]+)", text)) - {"help"}
    expected = {"addr", "unix-socket", "data-dir", "store", "master-key-file", "log-level",
                "locations", "default-rotation-period", "ready-file"}
    assert expected <= flags
    for flag in flags:
        env = "VALV_" + flag.upper().replace("-", "_")
        assert f"env {env}" in text, f"--{flag} does not show {env}"


def test_dev_master_key_created_0600_with_warning_and_reused(
        fresh_central: CentralProcess, project: str) -> None:
    key_file = fresh_central.data_dir / "master.key"
    st = key_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    first = key_file.read_bytes()
    log = fresh_central.logs()
    warnings = [json.loads(line) for line in log.splitlines()
                if "DEVELOPMENT ROOT KEY" in line]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert str(key_file) in warnings[0]["msg"]
    assert warnings[0]["created"] is True

    kms = fresh_central.client()
    key = make_key(kms, project)
    ct = kms.encrypt(request={"name": key, "plaintext": b"kept"}, **CALL).ciphertext
    fresh_central.restart()
    assert key_file.read_bytes() == first
    assert key_file.stat().st_ino == st.st_ino
    again = [json.loads(line) for line in fresh_central.logs().splitlines()
             if "DEVELOPMENT ROOT KEY" in line]
    assert len(again) == 2
    assert again[1]["created"] is False
    assert str(key_file) in again[1]["msg"]
    kms = fresh_central.client()
    assert kms.decrypt(request={"name": key, "ciphertext": ct}, **CALL).plaintext == b"kept"


def write_key_file(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    path.chmod(mode)
    return path


@pytest.mark.parametrize("problem", ["missing", "garbage", "world-readable", "directory"])
def test_bad_master_key_file_exits_with_a_clear_error(tmp_path: Path, problem: str) -> None:
    key = tmp_path / "rmk.key"
    expect = {"missing": "does not exist", "garbage": "base64",
              "world-readable": "chmod 600", "directory": str(key)}[problem]
    if problem == "garbage":
        key.write_bytes(b"not a key\n")
        key.chmod(0o600)
    elif problem == "world-readable":
        write_key_file(key, 0o644)
    elif problem == "directory":
        key.mkdir()
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      "--master-key-file", str(key))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert str(key) in result.stderr
    assert expect in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(error_lines) == 1
    assert not (tmp_path / "d" / "master.key").exists()


def test_bad_store_url_exits_with_a_clear_error(tmp_path: Path) -> None:
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      env={"VALV_STORE": "bogus://nowhere"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bogus" in result.stderr


@pytest.mark.parametrize(("env", "expect"), [
    ({"VALV_ADDR": "nonsense"}, "not an address"),
    ({"VALV_ADDR": "127.0.0.1:99999"}, "0-65535"),
    ({"VALV_DEFAULT_ROTATION_PERIOD": "fortnightly"}, "not a duration"),
    ({"VALV_LOG_LEVEL": "loud"}, "LOUD"),
    ({"VALV_LOCATIONS": "global,eu/west"}, "eu/west"),
])
def test_bad_setting_exits_with_a_clear_error(tmp_path: Path, env: dict[str, str],
                                              expect: str) -> None:
    result = run_valv("central", "--data-dir", str(tmp_path / "d"), env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert expect in result.stderr


def test_listen_address_in_use_exits_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_valv("central", "--data-dir", str(tmp_path / "d"),
                          "--addr", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "address already in use" in result.stderr


def test_master_key_files_and_rotation(tmp_path: Path, project: str) -> None:
    old = write_key_file(tmp_path / "old.key")
    new = write_key_file(tmp_path / "new.key")
    process = CentralProcess(tmp_path / "c", env={"VALV_MASTER_KEY_FILE": str(old)}).start()
    try:
        assert "DEVELOPMENT ROOT KEY" not in process.logs()
        assert not (process.data_dir / "master.key").exists()
        kms = process.client()
        key = make_key(kms, project)
        ct = kms.encrypt(request={"name": key, "plaintext": b"old rmk"}, **CALL).ciphertext
        process.stop()
        process.extra_args = ("--master-key-file", f"{old},{new}")
        process.start()
        kms = process.client()
        # Records and KEKs wrapped under the old RMK still open; new ones use the new RMK.
        assert kms.decrypt(request={"name": key, "ciphertext": ct}, **CALL).plaintext == (
            b"old rmk")
        v2 = kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}},
                                           **CALL).name
        assert round_trip(kms, v2.rsplit("/cryptoKeyVersions/", 1)[0], b"x") == b"x"
    finally:
        assert process.stop() == 0


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to ~107 bytes."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="valv") as d:
        yield Path(d)


def test_unix_socket_serves(tmp_path: Path, short_tmp: Path, project: str) -> None:
    sock = short_tmp / "kms.sock"
    process = CentralProcess(tmp_path / "c", "--unix-socket", str(sock)).start()
    try:
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        ready = json.loads((process.data_dir / "ready.json").read_text())
        assert ready["unix_socket"] == str(sock)
        channel = grpc.insecure_channel("unix:" + str(sock))
        kms = Client(transport=KeyManagementServiceGrpcTransport(channel=channel))
        key = make_key(kms, project)
        assert round_trip(kms, key, b"over a unix socket") == b"over a unix socket"
        # The same store answers on TCP too.
        assert process.client().get_crypto_key(request={"name": key}, **CALL).name == key
        channel.close()
    finally:
        assert process.stop() == 0
    assert not sock.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(fresh_central: CentralProcess, project: str,
                                   sig: signal.Signals) -> None:
    kms = fresh_central.client()
    make_key(kms, project)
    assert fresh_central.stop(sig) == 0
    log = fresh_central.logs()
    assert "shutdown requested" in log
    assert "valv central stopped" in log
    assert "Traceback" not in log
    # Stopped means stopped: the port refuses calls.
    with pytest.raises(gexc.ServiceUnavailable):
        kms.get_location(request={"name": "projects/p/locations/global"}, **CALL)


def test_restart_after_signal_keeps_data(fresh_central: CentralProcess, project: str) -> None:
    kms = fresh_central.client()
    key = make_key(kms, project)
    fresh_central.restart()
    kms = fresh_central.client()
    got = kms.get_crypto_key(request={"name": key}, **CALL)
    assert got.primary.name == f"{key}/cryptoKeyVersions/1"


class RawGrpc:
    """A bare HTTP/2 gRPC client, so a test can hold a call open between its headers
    and its request message (Google's client sends both at once)."""

    def __init__(self, addr: str) -> None:
        import h2.config
        import h2.connection

        host, port = addr.rsplit(":", 1)
        self.addr = addr
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.meta: dict[int, dict[bytes, bytes]] = {}
        self.body: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.pongs = 0
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def _pump(self) -> None:
        import h2.events

        chunk = self.sock.recv(65536)
        assert chunk, "the server closed the connection"
        for event in self.conn.receive_data(chunk):
            if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                self.meta.setdefault(event.stream_id, {}).update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                self.body[event.stream_id] = self.body.get(event.stream_id, b"") + event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length,
                                                    event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.PingAckReceived):
                self.pongs += 1
        self.flush()

    def sync(self) -> None:
        """Round-trip a PING: the server has then processed every frame sent before it."""
        expected = self.pongs + 1
        self.conn.ping(b"valvsync")
        self.flush()
        while self.pongs < expected:
            self._pump()

    def start_call(self, stream_id: int, method: str) -> None:
        self.conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":authority", self.addr),
            (":path", f"/google.cloud.kms.v1.KeyManagementService/{method}"),
            ("content-type", "application/grpc"), ("te", "trailers")])
        self.flush()

    def send_request(self, stream_id: int, message: bytes) -> None:
        frame = b"\x00" + len(message).to_bytes(4, "big") + message
        self.conn.send_data(stream_id, frame, end_stream=True)
        self.flush()

    def finish(self, stream_ids: set[int]) -> dict[int, tuple[dict[bytes, bytes], bytes]]:
        """Read until every stream in ``stream_ids`` ended: (headers+trailers, body)."""
        while not stream_ids <= self.ended:
            self._pump()
        self.sock.close()
        return {s: (self.meta.get(s, {}), self.body.get(s, b"")) for s in stream_ids}


def test_sigterm_lets_a_call_in_flight_finish(fresh_central: CentralProcess) -> None:
    request = kms_v1.GenerateRandomBytesRequest.serialize(kms_v1.GenerateRandomBytesRequest(
        location="projects/p/locations/global", length_bytes=16))
    raw = RawGrpc(fresh_central.addr)
    raw.start_call(1, "GenerateRandomBytes")  # in flight: headers in, message not yet
    # grpclib starts the handler (which counts the call) when the headers arrive, before
    # it answers a later PING, so after this round trip the call is in flight.
    raw.sync()
    assert fresh_central.proc is not None
    fresh_central.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: '"in_flight": 1' in fresh_central.logs(), deadline_s=10,
             what="central to start draining the call in flight")
    raw.start_call(3, "GenerateRandomBytes")  # a new call while draining
    raw.send_request(3, request)
    raw.send_request(1, request)
    results = raw.finish({1, 3})

    meta, body = results[1]
    assert meta[b"grpc-status"] == b"0"
    response = kms_v1.GenerateRandomBytesResponse.deserialize(body[5:])
    assert len(response.data) == 16
    assert response.data_crc32c == int(google_crc32c.value(response.data))
    meta, _ = results[3]
    assert meta[b"grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0]).encode()
    assert b"shutting down" in meta[b"grpc-message"]

    assert fresh_central.proc.wait(timeout=30) == 0
    assert "valv central stopped" in fresh_central.logs()


@pytest.mark.parametrize(("method", "payload"), [
    ("GenerateRandomBytes", b"\x10"),  # truncated varint
    ("Encrypt", b"\x0a\x02\xff\xfe"),  # name is not UTF-8
    ("Decrypt", b"\x0a\x01\xc3"),  # name is a truncated UTF-8 sequence
])
def test_undecodable_request_is_invalid_argument(central: CentralProcess, method: str,
                                                 payload: bytes) -> None:
    raw = RawGrpc(central.addr)
    raw.start_call(1, method)
    raw.send_request(1, payload)
    meta, _ = raw.finish({1})[1]
    assert meta[b"grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]).encode()
    assert f"{method}Request".encode() in meta[b"grpc-message"]
    assert "Traceback" not in central.logs()


def test_unix_socket_path_never_replaces_a_regular_file(tmp_path: Path, short_tmp: Path) -> None:
    precious = short_tmp / "master.key"
    precious.write_bytes(b"do not delete me")
    result = subprocess.run(
        [sys.executable, "-m", "valv", "central", "--addr", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "c"), "--unix-socket", str(precious)],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not a socket" in result.stderr
    assert precious.read_bytes() == b"do not delete me"


def test_a_stale_unix_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path,
                                                              short_tmp: Path) -> None:
    sock_path = short_tmp / "kms.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock_path))
    stale.close()  # bound but nobody listens: what a killed process leaves behind
    first = CentralProcess(tmp_path / "a", "--unix-socket", str(sock_path)).start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "valv", "central", "--addr", "127.0.0.1:0",
             "--data-dir", str(tmp_path / "b"), "--unix-socket", str(sock_path)],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "already serving" in second.stderr
    finally:
        assert first.stop() == 0


@pytest.mark.parametrize("method", ["Encrypt", "CreateKeyRing", "GetKeyRing"])
def test_a_call_without_its_request_message_is_invalid_argument(central: CentralProcess,
                                                                method: str) -> None:
    """A stream that ends before its message must not reach a handler (or INTERNAL)."""
    raw = RawGrpc(central.addr)
    raw.start_call(1, method)
    raw.conn.end_stream(1)
    raw.flush()
    meta, _ = raw.finish({1})[1]
    assert meta[b"grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0]).encode()
    assert b"missing" in meta[b"grpc-message"]
    assert "Traceback" not in central.logs()
