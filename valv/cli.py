"""The ``valv`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from valv.settings import env_flag, parse_address, parse_duration

if TYPE_CHECKING:
    from valv.central.authn import AuthSettings
    from valv.central.server import CentralConfig
    from valv.core.crypto.keysources import Pkcs11Config
    from valv.core.iam import Policy


def _add_store_flags(p: argparse.ArgumentParser) -> None:
    from valv.central.server import default_data_dir

    env_flag(p, "--data-dir", "VALV_DATA_DIR", default=str(default_data_dir()),
             help="directory for the embedded store and the development master key")
    env_flag(p, "--store", "VALV_STORE",
             help="storage URL, e.g. sqlite:///var/lib/valv/valv.db "
                  "(default: sqlite file valv.db in the data dir)")
    env_flag(p, "--master-key-file", "VALV_MASTER_KEY_FILE",
             help="root master key file(s), comma-separated, oldest first; the last wraps "
                  "new keys (default: a development key created in the data dir, with a "
                  "warning)")
    _add_root_key_flags(p)


def _add_root_key_flags(p: argparse.ArgumentParser) -> None:
    env_flag(p, "--master-key-source", "VALV_MASTER_KEY_SOURCE",
             help="where the newest root key is: file (--master-key-file), env "
                  "(VALV_MASTER_KEY: base64 of 32 bytes, several comma-separated, oldest "
                  "first) or pkcs11 (a token); keys of the other configured sources are kept "
                  "as older keys (default: the one configured)")
    env_flag(p, "--pkcs11-module", "VALV_PKCS11_MODULE",
             help="PKCS#11 library of the token holding the root key, e.g. "
                  "/usr/lib/softhsm/libsofthsm2.so")
    env_flag(p, "--pkcs11-token-label", "VALV_PKCS11_TOKEN_LABEL",
             help="label of the PKCS#11 token")
    env_flag(p, "--pkcs11-key-label", "VALV_PKCS11_KEY_LABEL",
             help="label(s) of the AES-256 root key(s) in the token, comma-separated, oldest "
                  "first")
    env_flag(p, "--pkcs11-pin-file", "VALV_PKCS11_PIN_FILE",
             help="file holding the token's user PIN (mode 0600); or set VALV_PKCS11_PIN, "
                  "which Valv removes from its environment once read. There is no PIN flag, "
                  "so the PIN never shows in a process list")
    env_flag(p, "--pkcs11-allow-imported-key", "VALV_PKCS11_ALLOW_IMPORTED_KEY", default=False,
             action="store_true",
             help="accept token root keys that were not generated in the token (no CKA_LOCAL, "
                  "CKA_ALWAYS_SENSITIVE or CKA_NEVER_EXTRACTABLE), e.g. a key file's key "
                  "deliberately moved into the token; its value may exist outside the token")


def _master_key_files(args: argparse.Namespace) -> tuple[Path, ...]:
    return tuple(Path(p.strip()) for p in (args.master_key_file or "").split(",") if p.strip())


def _pkcs11_config(args: argparse.Namespace) -> Pkcs11Config:
    from valv.core.crypto.keysources import Pkcs11Config

    return Pkcs11Config.from_flags(
        args.pkcs11_module, args.pkcs11_token_label, args.pkcs11_key_label,
        args.pkcs11_pin_file,
        allow_imported_key=_env_bool(args.pkcs11_allow_imported_key,
                                     "VALV_PKCS11_ALLOW_IMPORTED_KEY"))


def _store_config(args: argparse.Namespace) -> CentralConfig:
    """The store and root keys named by _add_store_flags (for fsck, audit...)."""
    from valv.central.server import CentralConfig

    try:
        pkcs11 = _pkcs11_config(args)
    except argparse.ArgumentTypeError as exc:
        print(f"valv {args.command}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return CentralConfig(data_dir=Path(args.data_dir), store_url=args.store or None,
                         master_key_files=_master_key_files(args),
                         master_key_source=args.master_key_source or None,
                         pkcs11=pkcs11)


def _add_fsck(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fsck", help="check a store's consistency",
        description="Check every invariant of a Valv store (index entries, key material, "
                    "primaries) in one read-only transaction; prints one JSON line per "
                    "problem and exits 1 if there are any. Safe to run while central serves.")
    _add_store_flags(p)
    p.set_defaults(func=_run_fsck)


def _run_fsck(args: argparse.Namespace) -> int:
    import json

    from valv.central.server import open_sealed_store
    from valv.core import fsck
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.storage.base import StorageError

    config = _store_config(args)

    async def run() -> list[fsck.Problem]:
        store = await open_sealed_store(config, create_dev_key=False)
        try:
            return await fsck.check(store)
        finally:
            await store.close()

    try:
        problems = asyncio.run(run())
    except (RootKeyConfigError, StorageError, OSError) as exc:
        print(f"valv fsck: error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(json.dumps({"record": problem.record, "problem": problem.issue}))
    print(f"{len(problems)} problem(s) in {config.effective_store_url}", file=sys.stderr)
    return 1 if problems else 0


def _add_central(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "central", help="run the central KMS server",
        description="Run Valv central: the Cloud KMS v1 compatible gRPC server. Every flag "
                    "can also be set with the environment variable shown.")
    env_flag(p, "--addr", "VALV_ADDR",
             help="TCP listen address HOST:PORT (port 0 picks a free port); default "
                  "0.0.0.0:50051 with authentication and TLS configured, else 127.0.0.1:50051")
    env_flag(p, "--unix-socket", "VALV_UNIX_SOCKET",
             help="also listen on this unix socket path (created mode 0600)")
    _add_auth_flags(p)
    _add_store_flags(p)
    env_flag(p, "--dev-root-key", "VALV_DEV_ROOT_KEY", default=False, action="store_true",
             help="with authentication configured and no root key source, use (or create) "
                  "the development root key in the data dir anyway; without this central "
                  "refuses to start, since a copy of the data dir would hold the key too")
    env_flag(p, "--locations", "VALV_LOCATIONS", default="global",
             help="comma-separated locations this server serves")
    env_flag(p, "--default-rotation-period", "VALV_DEFAULT_ROTATION_PERIOD", default="30d",
             help="rotation period for CryptoKeys created without one (e.g. 30d, 90d, 'off')")
    env_flag(p, "--key-cache-ttl", "VALV_KEY_CACHE_TTL", default="1s",
             help="how long Encrypt/Decrypt reuse a key's state and unwrapped KEK; changes "
                  "made through another central reach this one within it ('0' = never "
                  "cache)")
    env_flag(p, "--scheduler-interval", "VALV_SCHEDULER_INTERVAL", default="10",
             help="seconds between scheduler ticks, which rotate keys and destroy versions "
                  "when due ('off' runs no scheduler in this process)")
    env_flag(p, "--min-destroy-duration", "VALV_MIN_DESTROY_DURATION", default="86400",
             help="the shortest destroy_scheduled_duration a CryptoKey may have, in seconds "
                  "(Cloud KMS: 1 day)")
    env_flag(p, "--audit-data-access", "VALV_AUDIT_DATA_ACCESS", default="aggregate",
             help="audit of Encrypt/Decrypt/GenerateRandomBytes: 'off', 'aggregate' (counts "
                  "per principal x key version x minute, written in batches) or 'full' (one "
                  "record per call, a storage transaction each); see the README")
    env_flag(p, "--audit-flush-interval", "VALV_AUDIT_FLUSH_INTERVAL", default="10",
             help="seconds between writes of aggregated data-access counts (and at shutdown)")
    env_flag(p, "--watch-heartbeat", "VALV_WATCH_HEARTBEAT", default="5s",
             help="how often an idle sidecar Watch stream gets a HEARTBEAT, in whole seconds "
                  "(1s-1h), so a sidecar notices a dead stream")
    env_flag(p, "--sidecar-material-ttl", "VALV_SIDECAR_MATERIAL_TTL", default="60s",
             help="the longest a sidecar may serve key material it fetched, whole seconds "
                  "(1s-1h): a sidecar keeps the shorter of this and its own cache TTL, so "
                  "this caps how long a revocation takes where a sidecar's watch is cut")
    env_flag(p, "--root-policy-file", "VALV_ROOT_POLICY_FILE",
             help="JSON IAM policy granted on every resource, e.g. {\"bindings\": [{\"role\": "
                  "\"roles/cloudkms.admin\", \"members\": [\"user:alice\"]}]}; see "
                  "docs/security.md (default: none; ignored in dev mode, where everyone has "
                  "full rights)")
    env_flag(p, "--fake-clock-file", "VALV_FAKE_CLOCK_FILE",
             help="TESTS ONLY: read the current time (ISO 8601) from this file")
    env_flag(p, "--log-level", "VALV_LOG_LEVEL", default="info",
             help="log verbosity: debug, info, warning, error")
    env_flag(p, "--ready-file", "VALV_READY_FILE",
             help="write {addr, unix_socket, pid} as JSON here once serving")
    p.set_defaults(func=_run_central)


def _add_auth_flags(p: argparse.ArgumentParser) -> None:
    env_flag(p, "--tokens-file", "VALV_TOKENS_FILE",
             help="JSON file mapping principals to the SHA-256 hex of their bearer token, "
                  "e.g. {\"user:alice\": \"<sha256>\"}")
    env_flag(p, "--jwt-issuers-file", "VALV_JWT_ISSUERS_FILE",
             help="JSON list of trusted JWT issuers (issuer, audiences, jwks_file or "
                  "public_key_file, algorithms, principal); see docs/security.md")
    env_flag(p, "--tls-cert-file", "VALV_TLS_CERT_FILE",
             help="serve TLS on the TCP port with this PEM certificate (chain)")
    env_flag(p, "--tls-key-file", "VALV_TLS_KEY_FILE",
             help="the PEM private key of --tls-cert-file")
    env_flag(p, "--tls-client-ca-file", "VALV_TLS_CLIENT_CA_FILE",
             help="accept client certificates signed by this PEM CA; the principal comes from "
                  "the certificate's SPIFFE URI or DNS SAN (needs --tls-cert-file)")
    env_flag(p, "--insecure", "VALV_INSECURE", default=False, action="store_true",
             help="allow dev mode (no authentication: every caller is user:dev with full "
                  "rights) on a non-loopback address")
    env_flag(p, "--tls-terminated-by-proxy", "VALV_TLS_TERMINATED_BY_PROXY", default=False,
             action="store_true",
             help="allow authentication without TLS on a non-loopback address, because a "
                  "proxy on this host (e.g. a service-mesh sidecar) terminates TLS in front of "
                  "central; anyone else reaching the port sends tokens in clear")


def _env_bool(value: object, name: str) -> bool:
    """A store_true flag whose default may come from its env var as text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{name}={value!r} is not a boolean; use 1 or 0")


