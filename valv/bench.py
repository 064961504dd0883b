"""``valv bench``: Encrypt/Decrypt of a 32-byte DEK, measured side by side.

Every server runs as its own process; this process is the one grpclib client
that drives them all, measurement after measurement, interleaved in rounds so
that drift in machine load hits every row alike. Each call is timed with
``perf_counter``; a row reports requests/s (calls / wall time) and the p50 and
p99 latency per call.

Servers (``--suite sidecar`` runs them all; the default ``--suite central`` is
the quick one, a. and c.):

  a. echo (floor)   a bare grpclib server for the same methods that echoes:
                    Encrypt returns the plaintext as the ciphertext, Decrypt
                    the ciphertext as the plaintext. No storage, no crypto.
                    TCP and a unix socket.
  b. sidecar        ``valv sidecar`` in front of ``valv central``, serving
                    Encrypt/Decrypt from its cache of KEKs. TCP and unix socket.
  c. central        ``valv central`` directly (dev mode, SQLite in a temp dir).
  d. central+2ms    central behind the bench's own TCP delay proxy, which holds
                    every chunk 1 ms in each direction (order kept per
                    connection, throughput not limited): a network round trip.

Central is only measured over TCP: it is a network service, reached over the
network; the sidecar and the floor are local, so they also get a unix socket.
Absolute numbers vary a lot between machines; compare the ratios printed
below the table, which are measured in the same run.

Also, with ``--suite sidecar`` (or when asked for): how many calls the sidecar
makes to central for ``--sidecar-calls`` Encrypts on a fresh key at the
default cache TTL (its ``valv_sidecar_central_fetches_total`` plus
``valv_sidecar_forwarded_calls_total`` metrics), and with ``--memory`` the
sidecar's resident memory with 10,000 KEK versions cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.server import Server

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.netutil import bind_unix_socket, bound_port, remove_unix_socket

DEK = bytes(range(32))

GOAL_SIDECAR_VS_FLOOR = 0.8  # b/a throughput
GOAL_SIDECAR_VS_REMOTE = 3.0  # b/d throughput at 1 in flight
GOAL_SIDECAR_RSS_MB = 80.0


# --- a. the floor -----------------------------------------------------------------------------


class EchoService(kms_v1.KeyManagementServiceBase):
    """The floor: Encrypt and Decrypt that do no work beyond grpclib's and betterproto's."""

    async def encrypt(self, message: kms_v1.EncryptRequest) -> kms_v1.EncryptResponse:
        return kms_v1.EncryptResponse(name=message.name, ciphertext=message.plaintext)

    async def decrypt(self, message: kms_v1.DecryptRequest) -> kms_v1.DecryptResponse:
        return kms_v1.DecryptResponse(plaintext=message.ciphertext)


async def _serve_echo(ready_file: Path, unix_socket: Path | None) -> None:
    servers = [Server([EchoService()])]
    await servers[0].start("127.0.0.1", 0)
    port = bound_port(servers[0])
    if unix_socket is not None:
        servers.append(Server([EchoService()]))
        await servers[1].start(sock=bind_unix_socket(unix_socket))
    _write_ready(ready_file, {"addr": f"127.0.0.1:{port}",
                              "unix_socket": str(unix_socket) if unix_socket else None,
                              "pid": os.getpid()})
    await _until_sigterm()
    for server in servers:
        server.close()
        await server.wait_closed()
    if unix_socket is not None:
        remove_unix_socket(unix_socket)


def _write_ready(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# --- d. the delay proxy -----------------------------------------------------------------------


class _Close:
    """Queue marker: the sending side closed (``eof``: half-closed) its connection."""

    def __init__(self, eof: bool) -> None:
        self.eof = eof


class _DelayedDirection:
    """One direction of a proxied connection: every chunk is written ``delay`` seconds after it
    arrived, in arrival order. Chunks don't wait for each other, so a busy connection keeps its
    throughput: the delay is latency, not a rate limit."""

    __slots__ = ("_delay", "_loop", "_queue", "_timer", "out")

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._queue: deque[tuple[float, bytes | _Close]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.out: asyncio.Transport | None = None

    def push(self, item: bytes | _Close) -> None:
        due = self._loop.time() + self._delay
        self._queue.append((due, item))
        if self._timer is None and self.out is not None:
            self._timer = self._loop.call_at(due, self._flush)

    def attach(self, out: asyncio.Transport) -> None:
        self.out = out
        if self._queue and self._timer is None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()

    def _flush(self) -> None:
        self._timer = None
        out = self.out
        assert out is not None
        queue = self._queue
        now = self._loop.time()
        while queue and queue[0][0] <= now:
            item = queue.popleft()[1]
            if isinstance(item, bytes):
                if not out.is_closing():
                    out.write(item)
            elif item.eof and out.can_write_eof() and not out.is_closing():
                out.write_eof()
            else:
                out.close()
        if queue:
            self._timer = self._loop.call_at(queue[0][0], self._flush)


class _ProxySide(asyncio.Protocol):
    """One socket of a proxied connection. What it receives goes into ``outgoing`` (towards the
    other socket); when its own send buffer fills up, it stops reading from the other socket."""

    def __init__(self, outgoing: _DelayedDirection, forget: Callable[[], None]) -> None:
        self.outgoing = outgoing
        self.transport: asyncio.Transport | None = None
        self.peer: _ProxySide | None = None
        self.lost = False
        self._forget = forget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(bytes(data))

    def eof_received(self) -> bool:
        self.outgoing.push(_Close(eof=True))
        return True  # keep the other half open until the peer closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.outgoing.push(_Close(eof=False))
        if self.peer is not None and self.peer.lost:
            self._forget()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class DelayProxy:
    """A TCP proxy to ``upstream`` that delays each direction by ``one_way_delay_s``.

    Chunks are held on the event loop with ``call_at``, in one queue per direction, so order
    is kept per connection and many chunks can be on their way at once. (The event loop wakes
    up with millisecond granularity, so each direction's delay is at least the given one and
    up to about 1 ms more.)
    """

    def __init__(self, upstream_host: str, upstream_port: int,
                 one_way_delay_s: float = 0.001) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay = one_way_delay_s
        self._server: asyncio.Server | None = None
        self._connections: set[tuple[_ProxySide, _ProxySide]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def _accept(self) -> _ProxySide:
        loop = asyncio.get_running_loop()
        to_upstream = _DelayedDirection(loop, self.delay)
        to_client = _DelayedDirection(loop, self.delay)
        pairs = self._connections

        def forget() -> None:
            pairs.discard(pair)

        client = _ProxySide(to_upstream, forget)
        upstream = _ProxySide(to_client, forget)
        client.peer, upstream.peer = upstream, client
        pair = (client, upstream)
        pairs.add(pair)

        async def connect() -> None:
            try:
                transport, _ = await loop.create_connection(lambda: upstream, *self.upstream)
            except OSError:
                if client.transport is not None:
                    client.transport.close()
                self._connections.discard(pair)
                return
            assert isinstance(transport, asyncio.Transport)
            to_upstream.attach(transport)
            assert client.transport is not None
            to_client.attach(client.transport)

        task = loop.create_task(connect())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for client, upstream in self._connections:
            for side in (client, upstream):
                side.outgoing.cancel()
                if side.transport is not None:
                    side.transport.close()
        self._connections.clear()


async def _serve_proxy(ready_file: Path, upstream: str, one_way_delay_s: float) -> None:
    host, port = upstream.rsplit(":", 1)
    proxy = DelayProxy(host, int(port), one_way_delay_s)
    bound = await proxy.start()
    _write_ready(ready_file, {"addr": f"127.0.0.1:{bound}", "pid": os.getpid()})
    await _until_sigterm()
    await proxy.close()


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Sample:
    """Calls made against one endpoint with one op and number of calls in flight."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the per-call latency, in seconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return 0.0
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def measure(call: Callable[[], Awaitable[object]], concurrency: int, calls: int) -> Sample:
    """Make ``calls`` calls with ``concurrency`` of them in flight; time each one."""
    latencies: list[float] = []
    remaining = calls
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = clock()
            await call()
            latencies.append(clock() - started)

    start = clock()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, calls))))
    return Sample(clock() - start, latencies)


