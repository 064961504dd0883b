"""valv.sidecar.v1.KeyMaterial Watch and ReportUsage against real centrals, through the
generated grpclib stub: change events as they happen, resume, filtering, heartbeats,
shutdown, and reported usage in the audit log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.cloud import kms_v1
from google.protobuf import field_mask_pb2
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status

from tests.helpers import CALL, CentralProcess, wait_for
from tests.test_audit_processes import NO_FLUSH, records
from valv._proto.google.cloud.kms import v1 as kms_pb
from valv._proto.valv.sidecar import v1 as pb
from valv.central.server import CentralConfig, CentralServer, open_sealed_store
from valv.core import changelog
from valv.core.clock import FakeClock

HELLO, CHANGE, RESET, HEARTBEAT = (pb.WatchEventType.HELLO, pb.WatchEventType.CHANGE,
                                   pb.WatchEventType.RESET, pb.WatchEventType.HEARTBEAT)
K = pb.ChangeKind
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT


def _host_port(central: CentralProcess) -> tuple[str, int]:
    host, port = central.addr.rsplit(":", 1)
    return host, int(port)


class Watcher:
    """A Watch stream read by a thread of its own; events land in ``events``."""

    def __init__(self, central: CentralProcess, after_seq: int = 0,
                 token: str | None = None, epoch: bytes = b"") -> None:
        self.events: list[pb.WatchEvent] = []
        self.arrivals: list[float] = []  # time.monotonic() of each event
        self.error: GRPCError | None = None
        self.ended = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[None] | None = None
        metadata = {"authorization": f"Bearer {token}"} if token else None
        host, port = _host_port(central)

        async def read() -> None:
            channel = Channel(host, port)
            try:
                stub = pb.KeyMaterialStub(channel)
                async for event in stub.watch(pb.WatchRequest(after_seq=after_seq,
                                                              epoch=epoch),
                                              metadata=metadata):
                    self.arrivals.append(time.monotonic())
                    self.events.append(event)
            except GRPCError as exc:
                self.error = exc
            finally:
                channel.close()
                self.ended.set()

        def run() -> None:
            self._task = self._loop.create_task(read())
            try:
                self._loop.run_until_complete(self._task)
            except BaseException:  # cancelled by stop()
                pass
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait(self, condition: Callable[[list[pb.WatchEvent]], Any], what: str,
             deadline_s: float = 5) -> Any:
        def check() -> Any:
            result = condition(list(self.events))
            if not result and self.ended.is_set():
                raise AssertionError(f"the stream ended ({self.error}) before {what}")
            return result
        return wait_for(check, deadline_s=deadline_s, what=what)

    def hello(self) -> pb.WatchEvent:
        events = self.wait(lambda events: events, "HELLO")
        assert events[0].type == HELLO
        return events[0]  # type: ignore[no-any-return]

    def changes(self, under: str = "") -> list[tuple[pb.ChangeKind, str]]:
        """CHANGE events about ``under`` (a resource) and what is under it; all if empty."""
        return [(e.kind, e.resource) for e in self.events if e.type == CHANGE and (
            not under or e.resource == under or e.resource.startswith(under + "/"))]

    def stop(self) -> None:
        if self._task is not None and not self.ended.is_set():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(10)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.stop()


def disable(kms: kms_v1.KeyManagementServiceClient, version: str, state: str = "DISABLED",
            **kwargs: Any) -> None:
    kms.update_crypto_key_version(
        request={"crypto_key_version": {"name": version, "state": state},
                 "update_mask": field_mask_pb2.FieldMask(paths=["state"])}, **kwargs, **CALL)


def report(central: CentralProcess, counts: list[pb.UsageCount],
           token: str | None = None) -> pb.ReportUsageResponse:
    metadata = {"authorization": f"Bearer {token}"} if token else None
    host, port = _host_port(central)

    async def run() -> pb.ReportUsageResponse:
        channel = Channel(host, port)
        try:
            return await pb.KeyMaterialStub(channel, timeout=10).report_usage(
                pb.ReportUsageRequest(counts=counts), metadata=metadata)
        finally:
            channel.close()

    return asyncio.run(run())


# ---- dev mode ---------------------------------------------------------------------


def test_changes_through_googles_client_arrive_at_once(
        central: CentralProcess, kms: kms_v1.KeyManagementServiceClient, crypto_key: str,
        watchers: list[Watcher]) -> None:
    watcher = Watcher(central)
    watchers.append(watcher)
    hello = watcher.hello()
    assert hello.seq > 0 and hello.heartbeat_seconds == 5
    v1, v2 = f"{crypto_key}/cryptoKeyVersions/1", f"{crypto_key}/cryptoKeyVersions/2"
    steps: list[tuple[str, Callable[[], Any], tuple[pb.ChangeKind, str]]] = [
        ("disable", lambda: disable(kms, v1), (K.CRYPTO_KEY_VERSION, v1)),
        ("enable", lambda: disable(kms, v1, "ENABLED"), (K.CRYPTO_KEY_VERSION, v1)),
        ("new version", lambda: kms.create_crypto_key_version(
            request={"parent": crypto_key, "crypto_key_version": {}}, **CALL),
         (K.CRYPTO_KEY_VERSION, v2)),
        ("primary", lambda: kms.update_crypto_key_primary_version(
            request={"name": crypto_key, "crypto_key_version_id": "2"}, **CALL),
         (K.CRYPTO_KEY, crypto_key)),
        ("destroy", lambda: kms.destroy_crypto_key_version(request={"name": v1}, **CALL),
         (K.CRYPTO_KEY_VERSION, v1)),
        ("iam", lambda: kms.set_iam_policy(request={"resource": crypto_key, "policy": {
            "bindings": [{"role": "roles/cloudkms.viewer", "members": ["user:a@example.com"]}]}},
            **CALL), (K.IAM_POLICY, crypto_key)),
    ]
    expected: list[tuple[pb.ChangeKind, str]] = []
    for what, step, event in steps:
        step()
        done = time.monotonic()
        expected.append(event)
        # Generous: a change through this central wakes its follower (milliseconds).
        watcher.wait(lambda _: len(watcher.changes(crypto_key)) == len(expected),
                     f"the {what} event", deadline_s=5)
        mine = [t for e, t in zip(watcher.events, watcher.arrivals, strict=False)
                if e.type == CHANGE and e.resource.startswith(crypto_key)]
        assert mine[-1] - done < 1.0, what
    assert watcher.changes(crypto_key) == expected
    seqs = [e.seq for e in watcher.events if e.type != HEARTBEAT]
    assert seqs == sorted(set(seqs)) and seqs[0] == hello.seq  # in order, no duplicates


def test_a_change_through_another_central_arrives(tmp_path: Path,
                                                  watchers: list[Watcher]) -> None:
    data = tmp_path / "shared"
    first = CentralProcess(data).start()
    second = CentralProcess(tmp_path / "second", "--store", f"sqlite://{data / 'valv.db'}",
                            "--master-key-file", str(data / "master.key")).start()
    try:
        watcher = Watcher(first)
        watchers.append(watcher)
        watcher.hello()
        ring = second.client().create_key_ring(request={
            "parent": "projects/p/locations/global", "key_ring_id": "r", "key_ring": {}},
            **CALL).name
        watcher.wait(lambda _: watcher.changes() == [(K.KEY_RING, ring)],
                     "the other central's change")
    finally:
        second.stop()
        first.stop()


def test_resume_replays_exactly_what_was_missed(fresh_central: CentralProcess,
                                                watchers: list[Watcher]) -> None:
    kms = fresh_central.client()
    location = "projects/p/locations/global"
    ring = kms.create_key_ring(request={"parent": location, "key_ring_id": "r",
                                        "key_ring": {}}, **CALL).name
    first = Watcher(fresh_central)
    watchers.append(first)
    assert first.hello().seq == 1  # the head
    key = kms.create_crypto_key(request={"parent": ring, "crypto_key_id": "k",
                                         "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
                                **CALL).name
    first.wait(lambda _: first.changes(), "the key's event")
    last = first.events[-1].seq
    first.stop()
    # Missed while disconnected:
    disable(kms, f"{key}/cryptoKeyVersions/1")
    kms.create_key_ring(request={"parent": location, "key_ring_id": "r2", "key_ring": {}},
                        **CALL)
    second = Watcher(fresh_central, after_seq=last, epoch=first.hello().epoch)
    watchers.append(second)
    assert second.hello().seq == last
    second.wait(lambda events: len(events) >= 3, "the missed events")
    assert [(e.type, e.seq, e.kind, e.resource) for e in second.events[1:]] == [
        (CHANGE, last + 1, K.CRYPTO_KEY_VERSION, f"{key}/cryptoKeyVersions/1"),
        (CHANGE, last + 2, K.KEY_RING, f"{location}/keyRings/r2")]
    # Then live, after the replay, and nothing twice.
    disable(kms, f"{key}/cryptoKeyVersions/1", "ENABLED")
    second.wait(lambda events: len(events) >= 4, "the live event")
    kms.create_key_ring(request={"parent": location, "key_ring_id": "r3", "key_ring": {}},
                        **CALL)
    second.wait(lambda _: (K.KEY_RING, f"{location}/keyRings/r3") in second.changes(),
                "the last event")
    assert [(e.type, e.seq) for e in second.events if e.type != HEARTBEAT] == [
        (HELLO, last), (CHANGE, last + 1), (CHANGE, last + 2), (CHANGE, last + 3),
        (CHANGE, last + 4)]


def test_a_trimmed_or_future_position_resets(fresh_central: CentralProcess,
                                             watchers: list[Watcher]) -> None:
    kms = fresh_central.client()
    for ring_id in ("a", "b", "c"):
        kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                     "key_ring_id": ring_id, "key_ring": {}}, **CALL)
    probe = Watcher(fresh_central)
    watchers.append(probe)
    epoch = probe.hello().epoch
    future = Watcher(fresh_central, after_seq=100, epoch=epoch)
    watchers.append(future)
    future.wait(lambda events: len(events) >= 2, "HELLO and RESET")
    assert [(e.type, e.seq) for e in future.events] == [(HELLO, 100), (RESET, 3)]
    # Trim the log as if its entries were two hours old.
    fresh_central.stop()

    async def trim() -> int:
        store = await open_sealed_store(CentralConfig(data_dir=fresh_central.data_dir),
                                        create_dev_key=False)
        try:
            clock = FakeClock(datetime.now(UTC) + timedelta(hours=2))
            return await changelog.trim(store, clock)
        finally:
            await store.close()

    assert asyncio.run(trim()) == 3
    fresh_central.start()
    old = Watcher(fresh_central, after_seq=1, epoch=epoch)
    watchers.append(old)
    old.wait(lambda events: len(events) >= 2, "HELLO and RESET")
    assert [(e.type, e.seq) for e in old.events] == [(HELLO, 1), (RESET, 3)]
    assert old.events[0].epoch == epoch  # a restart keeps the epoch


def test_a_position_from_another_epoch_resets(fresh_central: CentralProcess,
                                              watchers: list[Watcher]) -> None:
    """Seqs are comparable only within one epoch of the change log (a restored store
    has a new one): resuming with another epoch's position starts with RESET."""
    kms = fresh_central.client()
    location = "projects/p/locations/global"
    kms.create_key_ring(request={"parent": location, "key_ring_id": "a", "key_ring": {}},
                        **CALL)
    probe = Watcher(fresh_central)
    watchers.append(probe)
    hello = probe.hello()
    assert len(hello.epoch) == 16
    for stale_epoch in (b"", bytes(16)):
        stale = Watcher(fresh_central, after_seq=hello.seq, epoch=stale_epoch)
        watchers.append(stale)
        stale.wait(lambda events: len(events) >= 2, "HELLO and RESET")
        assert [(e.type, e.seq) for e in stale.events[:2]] == [(HELLO, hello.seq),
                                                               (RESET, hello.seq)]
        assert stale.events[0].epoch == hello.epoch
    # A store that lost its epoch (a restore finished while this central ran) gets
    # a new one from the next stream; the old position resets.
    import sqlite3
    from contextlib import closing

    from valv.core import records
    with closing(sqlite3.connect(fresh_central.data_dir / "valv.db")) as db, db:
        db.execute("DELETE FROM kv WHERE k = ?", (records.CHANGE_EPOCH_KEY,))
    renewed = Watcher(fresh_central, after_seq=hello.seq, epoch=hello.epoch)
    watchers.append(renewed)
    renewed.wait(lambda events: len(events) >= 2, "HELLO and RESET")
    assert [e.type for e in renewed.events[:2]] == [HELLO, RESET]
    assert len(renewed.events[0].epoch) == 16 and renewed.events[0].epoch != hello.epoch
    hello = renewed.events[0]
    # The same position with its own epoch resumes without a RESET.
    same = Watcher(fresh_central, after_seq=hello.seq, epoch=hello.epoch)
    watchers.append(same)
    same.hello()
    kms.create_key_ring(request={"parent": location, "key_ring_id": "b", "key_ring": {}},
                        **CALL)
    same.wait(lambda _: same.changes(), "the new ring")
    assert [e.type for e in same.events if e.type != HEARTBEAT] == [HELLO, CHANGE]