def _auth_settings(args: argparse.Namespace) -> AuthSettings:
    from valv.central.authn import AuthSettings

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return AuthSettings(tokens_file=path(args.tokens_file),
                        jwt_issuers_file=path(args.jwt_issuers_file),
                        tls_cert_file=path(args.tls_cert_file),
                        tls_key_file=path(args.tls_key_file),
                        tls_client_ca_file=path(args.tls_client_ca_file),
                        insecure=_env_bool(args.insecure, "VALV_INSECURE"),
                        tls_terminated_by_proxy=_env_bool(args.tls_terminated_by_proxy,
                                                          "VALV_TLS_TERMINATED_BY_PROXY"))


def _default_rotation(text: str) -> timedelta | None:
    from valv.core.keystore import MAX_ROTATION_PERIOD, MIN_ROTATION_PERIOD

    period = parse_duration(text)
    if period is not None and not MIN_ROTATION_PERIOD <= period <= MAX_ROTATION_PERIOD:
        raise argparse.ArgumentTypeError(
            f"--default-rotation-period {text!r} must be between 24h and 100 years, or 'off' "
            "(Cloud KMS's limits for rotation_period)")
    return period


MAX_KEY_CACHE_TTL = timedelta(seconds=60)


def _key_cache_ttl(text: str) -> timedelta:
    ttl = parse_duration(text) or timedelta(0)
    if ttl > MAX_KEY_CACHE_TTL:
        # The TTL bounds how late another central sees a disable or destroy.
        raise argparse.ArgumentTypeError(
            f"--key-cache-ttl {text!r} is over the 60s maximum: it bounds how long a "
            "disabled or destroyed version stays usable through another central")
    return ttl