@dataclass
class Endpoint:
    """One server as the client reaches it."""

    key: str  # a, b, c, d
    label: str
    transport: str  # tcp or unix
    addr: str  # HOST:PORT or a socket path
    channel: Channel | None = None
    stub: kms_v1.KeyManagementServiceStub | None = None
    ciphertext: bytes = b""

    def open(self) -> kms_v1.KeyManagementServiceStub:
        if self.transport == "unix":
            self.channel = Channel(path=self.addr)
        else:
            host, port = self.addr.rsplit(":", 1)
            self.channel = Channel(host, int(port))
        self.stub = kms_v1.KeyManagementServiceStub(self.channel)
        return self.stub

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    @property
    def name(self) -> str:
        return f"{self.key}. {self.label}"


def _call_for(endpoint: Endpoint, op: str, key_name: str) -> Callable[[], Awaitable[object]]:
    stub = endpoint.stub
    assert stub is not None
    if op == "encrypt":
        encrypt_request = kms_v1.EncryptRequest(name=key_name, plaintext=DEK)
        return lambda: stub.encrypt(encrypt_request)
    decrypt_request = kms_v1.DecryptRequest(name=key_name, ciphertext=endpoint.ciphertext)
    return lambda: stub.decrypt(decrypt_request)


async def _warm_up(endpoint: Endpoint, key_name: str, calls: int) -> None:
    """Connect, check a round trip gives the DEK back, and keep a ciphertext for Decrypt."""
    stub = endpoint.open()
    encrypted = await stub.encrypt(kms_v1.EncryptRequest(name=key_name, plaintext=DEK))
    endpoint.ciphertext = encrypted.ciphertext
    decrypted = await stub.decrypt(
        kms_v1.DecryptRequest(name=key_name, ciphertext=endpoint.ciphertext))
    if decrypted.plaintext != DEK:
        raise RuntimeError(f"{endpoint.name} over {endpoint.transport} did not return the DEK")
    for op in ("encrypt", "decrypt"):
        await measure(_call_for(endpoint, op, key_name), 8, calls)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


