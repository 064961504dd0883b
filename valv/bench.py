"""``valv bench``: central Encrypt throughput against a bare grpclib baseline.

Both servers run as separate processes on 127.0.0.1 and are driven by the same
grpclib client in this process, so the ratio shows what Valv's own per-call
work costs on top of grpclib's HTTP/2. Absolute numbers vary a lot between
machines and runs; the ratio, measured in the same run, is the figure to
compare.

The baseline is an echo server for the same method path
(/google.cloud.kms.v1.KeyManagementService/Encrypt) that returns the plaintext
as the ciphertext without any storage or crypto.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grpclib.client import Channel
from grpclib.server import Server

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.netutil import bound_port

DEK = bytes(range(32))


class EchoService(kms_v1.KeyManagementServiceBase):
    """The baseline: Encrypt that does no work."""

    async def encrypt(self, message: kms_v1.EncryptRequest) -> kms_v1.EncryptResponse:
        return kms_v1.EncryptResponse(name=message.name, ciphertext=message.plaintext)


async def _serve_echo(ready_file: Path) -> None:
    server = Server([EchoService()])
    await server.start("127.0.0.1", 0)
    port = bound_port(server)
    ready_file.write_text(json.dumps({"addr": f"127.0.0.1:{port}"}))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


@dataclass
class Result:
    label: str
    concurrency: int
    calls: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


async def _drive(addr: str, key_name: str, concurrency: int, calls: int) -> float:
    host, port = addr.rsplit(":", 1)
    channel = Channel(host, int(port))
    stub = kms_v1.KeyManagementServiceStub(channel)
    request = kms_v1.EncryptRequest(name=key_name, plaintext=DEK)
    try:
        for _ in range(min(50, calls)):  # warm up connections and caches
            await stub.encrypt(request)
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await stub.encrypt(request)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start
    finally:
        channel.close()


def _start(args: list[str], ready: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "valv", *args], stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start; log: {log}\n{log.read_text()}")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())["addr"]


async def _prepare_key(addr: str) -> str:
    host, port = addr.rsplit(":", 1)
    channel = Channel(host, int(port))
    stub = kms_v1.KeyManagementServiceStub(channel)
    ring = await stub.create_key_ring(kms_v1.CreateKeyRingRequest(
        parent="projects/bench/locations/global", key_ring_id=f"r{os.getpid()}"))
    key = await stub.create_crypto_key(kms_v1.CreateCryptoKeyRequest(
        parent=ring.name, crypto_key_id="dek-wrapper",
        crypto_key=kms_v1.CryptoKey(purpose=kms_v1.CryptoKeyCryptoKeyPurpose.ENCRYPT_DECRYPT)))
    channel.close()
    return str(key.name)


def run_bench(calls: int, concurrencies: list[int]) -> list[tuple[Result, Result]]:
    with tempfile.TemporaryDirectory(prefix="valv-bench-") as tmp:
        work = Path(tmp)
        central, central_addr = _start(
            ["central", "--addr", "127.0.0.1:0", "--data-dir", str(work / "data"),
             "--ready-file", str(work / "central.json"), "--log-level", "warning"],
            work / "central.json", work / "central.log")
        procs = [central]
        try:
            echo, echo_addr = _start(["bench", "--echo-server", str(work / "echo.json")],
                                     work / "echo.json", work / "echo.log")
            procs.append(echo)
            key_name = asyncio.run(_prepare_key(central_addr))
            pairs = []
            for concurrency in concurrencies:
                # Interleave baseline and Valv so drift in machine load hits both.
                base = asyncio.run(_drive(echo_addr, key_name, concurrency, calls))
                valv = asyncio.run(_drive(central_addr, key_name, concurrency, calls))
                pairs.append((Result("grpclib echo", concurrency, calls, base),
                               Result("valv central", concurrency, calls, valv)))
            return pairs
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="measure central Encrypt against a bare grpclib baseline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=5000, help="calls per measurement")
    p.add_argument("--concurrency", default="1,64",
                   help="comma-separated numbers of calls in flight")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--echo-server", metavar="READY_FILE", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.echo_server:
        asyncio.run(_serve_echo(Path(args.echo_server)))
        return 0
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.calls < 1 or not concurrencies or min(concurrencies) < 1:
        print("valv bench: error: --calls and --concurrency must be positive", file=sys.stderr)
        return 2
    pairs = run_bench(args.calls, concurrencies)
    rows = []
    for base, valv in pairs:
        rows.append({"concurrency": base.concurrency, "calls": base.calls,
                     "baseline_rps": round(base.rate, 1), "valv_rps": round(valv.rate, 1),
                     "ratio": round(valv.rate / base.rate, 3)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print("Encrypt of a 32-byte DEK, 127.0.0.1 TCP, grpclib client")
        print(f"{'in flight':>9}  {'baseline req/s':>14}  {'valv req/s':>10}  "
              f"{'valv/baseline':>13}")
        for row in rows:
            print(f"{row['concurrency']:>9}  {row['baseline_rps']:>14.1f}  "
                  f"{row['valv_rps']:>10.1f}  {row['ratio']:>13.3f}")
    return 0