def _scheduler_interval(text: str) -> float | None:
    interval = parse_duration(text)
    return None if interval is None else interval.total_seconds()


def _min_destroy(text: str) -> timedelta:
    from valv.core.keystore import MAX_DESTROY_SCHEDULED_DURATION

    duration = parse_duration(text) or timedelta(0)
    if duration > MAX_DESTROY_SCHEDULED_DURATION:
        raise argparse.ArgumentTypeError(
            f"--min-destroy-duration {text!r} is longer than the 120-day maximum")
    return duration


def _audit_flush_interval(text: str) -> float:
    interval = parse_duration(text)
    if interval is None or interval.total_seconds() <= 0:
        raise argparse.ArgumentTypeError(
            f"--audit-flush-interval {text!r} must be a positive number of seconds")
    return interval.total_seconds()


def _whole_seconds(text: str, flag: str, high: int) -> int:
    """A duration flag that must be a whole number of seconds from 1 to ``high``."""
    try:
        duration = parse_duration(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{flag}: {exc}") from None
    seconds = 0.0 if duration is None else duration.total_seconds()
    if not 1 <= seconds <= high or seconds != int(seconds):
        raise argparse.ArgumentTypeError(
            f"{flag} {text!r} must be a whole number of seconds between 1s and 1h")
    return int(seconds)


def _watch_heartbeat(text: str) -> int:
    from valv.central.watch import MAX_HEARTBEAT_S

    return _whole_seconds(text, "--watch-heartbeat", MAX_HEARTBEAT_S)


def _sidecar_material_ttl(text: str) -> int:
    return _whole_seconds(text, "--sidecar-material-ttl", 3600)


def _root_policy(path: str | None) -> Policy | None:
    """The root IAM policy file, checked now: a bad one is a startup error (InvalidArgument)."""
    from valv.core.iam import load_root_policy

    return load_root_policy(Path(path)) if path else None


def _run_central(args: argparse.Namespace) -> int:
    from valv.central.server import CentralConfig, run_central
    from valv.core.audit import DataAccessMode
    from valv.core.authn import AuthConfigError
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.errors import ValvError
    from valv.core.names import check_id
    from valv.core.storage.base import StorageError
    from valv.logs import setup_logging

    try:
        setup_logging(args.log_level)
        auth = _auth_settings(args)
        host, port = parse_address(args.addr or auth.default_address)
        locations = tuple(loc.strip() for loc in args.locations.split(",") if loc.strip())
        for loc in locations:
            check_id(loc, "location")
        config = CentralConfig(
            host=host, port=port,
            unix_socket=Path(args.unix_socket) if args.unix_socket else None,
            data_dir=Path(args.data_dir),
            store_url=args.store or None,
            master_key_files=_master_key_files(args),
            master_key_source=args.master_key_source or None,
            pkcs11=_pkcs11_config(args),
            dev_root_key=_env_bool(args.dev_root_key, "VALV_DEV_ROOT_KEY"),
            locations=locations or ("global",),
            default_rotation_period=_default_rotation(args.default_rotation_period),
            key_cache_ttl=_key_cache_ttl(args.key_cache_ttl),
            scheduler_interval_s=_scheduler_interval(args.scheduler_interval),
            min_destroy_scheduled_duration=_min_destroy(args.min_destroy_duration),
            ready_file=Path(args.ready_file) if args.ready_file else None,
            root_policy=_root_policy(args.root_policy_file),
            audit_data_access=DataAccessMode.parse(args.audit_data_access),
            audit_flush_interval_s=_audit_flush_interval(args.audit_flush_interval),
            watch_heartbeat_s=_watch_heartbeat(args.watch_heartbeat),
            sidecar_material_ttl_s=_sidecar_material_ttl(args.sidecar_material_ttl),
            auth=auth,
        )
    except (argparse.ArgumentTypeError, ValueError, ValvError) as exc:
        print(f"valv central: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_central(config, clock_file=args.fake_clock_file or None))
    except (RootKeyConfigError, StorageError, OSError, AuthConfigError) as exc:
        # A configuration problem found at startup (root key, storage, listen
        # address, authentication): one clear line, not a traceback.
        print(f"valv central: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_sidecar(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sidecar", help="run the local sidecar (Encrypt/Decrypt from cached KEKs)",
        description="Run a Valv sidecar: a Cloud KMS v1 compatible endpoint on loopback (and "
                    "optionally a unix socket). It answers Encrypt and Decrypt itself from "
                    "briefly cached KEK versions fetched from central, and forwards every "
                    "other call to central. It calls central with its own credentials, so "
                    "local callers act with its identity. Every flag can also be set with the "
                    "environment variable shown.")
    env_flag(p, "--central", "VALV_CENTRAL", help="central's address HOST:PORT (required)")
    env_flag(p, "--addr", "VALV_ADDR", default="127.0.0.1:50052",
             help="loopback TCP listen address HOST:PORT (port 0 picks a free port); a "
                  "non-loopback address is refused")
    env_flag(p, "--unix-socket", "VALV_UNIX_SOCKET",
             help="also listen on this unix socket path (created mode 0600)")
    env_flag(p, "--unix-socket-mode", "VALV_UNIX_SOCKET_MODE", default="0600",
             help="the unix socket's file mode: 0600 (this user only) or 0660 (also its "
                  "group, e.g. an application container of the same pod sharing a "
                  "supplemental group); anyone who can connect acts with the sidecar's "
                  "identity")
    env_flag(p, "--token-file", "VALV_TOKEN_FILE",
             help="file holding the sidecar's bearer token for central (e.g. a projected "
                  "Kubernetes service-account token); re-read when it changes")
    env_flag(p, "--central-ca-file", "VALV_CENTRAL_CA_FILE",
             help="use TLS to central, trusting this PEM CA (TLS with the system CAs if only "
                  "--client-cert-file is set)")
    env_flag(p, "--client-cert-file", "VALV_CLIENT_CERT_FILE",
             help="PEM client certificate presented to central (mTLS)")
    env_flag(p, "--client-key-file", "VALV_CLIENT_KEY_FILE",
             help="the PEM private key of --client-cert-file")
    env_flag(p, "--log-level", "VALV_LOG_LEVEL", default="info",
             help="log verbosity: debug, info, warning, error")
    env_flag(p, "--cache-ttl", "VALV_CACHE_TTL", default="60s",
             help="how long fetched key material may serve (e.g. 60s, 5m); also how long "
                  "a revocation can take to apply if the watch stream to central is cut")
    env_flag(p, "--cache-max-uses", "VALV_CACHE_MAX_USES", default="1000000",
             help="Encrypt/Decrypt calls per cached version before it is fetched again")
    env_flag(p, "--cache-max-entries", "VALV_CACHE_MAX_ENTRIES", default="10000",
             help="cached versions per purpose (Encrypt, Decrypt); least recently used go "
                  "first")
    env_flag(p, "--usage-report-interval", "VALV_USAGE_REPORT_INTERVAL", default="10s",
             help="how often local Encrypt/Decrypt counts go to central's audit log")
    env_flag(p, "--metrics-addr", "VALV_METRICS_ADDR",
             help="serve /healthz, /readyz and /metrics (Prometheus) over HTTP on HOST:PORT; "
                  "off by default")
    env_flag(p, "--ready-file", "VALV_READY_FILE",
             help="write {addr, unix_socket, pid, metrics} as JSON here once serving")
    p.set_defaults(func=_run_sidecar)


def _seconds(text: str, flag: str) -> float:
    duration = parse_duration(text)
    if duration is None or duration.total_seconds() <= 0:
        raise ValueError(f"{flag} must be a positive duration such as 60s or 5m, not {text!r}")
    return duration.total_seconds()


def _socket_mode(text: str) -> int:
    if text not in ("0600", "600", "0660", "660"):
        raise ValueError(f"--unix-socket-mode must be 0600 or 0660, not {text!r} (a socket "
                         "others could reach would let any local user act as the sidecar)")
    return int(text, 8)


def _count(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag} must be a whole number, not {text!r}") from None
    if value < 1:
        raise ValueError(f"{flag} must be at least 1, not {value}")
    return value


def _run_sidecar(args: argparse.Namespace) -> int:
    from valv.logs import setup_logging
    from valv.sidecar.server import SidecarConfig, SidecarServer, run_sidecar

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    try:
        setup_logging(args.log_level)
        if not args.central:
            raise ValueError("--central (VALV_CENTRAL) is required")
        central_host, central_port = parse_address(args.central)
        host, port = parse_address(args.addr)
        metrics_host, metrics_port = (parse_address(args.metrics_addr) if args.metrics_addr
                                      else (None, 0))
        config = SidecarConfig(
            central_host=central_host, central_port=central_port, host=host, port=port,
            unix_socket=path(args.unix_socket),
            unix_socket_mode=_socket_mode(args.unix_socket_mode),
            token_file=path(args.token_file),
            central_ca_file=path(args.central_ca_file),
            client_cert_file=path(args.client_cert_file),
            client_key_file=path(args.client_key_file),
            ready_file=path(args.ready_file),
            cache_ttl_s=_seconds(args.cache_ttl, "--cache-ttl"),
            cache_max_uses=_count(args.cache_max_uses, "--cache-max-uses"),
            cache_max_entries=_count(args.cache_max_entries, "--cache-max-entries"),
            usage_report_interval_s=_seconds(args.usage_report_interval,
                                             "--usage-report-interval"),
            metrics_host=metrics_host, metrics_port=metrics_port)
        SidecarServer(config)  # checks the addresses, token file and TLS files now
    except (argparse.ArgumentTypeError, ValueError, OSError) as exc:
        print(f"valv sidecar: error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_sidecar(config))
    except (OSError, ValueError) as exc:
        print(f"valv sidecar: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="valv", description="Valv: a self-hosted, Cloud KMS compatible key manager")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_central(sub)
    _add_sidecar(sub)
    _add_fsck(sub)
    from valv import auditcli, backupcli, bench

    auditcli.add_parser(sub)
    backupcli.add_parsers(sub)
    bench.add_parser(sub)
    from valv import rmk

    rmk.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