async def compare(endpoints: list[Endpoint], key_name: str, ops: list[str],
                  concurrencies: list[int], calls: int, rounds: int
                  ) -> dict[tuple[str, int, str, str], Sample]:
    """Every (op, in flight, endpoint), ``calls`` calls each, split into ``rounds`` rounds;
    within a round every endpoint takes its turn before the next round starts."""
    results: dict[tuple[str, int, str, str], Sample] = {}
    for endpoint in endpoints:
        await _warm_up(endpoint, key_name, min(100, calls))
    for round_calls in _split(calls, max(1, min(rounds, calls))):
        for op in ops:
            for concurrency in concurrencies:
                for endpoint in endpoints:
                    sample = await measure(_call_for(endpoint, op, key_name),
                                           concurrency, round_calls)
                    row = (op, concurrency, endpoint.name, endpoint.transport)
                    results.setdefault(row, Sample()).add(sample)
    return results


# --- servers ----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    ready: Path
    log: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return str(self.info["addr"])

    @property
    def pid(self) -> int:
        return int(self.info.get("pid") or self.popen.pid)


class Processes:
    """The servers this bench started; each is stopped by its own pid."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[Proc] = []

    def spawn(self, name: str, args: list[str]) -> Proc:
        ready = self.work / f"{name}.ready.json"
        log = self.work / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen([sys.executable, "-m", "valv", *args, "--ready-file",
                                      str(ready)], stdout=out, stderr=out)
        proc = Proc(name, popen, ready, log)
        self.procs.append(proc)
        return proc

    async def wait_ready(self, *procs: Proc, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            while not proc.ready.exists():
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{proc.name} did not start; its log ({proc.log}):\n"
                                       + proc.log.read_text()[-4000:])
                await asyncio.sleep(0.02)
            proc.info = json.loads(proc.ready.read_text())

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in self.procs:  # all at once: each may take a while to drain
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _central_args(work: Path) -> list[str]:
    return ["central", "--addr", "127.0.0.1:0", "--data-dir", str(work / "central-data"),
            "--log-level", "warning"]


def _sidecar_args(central: str, unix_socket: Path | None) -> list[str]:
    args = ["sidecar", "--central", central, "--addr", "127.0.0.1:0",
            "--metrics-addr", "127.0.0.1:0", "--log-level", "warning"]
    if unix_socket is not None:
        args += ["--unix-socket", str(unix_socket)]
    return args


def read_metrics(addr: str) -> dict[str, float]:
    """The sidecar's Prometheus metrics, summed over labels: {metric name: value}."""
    url = f"http://{addr}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse_metrics(response.read().decode())


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, summed over labels: {metric name: value}."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        series, _, rest = line.partition(" ")
        name = series.split("{", 1)[0]
        try:
            value = float(rest.split()[0])
        except (IndexError, ValueError):
            continue
        values[name] = values.get(name, 0.0) + value
    return values


