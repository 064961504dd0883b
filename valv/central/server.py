"""The central server process: configuration, startup and clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from grpclib._typing import IServable
from grpclib.server import Server

from valv.central.audit import CentralAuditor
from valv.central.authn import AuthSettings, setup_authentication
from valv.central.authz import IamAuthorizer
from valv.central.calls import Calls, server_codecs
from valv.central.material_service import DEFAULT_TTL_S as DEFAULT_MATERIAL_TTL_S
from valv.central.material_service import KeyMaterialService
from valv.central.service import (
    IamPolicyService,
    KeyManagementService,
    LocationsService,
    OperationsService,
)
from valv.central.watch import DEFAULT_HEARTBEAT_S, Watches, WatchSettings
from valv.core import changelog
from valv.core.audit import DEFAULT_FLUSH_INTERVAL_S, AuditLog, DataAccessMode
from valv.core.backup.restore import refuse_if_unfinished
from valv.core.changehub import ChangeHub
from valv.core.changelog import DEFAULT_POLL_INTERVAL_S, ChangeFollower
from valv.core.clock import Clock, FileClock, SystemClock, to_micros
from valv.core.crypto.errors import RootKeyConfigError
from valv.core.crypto.keysources import (
    Pkcs11Config,
    RootKeyConfig,
    configured_sources,
    load_keyring,
)
from valv.core.crypto.rootkey import RootKeyring
from valv.core.iam import IamPolicies, Policy
from valv.core.keystore import KeyStore, KeystoreSettings
from valv.core.scheduler import DEFAULT_INTERVAL_S, Scheduler
from valv.core.storage import journal, open_store
from valv.core.storage.journal import journaled_store
from valv.core.storage.sealed import SealedStore, Sealer
from valv.netutil import (
    bind_unix_socket,
    bound_port,
    drain_and_close,
    remove_unix_socket,
    write_ready_file,
)

log = logging.getLogger("valv.central")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                          "share")
    return Path(base) / "valv"


@dataclass(frozen=True, slots=True)
class CentralConfig:
    # Loopback: the safe default in dev mode. The CLI picks 0.0.0.0 when
    # authentication and TLS are configured (AuthSettings.default_address).
    host: str = "127.0.0.1"
    port: int = 50051
    unix_socket: Path | None = None
    data_dir: Path = field(default_factory=default_data_dir)
    # None: sqlite in data_dir.
    store_url: str | None = None
    # Oldest first; the last one wraps new keys. Empty: the dev key in data_dir.
    master_key_files: tuple[Path, ...] = ()
    # Which source holds the newest RMK: file, env (VALV_MASTER_KEY) or pkcs11;
    # None: whichever is configured (docs/crypto.md, "Root key sources").
    master_key_source: str | None = None
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)
    # With authentication configured and no root key source, use (or create)
    # the development key in data_dir anyway (--dev-root-key); else refuse.
    dev_root_key: bool = False
    locations: tuple[str, ...] = ("global",)
    default_rotation_period: timedelta | None = timedelta(days=30)
    key_cache_ttl: timedelta = timedelta(seconds=1)
    # Seconds between scheduler ticks (rotation, destruction); None: no scheduler.
    scheduler_interval_s: float | None = DEFAULT_INTERVAL_S
    min_destroy_scheduled_duration: timedelta = timedelta(days=1)
    # Written (JSON, atomically) once the server accepts calls: for supervisors and tests.
    ready_file: Path | None = None
    drain_timeout_s: float = 10.0
    # The root IAM policy (--root-policy-file): granted on every resource.
    root_policy: Policy | None = None
    # Audit of Encrypt/Decrypt/GenerateRandomBytes (README, "Audit"), and how
    # often aggregated counts are written.
    audit_data_access: DataAccessMode = DataAccessMode.AGGREGATE
    audit_flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    # How often the change log is polled for changes made through other
    # centrals (valv.core.changelog); they reach this one's caches that fast.
    changelog_poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    # Seconds between HEARTBEAT events on an idle sidecar Watch stream (--watch-heartbeat).
    watch_heartbeat_s: int = DEFAULT_HEARTBEAT_S
    # The longest a sidecar may serve fetched material (--sidecar-material-ttl).
    sidecar_material_ttl_s: int = DEFAULT_MATERIAL_TTL_S
    # Caller authentication and TLS; the default is dev mode (everyone is user:dev).
    auth: AuthSettings = field(default_factory=AuthSettings)

    @property
    def effective_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        # Quoted: a data dir may contain '%', '#' or '?', which mean something in a URL.
        return f"sqlite://{quote(str((self.data_dir / 'valv.db').absolute()))}"


def load_root_keys(config: CentralConfig, *, create_dev_key: bool = True) -> RootKeyring:
    loaded = load_keyring(
        RootKeyConfig(source=config.master_key_source, files=config.master_key_files,
                      pkcs11=config.pkcs11),
        data_dir=config.data_dir, create_dev_key=create_dev_key)
    ring = loaded.keyring
    if loaded.dev_key_path is not None and create_dev_key:
        path, created = loaded.dev_key_path, loaded.dev_key_created
        log.warning(
            "DEVELOPMENT ROOT KEY IN USE: %s %s. Anyone who can read this file can decrypt "
            "every key in this store. Set VALV_MASTER_KEY_FILE for production.",
            path, "was just created" if created else "is being used",
            extra={"fields": {"rmk_id": ring.newest_id, "dev_key": str(path),
                              "created": created}},
        )
    return ring


def check_root_key_configured(config: CentralConfig) -> None:
    """Refuse an authenticated central that would use the development root key.

    That key lives in the data dir, next to the database: a copy of the data
    dir (a backup) would hold both the sealed data and the key to it.
    """
    root = RootKeyConfig(source=config.master_key_source, files=config.master_key_files,
                         pkcs11=config.pkcs11)
    if config.master_key_source or configured_sources(root) or config.dev_root_key:
        return
    raise RootKeyConfigError(
        "authentication is configured but no root key is: central would use a development "
        f"root key in the data dir {config.data_dir}, next to the database, so a copy of the "
        "data dir would hold both the data and its key. Configure one with --master-key-file "
        "/ VALV_MASTER_KEY_FILE, VALV_MASTER_KEY or --pkcs11-module (see docs/security.md, "
        "Root key operations), or pass --dev-root-key (VALV_DEV_ROOT_KEY=1) to use the "
        "development key anyway")


async def open_sealed_store(config: CentralConfig, *, create_dev_key: bool = True,
                            clock: Clock | None = None) -> SealedStore:
    """The configured store, sealed with the configured root keys, writes journaled."""
    root_keys = load_root_keys(config, create_dev_key=create_dev_key)
    return await open_journaled_store(config, root_keys, clock or SystemClock())


async def open_journaled_store(config: CentralConfig, root_keys: RootKeyring,
                               clock: Clock) -> SealedStore:
    """How every Valv process that writes opens the store: sealed with ``root_keys``,
    and every write journaled for consistent backups (valv.core.storage.journal)."""
    raw = await open_store(config.effective_store_url)
    try:
        await refuse_if_unfinished(raw)
    except BaseException:
        await raw.close()
        raise
    return journaled_store(raw, Sealer(root_keys), lambda: to_micros(clock.now()))


class CentralServer:
    """Valv central: the KMS service on TCP (and optionally a unix socket)."""

    def __init__(self, config: CentralConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        # Reads and checks the auth files, and refuses dev mode on a
        # non-loopback address without --insecure (AuthConfigError).
        self.authentication = setup_authentication(config.auth, config.host)
        if self.authentication.mode != "dev":
            check_root_key_configured(config)
        self.calls = Calls(authenticator=self.authentication.authenticator)
        self.tracker = self.calls.tracker
        self.keystore: KeyStore | None = None
        self.iam: IamPolicies | None = None
        self._store: SealedStore | None = None
        self._root_keys: RootKeyring | None = None
        self._servers: list[Server] = []
        self.tcp_address: tuple[str, int] | None = None
        self._scheduler_stop = asyncio.Event()
        self._scheduler_task: asyncio.Task[None] | None = None
        self.auditor: CentralAuditor | None = None
        self._audit_stop = asyncio.Event()
        self._audit_task: asyncio.Task[None] | None = None
        self._follower_stop = asyncio.Event()
        self._follower_task: asyncio.Task[None] | None = None
        # Every change-log entry the follower reads, to the sidecars' Watch streams.
        self.hub = ChangeHub()

    async def start(self) -> None:
        config = self.config
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root_keys = load_root_keys(config)
        self._store = await open_journaled_store(config, self._root_keys, self.clock)
        self.keystore = KeyStore(
            self._store, self._root_keys, self.clock,
            KeystoreSettings(locations=config.locations,
                             default_rotation_period=config.default_rotation_period,
                             use_cache_ttl=config.key_cache_ttl,
                             min_destroy_scheduled_duration=config.min_destroy_scheduled_duration))
        # Every change appends its audit record in its own transaction; calls
        # report denials, failures and data access when they end.
        self.auditor = CentralAuditor(AuditLog(self._store, self.clock), self.clock,
                                      data_access=config.audit_data_access,
                                      flush_interval_s=config.audit_flush_interval_s)
        self.keystore.change_hook = self.auditor.change_hook
        # Seqs of the change log are only comparable within one epoch (a new
        # store, or a restored one, gets a new epoch here). After the audit log's
        # startup check, which must see a new store as empty.
        await self.auditor.wait_open()
        # Each step on its own: e.g. records sealed under a root key that is no
        # longer configured fail it; central serves anyway, so each call can say
        # what is wrong (as the audit log's own startup check does).
        try:
            # A backup of a FoundationDB store holds the log entries its writers
            # had staged and not yet numbered; restored anywhere, they are
            # numbered now, before this central writes anything (in the
            # followers' order).
            await changelog.sequence(self._store, always=True)
            await self.auditor.log.chain(always=True)
            await journal.sequence(self._store, always=True)
        except Exception:
            log.exception("could not number staged log entries at startup; serving anyway")
        try:
            await changelog.ensure_epoch(self._store)
        except Exception:
            # Watch streams make it when they start, or fail saying why.
            log.exception("could not read or make the change log's epoch at startup; "
                          "serving anyway")
        self.calls.auditor = self.auditor
        # IAM policies inherit root -> key ring -> crypto key; the Authorizer
        # checks every call against them (not in dev mode). Policies are cached
        # like key state, for --key-cache-ttl.
        self.iam = IamPolicies(self.keystore, self.clock, root=config.root_policy,
                               cache_ttl_s=config.key_cache_ttl.total_seconds())
        self.calls.authorizer = IamAuthorizer(self.iam)
        if self.authentication.mode != "dev" and not self.iam.root.bindings:
            log.warning("no root IAM policy: no caller can create key rings or set the first "
                        "policy; set --root-policy-file (docs/security.md, Authorization)")
        # Changes made through other centrals sharing the store drop this
        # one's cached key state and policies (valv.core.changelog). Starts at
        # the current head, before serving: the caches are empty now.
        # The hub comes last: by the time a Watch stream filters an event by
        # IAM, the cached policies that event invalidates are gone.
        follower = ChangeFollower(self._store, self.clock, [self.keystore, self.iam, self.hub],
                                  poll_interval_s=config.changelog_poll_interval_s,
                                  sequencers=[self.auditor.log.chain])
        # A change through this central is read back at once, not at the next poll.
        self.keystore.after_change = follower.wake
        try:
            await follower.start()
        except Exception as exc:  # e.g. an unreadable head: calls report it; run() retries
            log.error("could not read the change log head; retrying in the background",
                      extra={"fields": {"error": str(exc)}})
        self._follower_task = asyncio.create_task(follower.run(self._follower_stop))
        # grpclib captures the running loop when a Server is built: build here.
        handlers: list[IServable] = [KeyManagementService(self.keystore, self.calls),
                                     LocationsService(self.keystore, self.calls),
                                     IamPolicyService(self.iam, self.calls),
                                     OperationsService(self.calls),
                                     KeyMaterialService(
                                         self.keystore, self.calls,
                                         ttl_s=config.sidecar_material_ttl_s,
                                         watches=Watches(self._store, self.hub, self.iam,
                                                         WatchSettings(config.watch_heartbeat_s)),
                                         auditor=self.auditor, clock=self.clock)]
        tcp = Server(handlers, **server_codecs())
        await tcp.start(config.host, config.port, ssl=self.authentication.ssl_context)
        self._servers.append(tcp)
        self.tcp_address = (config.host, bound_port(tcp))
        if config.unix_socket is not None:
            unix = Server(handlers, **server_codecs())
            await unix.start(sock=bind_unix_socket(config.unix_socket))
            self._servers.append(unix)
        log.info("valv central serving", extra={"fields": {
            "addr": f"{self.tcp_address[0]}:{self.tcp_address[1]}",
            "tls": self.authentication.ssl_context is not None,
            "auth": self.authentication.mode,
            "unix_socket": str(config.unix_socket) if config.unix_socket else None,
            "store": self._store.url, "locations": list(config.locations),
            "rmk_ids": list(self._root_keys.ids)}})
        if config.scheduler_interval_s is not None:
            scheduler = Scheduler(self.keystore, interval_s=config.scheduler_interval_s)
            self._scheduler_task = asyncio.create_task(scheduler.run(self._scheduler_stop))
        if config.audit_data_access is DataAccessMode.AGGREGATE:
            self._audit_task = asyncio.create_task(self.auditor.aggregator.run(
                self._audit_stop, config.audit_flush_interval_s))
        if config.ready_file is not None:
            write_ready_file(config.ready_file, self.tcp_address, config.unix_socket)

    async def stop(self) -> None:
        """Drain in-flight calls (bounded), then stop listening and close storage."""
        # Watch streams never end on their own: end them now (UNAVAILABLE, the
        # sidecars reconnect elsewhere or later) rather than wait out the drain.
        # No await before drain_and_close marks the server as draining, so no
        # new Watch can start in between.
        self.hub.close()
        await drain_and_close(self._servers, self.tracker, self.config.drain_timeout_s, log)
        if self._scheduler_task is not None:
            # A tick finishes the item it is on (one transaction) and stops.
            self._scheduler_stop.set()
            await self._scheduler_task
            self._scheduler_task = None
        if self._follower_task is not None:
            self._follower_stop.set()
            await self._follower_task
            self._follower_task = None
        if self._audit_task is not None:
            # Writes the data-access counts still in memory, then stops.
            self._audit_stop.set()
            await self._audit_task
            self._audit_task = None
        if self.auditor is not None:
            # Records still being written and refusal counts (any mode), before
            # the store closes.
            await self.auditor.close()
        if self._store is not None:
            await self._store.close()
            self._store.sealer.forget()  # drop the cached storage ciphers
            self._store = None
        if self._root_keys is not None:
            self._root_keys.zeroize()
        if self.config.unix_socket is not None:
            remove_unix_socket(self.config.unix_socket)
        log.info("valv central stopped")


async def run_central(config: CentralConfig, *, clock_file: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly.

    ``clock_file`` (tests only) makes the process read its time from a file.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clock: Clock | None = None
    if clock_file is not None:
        clock = FileClock(clock_file)
        log.warning("TEST CLOCK IN USE: time comes from %s", clock_file)
    server = CentralServer(config, clock=clock)
    await server.start()
    try:
        await stop.wait()
        log.info("shutdown requested")
    finally:
        await server.stop()