def test_heartbeats(tmp_path: Path, watchers: list[Watcher]) -> None:
    central = CentralProcess(tmp_path / "c", "--watch-heartbeat", "1").start()
    try:
        watcher = Watcher(central)
        watchers.append(watcher)
        hello = watcher.hello()
        assert hello.heartbeat_seconds == 1
        watcher.wait(lambda events: sum(e.type == HEARTBEAT for e in events) >= 2,
                     "two heartbeats", deadline_s=10)
        beats = [(e, t) for e, t in zip(watcher.events, watcher.arrivals, strict=False)
                 if e.type == HEARTBEAT]
        assert all(e.seq == hello.seq for e, _ in beats)
        assert 0.5 < beats[1][1] - beats[0][1] < 3
    finally:
        central.stop()


def test_bad_heartbeat_flag(tmp_path: Path) -> None:
    from tests.rmk_support import run_valv

    for bad in ("0", "1.5", "2h", "soon"):
        result = run_valv("central", "--data-dir", str(tmp_path), "--watch-heartbeat", bad)
        assert result.returncode == 2 and "--watch-heartbeat" in result.stderr, bad
    for bad in ("0", "1.5", "2h", "soon"):
        result = run_valv("central", "--data-dir", str(tmp_path), "--sidecar-material-ttl", bad)
        assert result.returncode == 2 and "--sidecar-material-ttl" in result.stderr, bad