def central_calls(metrics: dict[str, float]) -> tuple[float, float]:
    return (metrics.get("valv_sidecar_central_fetches_total", 0.0),
            metrics.get("valv_sidecar_forwarded_calls_total", 0.0))


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def create_key(central: str, ring_id: str, key_id: str) -> str:
    host, port = central.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        stub = kms_v1.KeyManagementServiceStub(channel)
        parent = "projects/bench/locations/global"
        ring_name = f"{parent}/keyRings/{ring_id}"
        try:
            await stub.get_key_ring(kms_v1.GetKeyRingRequest(name=ring_name))
        except GRPCError:
            await stub.create_key_ring(kms_v1.CreateKeyRingRequest(
                parent=parent, key_ring_id=ring_id))
        key = await stub.create_crypto_key(kms_v1.CreateCryptoKeyRequest(
            parent=ring_name, crypto_key_id=key_id,
            crypto_key=kms_v1.CryptoKey(purpose=kms_v1.CryptoKeyCryptoKeyPurpose.ENCRYPT_DECRYPT)))
        return str(key.name)
    finally:
        channel.close()


# --- the extra sidecar measurements -----------------------------------------------------------


async def count_central_calls(sidecar: Proc, central: str, encrypts: int) -> dict[str, Any]:
    """``encrypts`` Encrypts through the sidecar (64 in flight) on a key it has never seen, and
    how many calls it made to central meanwhile (the first one is always a miss)."""
    key_name = await create_key(central, "bench", f"count-{encrypts}-{time.time_ns()}")
    endpoint = Endpoint("b", "sidecar", "tcp", sidecar.addr)
    stub = endpoint.open()
    request = kms_v1.EncryptRequest(name=key_name, plaintext=DEK)
    try:
        before = central_calls(await asyncio.to_thread(read_metrics, sidecar.info["metrics"]))
        sample = await measure(lambda: stub.encrypt(request), 64, encrypts)
        after = central_calls(await asyncio.to_thread(read_metrics, sidecar.info["metrics"]))
    finally:
        endpoint.close()
    fetches, forwarded = after[0] - before[0], after[1] - before[1]
    return {"encrypts": encrypts, "seconds": round(sample.seconds, 2),
            "fetches": fetches, "forwarded": forwarded, "central_calls": fetches + forwarded,
            "per_100k": round((fetches + forwarded) * 100_000 / encrypts, 2)}


async def measure_memory(processes: Processes, central: str, versions: int) -> dict[str, Any]:
    """Sidecar RSS with ``versions`` KEK versions of one key cached, and before filling."""
    key_name = await create_key(central, "bench", f"memory-{time.time_ns()}")
    host, port = central.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        stub = kms_v1.KeyManagementServiceStub(channel)
        names = [f"{key_name}/cryptoKeyVersions/1"]
        create = kms_v1.CreateCryptoKeyVersionRequest(parent=key_name)
        created_started = time.perf_counter()

        async def new_version() -> None:
            names.append(str((await stub.create_crypto_key_version(create)).name))

        await measure(new_version, 64, versions - 1)
        created_s = time.perf_counter() - created_started
    finally:
        channel.close()
    sidecar = processes.spawn("sidecar-memory", _sidecar_args(central, None))
    await processes.wait_ready(sidecar)
    endpoint = Endpoint("b", "sidecar", "tcp", sidecar.addr)
    side = endpoint.open()
    try:
        await side.encrypt(kms_v1.EncryptRequest(name=key_name, plaintext=DEK))
        rss_before = rss_bytes(sidecar.pid)
        entries_before = (await asyncio.to_thread(read_metrics, sidecar.info["metrics"])).get(
            "valv_sidecar_cache_entries")
        pending = iter(names)

        async def encrypt_next() -> None:
            await side.encrypt(kms_v1.EncryptRequest(name=next(pending), plaintext=DEK))

        fill = await measure(encrypt_next, 64, len(names))
        rss_after = rss_bytes(sidecar.pid)
        entries = (await asyncio.to_thread(read_metrics, sidecar.info["metrics"])).get(
            "valv_sidecar_cache_entries")
    finally:
        endpoint.close()  # the sidecar stops with the others, in parallel
    mb = 1024 * 1024
    return {"versions": len(names), "create_seconds": round(created_s, 1),
            "fill_seconds": round(fill.seconds, 1),
            "rss_before_mb": round(rss_before / mb, 1), "rss_mb": round(rss_after / mb, 1),
            "cache_entries_before": entries_before, "cache_entries": entries,
            "goal_mb": GOAL_SIDECAR_RSS_MB, "meets_goal": rss_after / mb <= GOAL_SIDECAR_RSS_MB}


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Options:
    suite: str = "central"
    calls: int = 5000
    concurrencies: list[int] = field(default_factory=lambda: [1, 64])
    ops: list[str] = field(default_factory=lambda: ["encrypt", "decrypt"])
    rounds: int = 3
    one_way_delay_ms: float = 1.0
    sidecar_calls: int = 0
    memory: bool = False
    memory_versions: int = 10_000


