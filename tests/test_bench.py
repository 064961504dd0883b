"""`valv bench`: its delay proxy, its arithmetic, and the command end to end in a tiny
configuration (a smoke test; the speed goals live in the benchmark's own output)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.server import Server

from valv import bench
from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.netutil import bound_port

ONE_WAY_S = 0.001


@pytest.fixture
async def echo_server() -> AsyncIterator[int]:
    """The bench's floor (grpclib echo) in this process, on a port from the OS."""
    server = Server([bench.EchoService()])
    await server.start("127.0.0.1", 0)
    yield bound_port(server)
    server.close()
    await server.wait_closed()


@pytest.fixture
async def byte_echo() -> AsyncIterator[int]:
    """A raw TCP server that sends back every byte it gets, then half-closes on EOF."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def test_delay_proxy_adds_a_two_ms_round_trip(echo_server: int) -> None:
    proxy = bench.DelayProxy("127.0.0.1", echo_server, ONE_WAY_S)
    port = await proxy.start()
    channel = Channel("127.0.0.1", port)
    stub = kms_v1.KeyManagementServiceStub(channel)
    request = kms_v1.EncryptRequest(name="k", plaintext=bench.DEK)
    try:
        response = await stub.encrypt(request)
        assert response.ciphertext == bench.DEK
        sample = await bench.measure(lambda: stub.encrypt(request), 1, 60)
        # Several calls in flight on one connection all arrive, in order, intact.
        many = await bench.measure(lambda: stub.encrypt(request), 16, 64)
    finally:
        channel.close()
        await proxy.close()
    assert sample.calls == 60 and many.calls == 64
    assert sample.percentile(50) >= 2 * ONE_WAY_S
    assert min(sample.latencies) >= 2 * ONE_WAY_S


async def test_delay_proxy_passes_bytes_intact_in_order_and_eof(byte_echo: int) -> None:
    proxy = bench.DelayProxy("127.0.0.1", byte_echo, ONE_WAY_S)
    port = await proxy.start()
    payload = os.urandom(3 * 1024 * 1024 + 17)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            for offset in range(0, len(payload), 50_000):  # many chunks, pipelined
                writer.write(payload[offset:offset + 50_000])
                await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = await reader.read()  # up to EOF: the echo's half-close came through
        await sending
        writer.close()
        await writer.wait_closed()
    finally:
        await proxy.close()
    assert len(received) == len(payload)
    assert received == payload


async def test_delay_proxy_closes_the_client_when_upstream_is_gone() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = int(probe.sockets[0].getsockname()[1])
    probe.close()
    await probe.wait_closed()
    proxy = bench.DelayProxy("127.0.0.1", dead_port, ONE_WAY_S)
    port = await proxy.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read() == b""
        writer.close()
    finally:
        await proxy.close()


def test_percentiles_are_nearest_rank() -> None:
    sample = bench.Sample(2.0, [i / 1000 for i in range(100, 0, -1)])
    assert sample.calls == 100
    assert sample.rate == 50
    assert sample.percentile(50) == 0.050
    assert sample.percentile(99) == 0.099
    assert sample.percentile(100) == 0.100
    assert bench.Sample().percentile(50) == 0.0


def test_parse_metrics_sums_label_sets_and_skips_comments() -> None:
    text = (
        "# HELP valv_sidecar_central_fetches_total FetchVersion calls\n"
        "# TYPE valv_sidecar_central_fetches_total counter\n"
        "valv_sidecar_central_fetches_total 3\n"
        'valv_sidecar_forwarded_calls_total{method="GetCryptoKey"} 2\n'
        'valv_sidecar_forwarded_calls_total{method="Encrypt"} 5\n'
        "valv_sidecar_cache_entries 10001\n"
    )
    metrics = bench.parse_metrics(text)
    assert bench.central_calls(metrics) == (3.0, 7.0)
    assert metrics["valv_sidecar_cache_entries"] == 10001


def test_ratios_pair_each_row_with_its_floor_and_the_remote_central() -> None:
    def row(op: str, n: int, server: str, transport: str, rps: float) -> dict[str, Any]:
        return {"op": op, "concurrency": n, "server": server, "transport": transport, "rps": rps}

    rows = [row("encrypt", 1, "a. echo (floor)", "tcp", 1000),
            row("encrypt", 1, "a. echo (floor)", "unix", 2000),
            row("encrypt", 1, "b. sidecar", "tcp", 900),
            row("encrypt", 1, "b. sidecar", "unix", 1000),
            row("encrypt", 1, "c. central", "tcp", 500),
            row("encrypt", 1, "d. central+2ms", "tcp", 300)]
    ratios = {(r["name"], r["transport"]): r for r in bench._ratios(rows)}
    assert ratios[("b/a", "tcp")]["value"] == 0.9 and ratios[("b/a", "tcp")]["meets_goal"]
    assert ratios[("b/a", "unix")]["value"] == 0.5
    assert not ratios[("b/a", "unix")]["meets_goal"]
    assert ratios[("c/a", "tcp")]["value"] == 0.5 and ratios[("c/a", "tcp")]["goal"] is None
    assert ratios[("b/d", "tcp")]["value"] == 3.0 and ratios[("b/d", "tcp")]["meets_goal"]
    assert ratios[("b/d", "unix")]["value"] == round(1000 / 300, 3)


def _bench(*args: str, timeout: float = 300) -> dict[str, Any]:
    result = subprocess.run([sys.executable, "-m", "valv", "bench", *args, "--json"],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _check_rows(report: dict[str, Any], servers: set[tuple[str, str]], calls: int) -> None:
    seen: dict[tuple[str, int], set[tuple[str, str]]] = {}
    for row in report["rows"]:
        assert row["calls"] == calls
        assert row["rps"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
        seen.setdefault((row["op"], row["concurrency"]), set()).add(
            (row["server"], row["transport"]))
    assert set(seen) == {(op, n) for op in ("encrypt", "decrypt") for n in (1, 4)}
    for found in seen.values():
        assert found == servers


def test_bench_default_suite_compares_central_with_the_floor() -> None:
    report = _bench("--calls", "40", "--concurrency", "1,4", "--rounds", "2")
    assert report["suite"] == "central"
    _check_rows(report, {("a. echo (floor)", "tcp"), ("c. central", "tcp")}, 40)
    rows = {(r["op"], r["concurrency"], r["server"]): r for r in report["rows"]}
    assert len(report["ratios"]) == 4
    for ratio in report["ratios"]:
        assert ratio["name"] == "c/a"
        central = rows[(ratio["op"], ratio["concurrency"], "c. central")]["rps"]
        floor = rows[(ratio["op"], ratio["concurrency"], "a. echo (floor)")]["rps"]
        assert abs(ratio["value"] - central / floor) < 0.002


def test_bench_sidecar_suite_produces_every_row_and_the_sidecar_figures() -> None:
    report = _bench("--suite", "sidecar", "--calls", "40", "--concurrency", "1,4",
                    "--sidecar-calls", "300", "--memory", "--memory-versions", "40")
    _check_rows(report, {("a. echo (floor)", "tcp"), ("a. echo (floor)", "unix"),
                         ("b. sidecar", "tcp"), ("b. sidecar", "unix"),
                         ("c. central", "tcp"), ("c. central", "unix"),
                         ("d. central+2ms", "tcp")}, 40)
    remote = [r for r in report["rows"] if r["server"] == "d. central+2ms"]
    assert all(r["p50_ms"] >= 2 for r in remote)
    assert report["injected_rtt_p50_ms"] > 0
    names = {(r["name"], r["op"], r["concurrency"], r["transport"]) for r in report["ratios"]}
    for op in ("encrypt", "decrypt"):
        for transport in ("tcp", "unix"):
            assert ("b/d", op, 1, transport) in names
            assert all(("b/a", op, n, transport) in names for n in (1, 4))
    counted = report["sidecar_central_calls"]
    assert counted["encrypts"] == 300
    assert counted["central_calls"] >= 1  # a fresh key: at least the first miss
    assert counted["per_100k"] == round(counted["central_calls"] * 100_000 / 300, 2)
    memory = report["sidecar_memory"]
    assert memory["versions"] == 40
    assert memory["rss_mb"] > 0 and memory["rss_before_mb"] > 0
    assert memory["cache_entries"] >= 40


def test_bench_refuses_nonsense() -> None:
    for args in (["--calls", "0"], ["--concurrency", "0"], ["--rounds", "0"],
                 ["--ops", "sign"], ["--concurrency", "x"]):
        result = subprocess.run([sys.executable, "-m", "valv", "bench", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, args
        assert "error" in result.stderr