def test_sigterm_ends_watch_streams_promptly(tmp_path: Path, watchers: list[Watcher]) -> None:
    central = CentralProcess(tmp_path / "c").start()  # drain timeout: 10 s
    streams = [Watcher(central) for _ in range(3)]
    watchers.extend(streams)
    for watcher in streams:
        watcher.hello()
    started = time.monotonic()
    assert central.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5
    for watcher in streams:
        assert watcher.ended.wait(5)
        assert watcher.error is not None and watcher.error.status == Status.UNAVAILABLE
        assert "shutting down" in (watcher.error.message or "")


async def test_local_changes_do_not_wait_for_the_poll_and_streams_are_released(
        tmp_path: Path) -> None:
    """In process: an hour's poll interval, so only the wake-up explains the speed; and a
    client that goes away leaves no subscription behind."""
    server = CentralServer(CentralConfig(port=0, data_dir=tmp_path, scheduler_interval_s=None,
                                         changelog_poll_interval_s=3600))
    await server.start()
    try:
        assert server.tcp_address is not None
        channel = Channel(*server.tcp_address)
        stub = pb.KeyMaterialStub(channel)
        stream = stub.watch(pb.WatchRequest()).__aiter__()
        assert (await anext(stream)).type == HELLO
        assert server.hub.subscribers == 1
        kms = kms_pb.KeyManagementServiceStub(channel, timeout=10)
        started = asyncio.get_running_loop().time()
        await kms.create_key_ring(kms_pb.CreateKeyRingRequest(
            parent="projects/p/locations/global", key_ring_id="r"))
        event = await asyncio.wait_for(anext(stream), 5)
        assert (event.type, event.kind) == (CHANGE, K.KEY_RING)
        assert asyncio.get_running_loop().time() - started < 1
        channel.close()  # the client goes away
        async with asyncio.timeout(5):
            while server.hub.subscribers or server.tracker.in_flight:
                await asyncio.sleep(0.01)
    finally:
        await server.stop()