async def run(options: Options) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="valv-bench-") as tmp:
        work = Path(tmp)
        processes = Processes(work)
        try:
            return await _run(options, work, processes)
        finally:
            processes.stop_all()


async def _run(options: Options, work: Path, processes: Processes) -> dict[str, Any]:
    full = options.suite == "sidecar"
    central = processes.spawn("central", _central_args(work) + (
        ["--unix-socket", str(work / "central.sock")] if full else []))
    echo = processes.spawn("echo", ["bench", "--echo-server", "--unix-socket",
                                    str(work / "echo.sock")])
    await processes.wait_ready(central, echo)
    endpoints = [Endpoint("a", "echo (floor)", "tcp", echo.addr)]
    sidecar: Proc | None = None
    proxy: Proc | None = None
    if full or options.sidecar_calls:
        sidecar = processes.spawn("sidecar", _sidecar_args(central.addr, work / "sidecar.sock"))
    if full:
        proxy = processes.spawn("proxy", [
            "bench", "--delay-proxy", "--upstream", central.addr,
            "--delay-ms", str(options.one_way_delay_ms)])
    await processes.wait_ready(*(p for p in (sidecar, proxy) if p is not None))
    if full:
        assert sidecar is not None and proxy is not None
        endpoints += [
            Endpoint("a", "echo (floor)", "unix", str(work / "echo.sock")),
            Endpoint("b", "sidecar", "tcp", sidecar.addr),
            Endpoint("b", "sidecar", "unix", str(sidecar.info["unix_socket"])),
        ]
    endpoints.append(Endpoint("c", "central", "tcp", central.addr))
    if full:
        endpoints.append(Endpoint("c", "central", "unix", str(central.info["unix_socket"])))
    if proxy is not None:
        endpoints.append(Endpoint("d", f"central+{2 * options.one_way_delay_ms:g}ms", "tcp",
                                  proxy.addr))
    key_name = await create_key(central.addr, "bench", "dek-wrapper")
    report: dict[str, Any] = {
        "suite": options.suite, "calls": options.calls, "rounds": options.rounds,
        "dek_bytes": len(DEK), "concurrency": options.concurrencies,
        "note": ("every server over TCP; the floor, the sidecar and central also over a "
                 "unix socket with --suite sidecar; central+2ms over TCP (the proxy's)"),
    }
    try:
        if proxy is not None:
            # What the proxy adds, measured: the floor reached through another proxy.
            calibration = await _proxy_calibration(processes, echo.addr, options)
            report["injected_rtt_p50_ms"] = calibration
        results = await compare(endpoints, key_name, options.ops, options.concurrencies,
                                options.calls, options.rounds)
    finally:
        for endpoint in endpoints:
            endpoint.close()
    rows = [{"op": op, "concurrency": concurrency, "server": server, "transport": transport,
             "calls": sample.calls, "rps": round(sample.rate, 1),
             "p50_ms": round(sample.percentile(50) * 1000, 3),
             "p99_ms": round(sample.percentile(99) * 1000, 3)}
            for (op, concurrency, server, transport), sample in results.items()]
    report["rows"] = rows
    report["ratios"] = _ratios(rows)
    if options.sidecar_calls:
        assert sidecar is not None
        report["sidecar_central_calls"] = await count_central_calls(
            sidecar, central.addr, options.sidecar_calls)
    if options.memory:
        report["sidecar_memory"] = await measure_memory(
            processes, central.addr, options.memory_versions)
    return report


async def _proxy_calibration(processes: Processes, echo: str, options: Options) -> float:
    proxy = processes.spawn("proxy-calibration", [
        "bench", "--delay-proxy", "--upstream", echo, "--delay-ms", str(options.one_way_delay_ms)])
    await processes.wait_ready(proxy)
    endpoint = Endpoint("a", "echo via proxy", "tcp", proxy.addr)
    try:
        await _warm_up(endpoint, "echo", 10)
        sample = await measure(_call_for(endpoint, "encrypt", "echo"), 1,
                               min(200, options.calls))
        direct = Endpoint("a", "echo", "tcp", echo)
        await _warm_up(direct, "echo", 10)
        base = await measure(_call_for(direct, "encrypt", "echo"), 1, min(200, options.calls))
        direct.close()
    finally:
        endpoint.close()
        processes.stop(proxy)
    return round((sample.percentile(50) - base.percentile(50)) * 1000, 3)


def _ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["op"], r["concurrency"], r["server"][0], r["transport"]): r for r in rows}
    ratios: list[dict[str, Any]] = []
    for (op, concurrency, server, transport), row in by.items():
        floor = by.get((op, concurrency, "a", transport))
        if server in ("b", "c") and floor is not None and floor["rps"] > 0:
            goal = GOAL_SIDECAR_VS_FLOOR if server == "b" else None
            ratios.append({"name": f"{server}/a", "op": op, "concurrency": concurrency,
                           "transport": transport, "value": round(row["rps"] / floor["rps"], 3),
                           "goal": goal})
        remote = by.get((op, concurrency, "d", "tcp"))
        if server == "b" and concurrency == 1 and remote is not None and remote["rps"] > 0:
            ratios.append({"name": "b/d", "op": op, "concurrency": concurrency,
                           "transport": transport, "value": round(row["rps"] / remote["rps"], 3),
                           "goal": GOAL_SIDECAR_VS_REMOTE})
    for ratio in ratios:
        ratio["meets_goal"] = None if ratio["goal"] is None else ratio["value"] >= ratio["goal"]
    return ratios


def format_report(report: dict[str, Any]) -> str:
    out: list[str] = []
    out.append(f"valv bench --suite {report['suite']}: Encrypt/Decrypt of a "
               f"{report['dek_bytes']}-byte DEK, {report['calls']} calls per row in "
               f"{report['rounds']} interleaved rounds, one grpclib client")
    if report["suite"] == "sidecar":
        out.append("every server over TCP and a unix socket, but central+2ms (TCP, through the "
                   "bench's delay proxy).")
    else:
        out.append("TCP only; --suite sidecar adds the sidecar, unix sockets and central "
                   "behind a 2 ms round trip.")
    if "injected_rtt_p50_ms" in report:
        out.append(f"the delay proxy adds {report['injected_rtt_p50_ms']:.2f} ms per call at "
                   "p50 (measured on the floor)")
    out.append("")
    out.append(f"{'op':<8} {'in flight':>9}  {'server':<16} {'transport':<9} {'req/s':>9} "
               f"{'p50 ms':>8} {'p99 ms':>8}")
    for row in report["rows"]:
        out.append(f"{row['op'].capitalize():<8} {row['concurrency']:>9}  {row['server']:<16} "
                   f"{row['transport']:<9} {row['rps']:>9.1f} {row['p50_ms']:>8.3f} "
                   f"{row['p99_ms']:>8.3f}")
    out.append("")
    out.append("Ratios (throughput, same op, in flight and transport):")
    for ratio in report["ratios"]:
        goal = ""
        if ratio["goal"] is not None:
            goal = (f"  goal >= {ratio['goal']:g}: "
                    + ("met" if ratio["meets_goal"] else "NOT MET"))
        versus = "d over tcp" if ratio["name"] == "b/d" else f"a over {ratio['transport']}"
        out.append(f"  {ratio['name']:<4} {ratio['op'].capitalize():<8} "
                   f"{ratio['concurrency']:>3} in flight, {ratio['transport']:<4} "
                   f"(vs {versus}): {ratio['value']:>7.3f}{goal}")
    counted = report.get("sidecar_central_calls")
    if counted:
        out.append("")
        out.append(f"Central calls per 100k sidecar Encrypts (default TTL, fresh key): "
                   f"{counted['per_100k']:g}  ({counted['fetches']:g} FetchVersion + "
                   f"{counted['forwarded']:g} forwarded for {counted['encrypts']} Encrypts "
                   f"in {counted['seconds']:g} s)")
    memory = report.get("sidecar_memory")
    if memory:
        out.append("")
        out.append(f"Sidecar RSS: {memory['rss_mb']:.1f} MB with {memory['versions']} versions "
                   f"cached ({_count(memory['cache_entries'])} cache entries); "
                   f"{memory['rss_before_mb']:.1f} MB before filling "
                   f"({_count(memory['cache_entries_before'])} entries)  goal <= "
                   f"{memory['goal_mb']:g} MB: " + ("met" if memory["meets_goal"] else "NOT MET"))
    return "\n".join(out)