# ---- ReportUsage ----------------------------------------------------------------------


def minute(offset: int = 0) -> int:
    now = int(time.time()) // 60 * 60
    return (now + 60 * offset) * 1_000_000


def usage(version: str, **fields: Any) -> pb.UsageCount:
    values: dict[str, Any] = {"crypto_key_version": version, "rpc": "Encrypt", "status": "OK",
                              "window_start_us": minute(-1), "count": 1}
    values.update(fields)
    return pb.UsageCount(**values)


VERSION = "projects/p/locations/global/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"


# Times are computed when the test runs, not at collection: a long suite would
# otherwise turn "10 minutes from now" into the past.
@pytest.mark.parametrize(("bad", "message"), [
    (lambda: {"rpc": "Sign"}, "counts[1].rpc 'Sign' is not Encrypt or Decrypt"),
    (lambda: {"crypto_key_version": "projects/p/locations/global/keyRings/r/cryptoKeys/k"},
     "counts[1].crypto_key_version"),
    (lambda: {"status": "NOPE"}, "counts[1].status 'NOPE' is not a gRPC status code name"),
    (lambda: {"window_start_us": minute(-1) + 1}, "counts[1].window_start_us"),
    (lambda: {"window_start_us": minute(-24 * 60 - 2)}, "counts[1].window_start_us"),
    (lambda: {"window_start_us": minute(10)}, "counts[1].window_start_us"),
    (lambda: {"count": 0}, "counts[1].count 0 is not between 1"),
])
def test_bad_usage_reports_are_refused(central: CentralProcess,
                                       bad: Callable[[], dict[str, Any]],
                                       message: str) -> None:
    with pytest.raises(GRPCError) as info:
        report(central, [usage(VERSION), usage(VERSION, **bad())])
    assert info.value.status == Status.INVALID_ARGUMENT
    assert message in (info.value.message or "")


def test_too_many_counts_are_refused(central: CentralProcess) -> None:
    with pytest.raises(GRPCError) as info:
        report(central, [usage(VERSION)] * 10_001)
    assert info.value.status == Status.INVALID_ARGUMENT
    assert "at most 10000" in (info.value.message or "")


# ---- with authentication --------------------------------------------------------

ADMIN = "user:admin@example.com"
SIDECAR = "serviceAccount:sidecar@example.com"
OTHER = "serviceAccount:other@example.com"
TOKENS = {member: f"token-{uuid.uuid4().hex}" for member in (ADMIN, SIDECAR, OTHER)}


def secured_central(home: Path, *extra: str) -> CentralProcess:
    tokens_file = home / "tokens.json"
    tokens_file.write_text(json.dumps(
        {member: hashlib.sha256(token.encode()).hexdigest() for member, token in TOKENS.items()}))
    root_policy = home / "root-policy.json"
    root_policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": [ADMIN]},
        {"role": "roles/valv.sidecar", "members": [SIDECAR, OTHER]}]}))
    return CentralProcess(home / "central", "--tokens-file", str(tokens_file),
                          "--dev-root-key", *extra,
                          env={"VALV_ROOT_POLICY_FILE": str(root_policy)}).start()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CentralProcess]:
    process = secured_central(tmp_path_factory.mktemp("secured"))
    yield process
    process.stop()


def test_key_events_only_for_principals_that_may_use_the_key(
        secured: CentralProcess, watchers: list[Watcher]) -> None:
    client = secured.client()
    admin = [("authorization", f"Bearer {TOKENS[ADMIN]}")]
    location = f"projects/p-{uuid.uuid4().hex[:12]}/locations/global"
    ring = client.create_key_ring(request={"parent": location, "key_ring_id": "ring",
                                           "key_ring": {}}, metadata=admin, **CALL).name
    key = client.create_crypto_key(request={
        "parent": ring, "crypto_key_id": "key", "crypto_key": {"purpose": ENCRYPT_DECRYPT}},
        metadata=admin, **CALL).name
    client.set_iam_policy(request={"resource": key, "policy": {"bindings": [
        {"role": "roles/cloudkms.cryptoKeyEncrypter", "members": [SIDECAR]}]}},
        metadata=admin, **CALL)
    sidecar = Watcher(secured, token=TOKENS[SIDECAR])
    other = Watcher(secured, token=TOKENS[OTHER])
    watchers.extend([sidecar, other])
    sidecar.hello()
    other.hello()
    version = f"{key}/cryptoKeyVersions/1"
    disable(client, version, metadata=admin)
    sidecar.wait(lambda _: sidecar.changes(key), "the disable")
    # The revocation: both see it, although afterwards the sidecar may not use the key.
    client.set_iam_policy(request={"resource": key, "policy": {"bindings": []}},
                          metadata=admin, **CALL)
    disable(client, version, "ENABLED", metadata=admin)  # nobody may use the key now
    # A new key ring, which every stream gets: once it is there, so is all before it.
    last = client.create_key_ring(request={"parent": location, "key_ring_id": "last",
                                           "key_ring": {}}, metadata=admin, **CALL).name
    for watcher in (sidecar, other):
        watcher.wait(lambda _, w=watcher: (K.KEY_RING, last) in w.changes(), "the last ring")
    assert sidecar.changes(ring) == [(K.CRYPTO_KEY_VERSION, version), (K.IAM_POLICY, key)]
    assert other.changes(ring) == [(K.IAM_POLICY, key)]