def _count(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


# --- the command ------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="measure Encrypt/Decrypt: floor, sidecar, central",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["central", "sidecar"], default="central",
                   help="central (default, quick): the floor and central over TCP; "
                        "sidecar: floor, sidecar, central and central behind a 2 ms round "
                        "trip, over TCP and unix sockets")
    p.add_argument("--calls", type=int, default=5000, help="calls per row (default 5000)")
    p.add_argument("--concurrency", default="1,64",
                   help="comma-separated numbers of calls in flight (default 1,64)")
    p.add_argument("--ops", default="encrypt,decrypt", help="encrypt, decrypt or both")
    p.add_argument("--rounds", type=int, default=3,
                   help="split each row's calls into this many interleaved rounds (default 3)")
    p.add_argument("--delay-ms", type=float, default=1.0,
                   help="one-way delay of the proxy in front of central (default 1 ms)")
    p.add_argument("--sidecar-calls", type=int, default=None, metavar="N",
                   help="count the sidecar's calls to central during N Encrypts on a fresh key "
                        "(default 100000 with --suite sidecar, else 0 = skip)")
    p.add_argument("--memory", action="store_true",
                   help="also measure sidecar RSS with --memory-versions KEK versions cached "
                        "(creates them at central first: slow-ish)")
    p.add_argument("--memory-versions", type=int, default=10_000,
                   help="versions for --memory (default 10000)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    # The bench's own servers, run as subprocesses.
    p.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--delay-proxy", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    p.add_argument("--unix-socket", help=argparse.SUPPRESS)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.echo_server:
        asyncio.run(_serve_echo(Path(args.ready_file),
                                Path(args.unix_socket) if args.unix_socket else None))
        return 0
    if args.delay_proxy:
        asyncio.run(_serve_proxy(Path(args.ready_file), args.upstream, args.delay_ms / 1000))
        return 0
    try:
        concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        concurrencies = []
    ops = [op.strip().lower() for op in args.ops.split(",") if op.strip()]
    sidecar_calls = args.sidecar_calls
    if sidecar_calls is None:
        sidecar_calls = 100_000 if args.suite == "sidecar" else 0
    if (args.calls < 1 or not concurrencies or min(concurrencies) < 1 or args.rounds < 1
            or sidecar_calls < 0 or args.memory_versions < 1 or args.delay_ms < 0):
        print("valv bench: error: --calls, --concurrency, --rounds and --memory-versions must "
              "be positive (--sidecar-calls and --delay-ms not negative)", file=sys.stderr)
        return 2
    if not ops or any(op not in ("encrypt", "decrypt") for op in ops):
        print("valv bench: error: --ops takes encrypt, decrypt or both", file=sys.stderr)
        return 2
    options = Options(suite=args.suite, calls=args.calls, concurrencies=concurrencies, ops=ops,
                      rounds=args.rounds, one_way_delay_ms=args.delay_ms,
                      sidecar_calls=sidecar_calls, memory=args.memory,
                      memory_versions=args.memory_versions)
    report = asyncio.run(run(options))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