def test_unauthenticated_calls_are_refused(secured: CentralProcess,
                                           watchers: list[Watcher]) -> None:
    for token in (None, "token-wrong"):
        watcher = Watcher(secured, token=token)
        watchers.append(watcher)
        assert watcher.ended.wait(10)
        assert watcher.events == []
        assert watcher.error is not None and watcher.error.status == Status.UNAUTHENTICATED
        with pytest.raises(GRPCError) as info:
            report(secured, [usage(VERSION)], token=token)
        assert info.value.status == Status.UNAUTHENTICATED


def test_callers_that_are_not_sidecars_are_refused(secured: CentralProcess,
                                                    watchers: list[Watcher]) -> None:
    """ADMIN is authenticated and may do everything to keys, but is no sidecar
    identity (roles/valv.sidecar in the root policy): no Watch, no ReportUsage."""
    watcher = Watcher(secured, token=TOKENS[ADMIN])
    watchers.append(watcher)
    assert watcher.ended.wait(10)
    assert watcher.events == []
    assert watcher.error is not None and watcher.error.status == Status.PERMISSION_DENIED
    assert "roles/valv.sidecar" in (watcher.error.message or "")
    with pytest.raises(GRPCError) as info:
        report(secured, [usage(VERSION)], token=TOKENS[ADMIN])
    assert info.value.status == Status.PERMISSION_DENIED
    assert "valv.sidecar.connect" in (info.value.message or "")


@pytest.mark.parametrize("mode", ["aggregate", "full", "off"])
def test_reported_usage_is_in_the_audit_log(tmp_path: Path, mode: str) -> None:
    central = secured_central(tmp_path, "--audit-data-access", mode, *NO_FLUSH)
    now = minute()
    other = VERSION.replace("/k/", "/other/")
    try:
        good = [usage(VERSION, count=5, window_start_us=now - 60_000_000),
                # The same minute: counted together.
                usage(VERSION, count=2, window_start_us=now - 60_000_000),
                usage(VERSION, rpc="Decrypt", status="INVALID_ARGUMENT", count=3,
                      window_start_us=now - 120_000_000),
                # A window still open: written at shutdown.
                usage(other, window_start_us=now + 60_000_000)]
        assert report(central, good, token=TOKENS[SIDECAR]).recorded == 4
        # One bad entry: nothing of the request is recorded.
        with pytest.raises(GRPCError) as info:
            report(central, [usage(VERSION, count=1000)] * 3 + [usage(VERSION, rpc="")],
                   token=TOKENS[SIDECAR])
        assert info.value.status == Status.INVALID_ARGUMENT
        assert "counts[3].rpc" in (info.value.message or "")
    finally:
        assert central.stop() == 0  # SIGTERM: the final flush
    everything = records(central.data_dir)
    reported = records(central.data_dir, "--reported")
    assert reported == [r for r in everything if r.get("reported_by") == "sidecar"]
    if mode == "off":
        assert reported == []
        return

    def iso(us: int) -> str:
        return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")

    key, other_key = (v.rsplit("/cryptoKeyVersions/", 1)[0] for v in (VERSION, other))
    assert sorted((r["rpc"], r["resource"], r["target"], r["status"], r["count"],
                   r["window_start"]) for r in reported) == [
        ("Decrypt", key, VERSION, "INVALID_ARGUMENT", 3, iso(now - 120_000_000)),
        ("Encrypt", key, VERSION, "OK", 7, iso(now - 60_000_000)),
        ("Encrypt", other_key, other, "OK", 1, iso(now + 60_000_000)),
    ]
    for record in reported:
        assert record["kind"] == "DATA_ACCESS_AGGREGATE"
        assert record["principal"] == SIDECAR and record["auth_method"] == "token"
        assert record["peers"] and all(p.startswith("127.0.0.1:") for p in record["peers"])
    # The ReportUsage calls themselves leave no record (only what they report).
    assert not [r for r in everything if r["rpc"] == "ReportUsage"]
