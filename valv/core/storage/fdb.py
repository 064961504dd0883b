"""The FoundationDB backend (DESIGN.md §4), on the official ``foundationdb`` bindings.

Open it with ``open_store("fdb:///etc/foundationdb/fdb.cluster?prefix=valv")``
(URL form: ``parse_url``; operator guide: docs/foundationdb.md).

Threading model: each transaction body runs whole in a bounded thread pool,
as in the sqlite backend, and blocks there on FDB futures. Bodies are plain
synchronous functions that call ``tx.get()`` and expect a value back
(valv.core.storage.base), so something has to block on the future; bridging
every future to asyncio with ``on_ready`` callbacks would still need the body
to wait for it, which only a thread can do without turning every body into a
coroutine. So the event loop only ever awaits a whole transaction, which
starts, retries and finishes inside one worker thread: no transaction is held
open across an await. The pool bounds how many transactions are in flight;
the FDB client's own network thread does the I/O. Watches are the exception:
nothing blocks on them, so their futures complete an asyncio future through
``on_ready`` and ``loop.call_soon_threadsafe`` (see ``wait_for_change``).

Keys: a deployment's keys live under a raw prefix, ``fdb.tuple.pack((prefix,))``
(``b"\\x02valv\\x00"`` for the default prefix), computed once (no directory layer,
so no round trip on the hot path). Every logical key ``k`` is stored as
``raw_prefix + k``, ranges are translated the same way (``b""`` becomes the
prefix itself, ``b"\\xff"`` the end of the deployment's keys), and the prefix is
stripped from returned keys. One cluster can host several deployments, one
prefix each: packed one-string tuples never overlap once extended by logical
keys, which are all below ``b"\\xff"``, even when one prefix is a string prefix
of another ("valv", "valv2"). ``KeyCodec`` does this without the C library.

Limits, checked in Python before anything reaches FDB, so the error names the
record (valv.core.storage.base):

- key: FoundationDB's 10,000 bytes apply to the stored key, prefix included,
  so a logical key may be at most ``MAX_KEY_BYTES - len(raw_prefix)`` bytes
  (9,994 for "valv"): ``KeyCodec.max_key_bytes``. Valv's own keys are a few
  hundred bytes at most; only a hand-made key close to the limit that fits the
  sqlite backend can fail to restore here, with a LimitExceededError naming it.
- value: ``MAX_VALUE_BYTES``.
- transaction: ``MAX_TRANSACTION_BYTES``, counted the way FoundationDB
  documents its size limit (keys and values written, ranges cleared, read and
  write conflict ranges, prefix included: ``TransactionBudget``), so Valv
  refuses first and names the write. That is stricter than the sqlite
  backend, which counts only what is written. Read-only transactions never
  commit, so they have no size limit.
- keys at or above ``b"\\xff"`` are refused, as by the sqlite backend.

Transactions: FDB's retry loop. Every transaction gets the ``timeout``
(default 5000 ms, covering all its retries) and ``retry_limit`` (default 100)
options; ``tr.on_error(e)`` decides whether an error is retried (after its
backoff) or final. Read-only bodies never commit. A body that swallows an FDB
error (``tx.get`` raising StorageError) is run again anyway, as the sqlite
backend does with SQLITE_BUSY. One deliberate exception to on_error: a commit
whose result is unknown (commit_unknown_result, or a timeout while
committing) is not run again, because Valv's bodies are not idempotent (a
rerun could create a second key version or a second change-log entry); it is
reported as ``FdbCommitUnknownError``. The client library's
``automatic_idempotency`` (API 730+) would let it settle unknown results
itself, but its own documentation still calls it "in development and not
ready for general use", so it is opt-in (``automatic_idempotency=1`` in the
URL), off by default. Errors that remain become StorageError
subclasses, classified by the pure table in ``classify``: unavailable (the
cluster, the network or the configuration: retry later or fix the setup),
limit, or a bug.

Tenants are left out: the 8.0 Python bindings stub out ``Database.open_tenant``
(it returns None), and the prefix gives the same separation between
deployments.

Versionstamped keys (``set_versionstamped``) order the change log, the audit
log and the write journal without a shared counter; the sequencers that give
staged entries their seqs read the staging ranges with snapshot reads
(``get_range_snapshot``), since every writer's versionstamped key carries a
write conflict range to the end of its prefix.
"""

from __future__ import annotations

import asyncio
import enum
import importlib
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import fdb
import fdb.tuple

from valv.core.storage import keys
from valv.core.storage.base import (
    MAX_KEY_BYTES,
    MAX_TRANSACTION_BYTES,
    MAX_VALUE_BYTES,
    LimitExceededError,
    ReadOnlyTransactionError,
    StorageError,
    Store,
    Transaction,
)

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_PREFIX",
    "DEFAULT_RETRY_LIMIT",
    "DEFAULT_TIMEOUT_MS",
    "FdbClientMissingError",
    "FdbCommitUnknownError",
    "FdbConfig",
    "FdbError",
    "FdbErrorInfo",
    "FdbErrorKind",
    "FdbInternalError",
    "FdbLimitExceededError",
    "FdbStore",
    "FdbUnavailableError",
    "KeyCodec",
    "TransactionBudget",
    "check_value",
    "classify",
    "error_for",
    "load_bindings",
    "parse_url",
]

T = TypeVar("T")

DEFAULT_API_VERSION = 730
# 630: timeouts and retry limits survive on_error (610+), error predicates as
# documented today. The newest is whatever the installed bindings know.
MIN_API_VERSION = 630
MAX_API_VERSION: int = fdb.LATEST_API_VERSION
DEFAULT_PREFIX = "valv"
DEFAULT_TIMEOUT_MS = 5_000
DEFAULT_RETRY_LIMIT = 100
# Bounds for the URL parameters: a timeout of 0 or a retry limit of -1 would
# mean "unbounded" to FoundationDB, which would let a transaction hang forever.
MAX_TIMEOUT_MS = 600_000
MAX_RETRY_LIMIT = 100_000
# automatic_idempotency appeared at API version 730 (opt-in: see the module notes).
_IDEMPOTENCY_API_VERSION = 730

# Printable, URL-safe, no NUL (which the tuple layer would escape) and short:
# the prefix is repeated in every key.
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIGITS_RE = re.compile(r"[0-9]{1,9}")
_SYSTEM_KEYSPACE = b"\xff"
_PARAMETERS = ("api_version", "automatic_idempotency", "prefix", "retry_limit", "timeout_ms")

_URL_FORMS = (
    "fdb:// (the default cluster file), fdb:///absolute/path/fdb.cluster or "
    "fdb:relative/path/fdb.cluster, optionally followed by "
    "?prefix=valv&api_version=730&timeout_ms=5000&retry_limit=100&automatic_idempotency=0"
)


# ---- configuration and URLs ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class FdbConfig:
    """What an ``fdb:`` URL says. ``cluster_file`` None: the client library's
    default (``FDB_CLUSTER_FILE``, then ``./fdb.cluster``, then
    ``/etc/foundationdb/fdb.cluster`` on Linux)."""

    cluster_file: str | None = None
    api_version: int = DEFAULT_API_VERSION
    prefix: str = DEFAULT_PREFIX
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    retry_limit: int = DEFAULT_RETRY_LIMIT
    # FoundationDB's automatic_idempotency on writing transactions (API 730+).
    automatic_idempotency: bool = False

    def to_url(self) -> str:
        """The canonical URL of this configuration (``parse_url`` reads it back)."""
        path = quote(self.cluster_file, safe="/") if self.cluster_file else ""
        query = "&".join(
            f"{name}={value}"
            for name, value, default in (
                ("prefix", self.prefix, DEFAULT_PREFIX),
                ("api_version", self.api_version, DEFAULT_API_VERSION),
                ("timeout_ms", self.timeout_ms, DEFAULT_TIMEOUT_MS),
                ("retry_limit", self.retry_limit, DEFAULT_RETRY_LIMIT),
                ("automatic_idempotency", int(self.automatic_idempotency), 0),
            )
            if value != default
        )
        return f"fdb://{path}" + (f"?{query}" if query else "")


def parse_url(url: str) -> FdbConfig:
    """The configuration an ``fdb:`` storage URL names; StorageError if it is malformed.

    Forms: ``fdb://`` (or ``fdb:``) for the default cluster file,
    ``fdb:///etc/foundationdb/fdb.cluster`` for an absolute path,
    ``fdb:relative/fdb.cluster`` for one relative to the working directory
    (made absolute here). Parameters, each at most once: ``prefix`` (default
    "valv"), ``api_version`` (default 730), ``timeout_ms`` (default 5000),
    ``retry_limit`` (default 100), ``automatic_idempotency`` (0 or 1, default 0;
    needs api_version 730+). Pure: does not touch the file or FDB.
    """
    if not isinstance(url, str):
        raise StorageError(f"storage URL must be a string, not {type(url).__name__}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StorageError(f"storage URL {url!r} is malformed ({exc}); use {_URL_FORMS}") from None
    if parts.scheme.lower() != "fdb":
        raise StorageError(f"storage URL {url!r} is not an fdb: URL; use {_URL_FORMS}")
    if parts.netloc:
        raise StorageError(
            f"storage URL {url!r}: fdb URLs take no host ({parts.netloc!r}): the cluster file "
            f"says where the cluster is; use {_URL_FORMS}"
        )
    if parts.fragment or url.endswith("#"):
        raise StorageError(f"storage URL {url!r}: fdb URLs take no fragment (#...)")
    cluster_file = _cluster_file(url, unquote(parts.path))
    values = _parameters(url, parts.query)

    prefix = values.get("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise StorageError(f"storage URL {url!r}: prefix is empty; every key needs one")
    if not _PREFIX_RE.fullmatch(prefix):
        raise StorageError(
            f"storage URL {url!r}: prefix {prefix!r} is not valid: 1 to 64 characters from "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    api_version = _integer(url, values, "api_version", DEFAULT_API_VERSION,
                           MIN_API_VERSION, MAX_API_VERSION,
                           "the FoundationDB API version your client library and cluster "
                           "support, e.g. 730 for 7.3")
    timeout_ms = _integer(url, values, "timeout_ms", DEFAULT_TIMEOUT_MS, 1, MAX_TIMEOUT_MS,
                          "milliseconds a transaction may take, retries included")
    retry_limit = _integer(url, values, "retry_limit", DEFAULT_RETRY_LIMIT, 0, MAX_RETRY_LIMIT,
                           "how many times a transaction may be retried")
    idempotency = _integer(url, values, "automatic_idempotency", 0, 0, 1,
                           "1 sets FoundationDB's automatic_idempotency on writes")
    if idempotency and api_version < _IDEMPOTENCY_API_VERSION:
        raise StorageError(
            f"storage URL {url!r}: automatic_idempotency=1 needs api_version "
            f"{_IDEMPOTENCY_API_VERSION} or later, not {api_version}")
    return FdbConfig(cluster_file, api_version, prefix, timeout_ms, retry_limit,
                     bool(idempotency))


def _cluster_file(url: str, path: str) -> str | None:
    if not path:
        return None
    if "\x00" in path:
        raise StorageError(f"storage URL {url!r}: NUL in the cluster file path")
    if path.endswith("/"):
        raise StorageError(
            f"storage URL {url!r}: {path!r} is a directory; name the cluster file itself, "
            "e.g. fdb:///etc/foundationdb/fdb.cluster"
        )
    return os.path.abspath(path)


def _parameters(url: str, query: str) -> dict[str, str]:
    if not query:
        if url.endswith("?"):
            raise StorageError(f"storage URL {url!r}: empty query after '?'")
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise StorageError(
            f"storage URL {url!r}: malformed parameters ({exc}); use name=value pairs joined "
            "by '&'"
        ) from None
    values: dict[str, str] = {}
    for name, value in pairs:
        if name not in _PARAMETERS:
            raise StorageError(
                f"storage URL {url!r}: unknown parameter {name!r}; fdb URLs take "
                f"{', '.join(_PARAMETERS)}"
            )
        if name in values:
            raise StorageError(f"storage URL {url!r}: parameter {name!r} is given twice")
        values[name] = value
    return values


def _integer(url: str, values: dict[str, str], name: str, default: int, low: int, high: int,
             meaning: str) -> int:
    if name not in values:
        return default
    raw = values[name]
    # A regex, not int(): int() also takes " 5", "5_0" and non-ASCII digits.
    if not _DIGITS_RE.fullmatch(raw) or not low <= int(raw) <= high:
        raise StorageError(
            f"storage URL {url!r}: {name}={raw!r} is not valid: an integer from {low} to "
            f"{high} ({meaning})"
        )
    return int(raw)


# ---- keys ---------------------------------------------------------------------


def _check_range_bounds(begin: bytes, end: bytes) -> None:
    if not isinstance(begin, bytes) or not isinstance(end, bytes):
        raise TypeError("range bounds are bytes")
    if end > _SYSTEM_KEYSPACE:
        raise StorageError(f"range end {keys.describe(end)} is past the \\xff keyspace")


class KeyCodec:
    """Logical keys <-> the keys stored in FoundationDB, under one deployment's prefix."""

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
            raise StorageError(f"invalid key prefix {prefix!r}")
        self.prefix = prefix
        raw: bytes = fdb.tuple.pack((prefix,))
        self.raw_prefix = raw
        # FoundationDB's key limit applies to the stored key, prefix included.
        self.max_key_bytes = MAX_KEY_BYTES - len(raw)

    def check_key(self, key: bytes) -> None:
        """Raise unless ``key`` is a logical key this deployment can store."""
        if not isinstance(key, bytes):
            raise TypeError(f"storage keys are bytes, not {type(key).__name__}")
        if len(key) > self.max_key_bytes:
            raise LimitExceededError(
                f"key {keys.describe(key)} is {len(key)} bytes (limit {self.max_key_bytes} "
                f"here: FoundationDB's {MAX_KEY_BYTES} less {len(self.raw_prefix)} for the key "
                f"prefix {self.prefix!r})"
            )
        if key.startswith(_SYSTEM_KEYSPACE):
            raise StorageError(f"key {keys.describe(key)} is in the reserved \\xff keyspace")

    def pack(self, key: bytes) -> bytes:
        """The stored key for the logical ``key`` (checked first)."""
        self.check_key(key)
        return self.raw_prefix + key

    def unpack(self, stored: bytes) -> bytes:
        """The logical key of a stored key; StorageError if it is not under the prefix."""
        if not stored.startswith(self.raw_prefix):
            raise StorageError(
                f"FoundationDB returned key {stored[:80]!r} from outside the prefix "
                f"{self.prefix!r} (a bug: ranges are always translated)"
            )
        return stored[len(self.raw_prefix):]

    def range(self, begin: bytes, end: bytes) -> tuple[bytes, bytes]:
        """The stored range for the logical range ``[begin, end)``.

        ``b""`` maps to the prefix itself and ``b"\\xff"`` to ``prefix + b"\\xff"``, the
        end of this deployment's keys (no logical key starts with ``b"\\xff"``).
        """
        _check_range_bounds(begin, end)
        return self.raw_prefix + begin, self.raw_prefix + end

    def subspace(self) -> tuple[bytes, bytes]:
        """The stored range holding every key of this deployment."""
        return self.range(b"", _SYSTEM_KEYSPACE)


def check_value(key: bytes, value: bytes | bytearray | memoryview) -> bytes:
    """``value`` as bytes, if FoundationDB can store it; LimitExceededError naming ``key``."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"value for {keys.describe(key)} must be bytes")
    value = bytes(value)
    if len(value) > MAX_VALUE_BYTES:
        raise LimitExceededError(
            f"value for {keys.describe(key)} is {len(value)} bytes (limit {MAX_VALUE_BYTES})"
        )
    return value


# ---- transaction size -----------------------------------------------------------


def set_cost(stored_key: bytes, value: bytes) -> int:
    """Bytes a set adds: the key and value, plus the write conflict range [k, k+\\x00)."""
    return len(stored_key) + len(value) + 2 * len(stored_key) + 1


def clear_cost(stored_key: bytes) -> int:
    """Bytes a clear adds: the cleared range [k, k+\\x00) and its write conflict range."""
    return 2 * (2 * len(stored_key) + 1)


def clear_range_cost(begin: bytes, end: bytes) -> int:
    """Bytes a range clear adds: the range and its write conflict range."""
    return 2 * (len(begin) + len(end))


def read_cost(stored_key: bytes) -> int:
    """Bytes a read adds to a writer: its read conflict range [k, k+\\x00)."""
    return 2 * len(stored_key) + 1


def range_read_cost(begin: bytes, end: bytes) -> int:
    """Bytes a range read adds to a writer: its read conflict range (at most the bounds)."""
    return len(begin) + len(end)


class TransactionBudget:
    """A writable transaction's size, counted as FoundationDB documents its limit.

    Once over the limit it stays over: a body that catches the error cannot
    commit anyway (``check_commit``), as with the sqlite backend.
    """

    def __init__(self, limit: int = MAX_TRANSACTION_BYTES) -> None:
        self.limit = limit
        self.used = 0
        self._too_large: LimitExceededError | None = None

    def charge(self, nbytes: int, what: str) -> None:
        """Add ``nbytes`` for ``what`` (e.g. "writing ('k',)"); LimitExceededError if over."""
        if self._too_large is not None:
            raise self._too_large
        if self.used + nbytes > self.limit:
            self._too_large = LimitExceededError(
                f"transaction too large: {what} would bring it to {self.used + nbytes} bytes "
                f"(limit {self.limit}; FoundationDB counts keys and values written, ranges "
                "cleared and conflict ranges, key prefix included)"
            )
            raise self._too_large
        self.used += nbytes

    def check_commit(self) -> None:
        if self._too_large is not None:
            raise self._too_large


# ---- errors -----------------------------------------------------------------------


class FdbErrorKind(enum.Enum):
    """What an FDB error code means for Valv."""

    # on_error retries it: nothing was committed (conflicts, throttling, recoveries).
    RETRYABLE = "retryable"
    # Retryable for FDB, but the commit may have happened.
    MAYBE_COMMITTED = "maybe_committed"
    # Not retryable, and not Valv's fault: the cluster, the network or the
    # setup (cluster file, client version, TLS). Retry later or fix the setup.
    UNAVAILABLE = "unavailable"
    # A FoundationDB size limit: the request itself is too large.
    LIMIT = "limit"
    # Valv used the API wrongly, or the client library failed internally.
    BUG = "bug"


@dataclass(frozen=True, slots=True)
class FdbErrorInfo:
    code: int
    name: str
    kind: FdbErrorKind
    hint: str

    @property
    def retryable(self) -> bool:
        return self.kind in (FdbErrorKind.RETRYABLE, FdbErrorKind.MAYBE_COMMITTED)

    @property
    def maybe_committed(self) -> bool:
        return self.kind is FdbErrorKind.MAYBE_COMMITTED


_R, _M, _U, _L, _B = (FdbErrorKind.RETRYABLE, FdbErrorKind.MAYBE_COMMITTED,
                      FdbErrorKind.UNAVAILABLE, FdbErrorKind.LIMIT, FdbErrorKind.BUG)
_OVERLOADED = ("the cluster is overloaded or throttling clients; check `fdbcli --exec status` "
               "and the cluster's capacity")
_RECOVERING = ("the cluster is recovering or a storage server is lagging; check "
               "`fdbcli --exec status`")
_CLUSTER_FILE = ("check the cluster file: it must exist, be readable and writable by Valv "
                 "(the client updates it when coordinators change) and hold a connection "
                 "string like description:id@10.0.0.1:4500")
_CLIENT_VERSION = ("the client library does not match the cluster's version: install the "
                   "foundationdb-clients package of the cluster's version, or give the client "
                   "the matching library through FDB_NETWORK_OPTION_EXTERNAL_CLIENT_DIRECTORY")

# Codes from FoundationDB's error_definitions.h; retryable and maybe-committed
# as fdb_error_predicate classifies them. A pure table, so messages and
# classification work (and are tested) without libfdb_c; the retry decision at
# run time is still tr.on_error's.
_ERRORS: dict[int, tuple[str, FdbErrorKind, str]] = {
    1004: ("timed_out", _U, "an operation timed out; the cluster may be unreachable"),
    1007: ("transaction_too_old", _R,
           "the transaction ran longer than FoundationDB's 5 s limit; " + _OVERLOADED),
    1009: ("future_version", _R, _RECOVERING),
    1020: ("not_committed", _R,
           "the transaction kept conflicting with concurrent transactions; retry later, or "
           "raise retry_limit/timeout_ms if this happens under normal load"),
    1021: ("commit_unknown_result", _M,
           "the cluster did not confirm the commit (a recovery or a network problem)"),
    # Not retryable (fdb_error_predicate: neither maybe-committed nor retryable),
    # and raised by a commit its outcome is unknown: see _UNKNOWN_IF_COMMITTING.
    1022: ("commit_unknown_result_fatal", _U,
           "the commit's idempotency id expired before its result was known"),
    1025: ("transaction_cancelled", _U, "the transaction was cancelled (the store is closing?)"),
    1031: ("transaction_timed_out", _U,
           "the transaction did not finish within timeout_ms; the cluster is unreachable, "
           "recovering or overloaded (check `fdbcli --exec status`), the cluster file points "
           "at the wrong cluster, or the client library does not match the cluster's version"),
    1032: ("too_many_watches", _U,
           "this process has too many watches outstanding (10,000 by default)"),
    1034: ("watches_disabled", _B, "watches need read-your-writes, which Valv never disables"),
    1036: ("accessed_unreadable", _B, "read a key made unreadable by a versionstamp operation"),
    1037: ("process_behind", _R, _RECOVERING),
    1038: ("database_locked", _R,
           "the database is locked (a DR switchover or a restore in progress?)"),
    1039: ("cluster_version_changed", _M,
           "the cluster was upgraded to a new protocol version while the transaction ran"),
    1040: ("external_client_already_loaded", _B, "an external client library was loaded twice"),
    1041: ("lookup_failed", _U,
           "a host name in the cluster file could not be resolved; check DNS and the file"),
    1042: ("commit_proxy_memory_limit_exceeded", _R, _OVERLOADED),
    1051: ("batch_transaction_throttled", _R, _OVERLOADED),
    1078: ("grv_proxy_memory_limit_exceeded", _R, _OVERLOADED),
    1101: ("operation_cancelled", _U, "the operation was cancelled (the store is closing?)"),
    1102: ("future_released", _B, "a future was used after it was released"),
    1213: ("tag_throttled", _R, _OVERLOADED),
    1223: ("proxy_tag_throttled", _R, _OVERLOADED),
    1235: ("transaction_throttled_hot_shard", _R, _OVERLOADED),
    1510: ("io_error", _U, "a disk operation failed on this host; " + _CLUSTER_FILE),
    1511: ("file_not_found", _U, _CLUSTER_FILE),
    1513: ("file_not_readable", _U, _CLUSTER_FILE),
    1514: ("file_not_writable", _U, _CLUSTER_FILE),
    1515: ("no_cluster_file_found", _U,
           "no cluster file was found: name it in the URL "
           "(fdb:///etc/foundationdb/fdb.cluster) or set FDB_CLUSTER_FILE"),
    2000: ("client_invalid_operation", _B, "an API call was not valid in this state"),
    2004: ("key_outside_legal_range", _B, "a key was outside the legal range"),
    2005: ("inverted_range", _B, "a range had its begin after its end"),
    2006: ("invalid_option_value", _B, "an option was set to an invalid value"),
    2007: ("invalid_option", _B,
           "an option is not valid here (an api_version too old for it?)"),
    2008: ("network_not_setup", _B, "the FDB network was used before it was set up"),
    2009: ("network_already_setup", _B, "the FDB network was set up twice"),
    2012: ("range_limits_invalid", _B, "a range read had invalid limits"),
    2015: ("future_not_set", _B, "a future was read before it was ready"),
    2017: ("used_during_commit", _B, "the transaction was used while it was committing"),
    2018: ("invalid_mutation_type", _B, "an unknown atomic operation"),
    2020: ("transaction_invalid_version", _B, "the transaction has no valid commit version"),
    2023: ("transaction_read_only", _B, "a read-only transaction was committed"),
    2026: ("blocked_from_network_thread", _B, "a callback blocked the FDB network thread"),
    2100: ("incompatible_protocol_version", _U, _CLIENT_VERSION),
    2101: ("transaction_too_large", _L, "the transaction exceeds FoundationDB's 10 MB limit"),
    2102: ("key_too_large", _L, "a key exceeds FoundationDB's 10,000-byte limit"),
    2103: ("value_too_large", _L, "a value exceeds FoundationDB's 100,000-byte limit"),
    2104: ("connection_string_invalid", _U, _CLUSTER_FILE),
    2107: ("tls_error", _U,
           "TLS to the cluster failed: check the FDB_TLS_* settings (certificate, key, CA, "
           "verification peers) against the cluster's"),
    2108: ("unsupported_operation", _B, "the operation is not supported by this client"),
    2125: ("incompatible_client", _U, _CLIENT_VERSION),
    2130: ("tenant_name_required", _U,
           "the cluster requires tenants (tenant_mode=required), which Valv does not use: "
           "give Valv a cluster, or a tenant mode, that allows raw access"),
    2131: ("tenant_not_found", _U, "a tenant does not exist"),
    2136: ("tenants_disabled", _U, "tenants are disabled on the cluster"),
    2200: ("api_version_unset", _B, "the API version was not selected"),
    2201: ("api_version_already_set", _B, "the API version was selected twice"),
    2202: ("api_version_invalid", _B, "the API version is not valid"),
    2203: ("api_version_not_supported", _U,
           "the installed libfdb_c does not support this api_version: use an older one in the "
           "URL, or install a newer client package"),
    2210: ("exact_mode_without_limits", _B, "EXACT streaming mode was used without a limit"),
    4000: ("unknown_error", _B, "the client library failed internally"),
    4100: ("internal_error", _B, "the client library failed internally"),
    6000: ("permission_denied", _U,
           "the cluster refused access: check the authorization token or the cluster's "
           "access settings"),
}

# Errors that, raised by commit(), leave the outcome unknown even though
# fdb_error_predicate does not call them maybe-committed: the client gave up
# waiting, but the commit may already have been sent.
_UNKNOWN_IF_COMMITTING = frozenset({1004, 1022, 1025, 1031, 1101})


def classify(code: int) -> FdbErrorInfo:
    """What FDB error ``code`` means: its name, kind and a hint an operator can act on.

    Codes missing from the table are classified by range: 1xxx and 15xx
    (operational and platform errors) as unavailable, 2xxx (client misuse) and
    4xxx (internal) as bugs, anything else as unavailable.
    """
    known = _ERRORS.get(code)
    if known is not None:
        name, kind, hint = known
        return FdbErrorInfo(code, name, kind, hint)
    if 2000 <= code < 3000 or 4000 <= code < 5000:
        return FdbErrorInfo(code, "unknown", FdbErrorKind.BUG,
                            "an error code Valv does not know, from a misused API or an "
                            "internal failure")
    return FdbErrorInfo(code, "unknown", FdbErrorKind.UNAVAILABLE,
                        "an error code Valv does not know; see FoundationDB's error code list")


class FdbError(StorageError):
    """An FDB error that remained after the retry loop. ``code`` is FoundationDB's."""

    def __init__(self, message: str, info: FdbErrorInfo) -> None:
        super().__init__(message)
        self.code = info.code
        self.info = info


class FdbUnavailableError(FdbError):
    """The cluster, the network or the setup failed the transaction: retry later or fix it."""


class FdbCommitUnknownError(FdbUnavailableError):
    """The commit may or may not have happened; the body was not run again."""


class FdbInternalError(FdbError):
    """Valv or the client library used FoundationDB wrongly: a bug to report."""


class FdbLimitExceededError(FdbError, LimitExceededError):
    """FoundationDB itself refused a size (Valv's own checks should have refused first)."""


class FdbClientMissingError(StorageError):
    """libfdb_c, the FoundationDB client library, is not installed or cannot be loaded."""


def error_for(code: int, *, what: str, during_commit: bool = False, attempts: int = 1,
              description: str | None = None) -> FdbError:
    """The StorageError to raise for FDB error ``code`` that ended ``what``.

    ``during_commit``: it came from commit(), so the outcome may be unknown.
    ``attempts``: how many times the body ran, for retryable errors that ran
    out of retries. ``description``: the client library's own text, if any.
    """
    info = classify(code)
    detail = f"FoundationDB error {info.name} ({code})"
    if description:
        detail += f" [{description}]"
    if during_commit and (info.maybe_committed or code in _UNKNOWN_IF_COMMITTING):
        return FdbCommitUnknownError(
            f"{what}: {detail} while committing: the transaction may or may not have been "
            f"committed ({info.hint}). It was not run again, because it may not be safe to "
            "apply twice; check the state (e.g. list the resource) before retrying", info)
    if info.kind is FdbErrorKind.LIMIT:
        return FdbLimitExceededError(f"{what}: {detail}: {info.hint}", info)
    if info.kind is FdbErrorKind.BUG:
        return FdbInternalError(
            f"{what}: {detail}: {info.hint}. This is a bug in Valv or in the FoundationDB "
            "client library; please report it", info)
    if info.retryable:
        return FdbUnavailableError(
            f"{what}: {detail}, still failing after {attempts} attempt(s): {info.hint}", info)
    if attempts > 1:
        detail += f" after {attempts} attempts"
    return FdbUnavailableError(f"{what}: {detail}: {info.hint}", info)


# ---- loading the bindings ---------------------------------------------------------

_bindings_lock = threading.Lock()


def load_bindings(api_version: int) -> Any:
    """The ``fdb`` module with ``api_version`` selected, loading libfdb_c if needed.

    FdbClientMissingError if libfdb_c cannot be loaded; StorageError if this
    process already selected another API version (FoundationDB allows one per
    process) or the library does not support this one.
    """
    with _bindings_lock:
        if fdb.is_api_version_selected():
            selected: int = fdb.get_api_version()
            if selected != api_version:
                raise StorageError(
                    f"this process already uses FoundationDB API version {selected}, and a "
                    f"process can use only one: every fdb: URL it opens must say "
                    f"api_version={selected} (asked for {api_version})"
                )
            return fdb
        try:
            # fdb.impl loads libfdb_c with ctypes when it is imported; its
            # failure is a missing or broken client library.
            importlib.import_module("fdb.impl")
        except Exception as exc:
            raise FdbClientMissingError(
                f"the FoundationDB client library (libfdb_c) is not installed or cannot be "
                f"loaded ({exc}). Install the FoundationDB client package of your cluster's "
                "version on this host: foundationdb-clients (.deb or .rpm) from "
                "https://github.com/apple/foundationdb/releases, which puts libfdb_c.so in "
                "/usr/lib, or the FoundationDB installer on macOS. Or run without FoundationDB "
                "on the embedded default store, a sqlite: URL (e.g. "
                "VALV_STORE=sqlite:///var/lib/valv/valv.db). See docs/foundationdb.md"
            ) from exc
        try:
            fdb.api_version(api_version)
        except Exception as exc:  # RuntimeError or FDBError, depending on the check
            raise StorageError(
                f"cannot use FoundationDB API version {api_version}: {exc}. Set api_version "
                "in the fdb: URL to one the installed client library supports (e.g. 710 for "
                "7.1, 730 for 7.3)"
            ) from exc
        return fdb


# ---- transactions -----------------------------------------------------------------


class _FdbOperationError(StorageError):
    """Internal: an FDB call failed inside a body; the runner lets on_error decide."""


class _FdbTransaction(Transaction):
    def __init__(self, tr: Any, codec: KeyCodec, bindings: Any, *, read_only: bool,
                 budget: TransactionBudget | None) -> None:
        self._tr = tr
        self._codec = codec
        self._fdb = bindings
        self._read_only = read_only
        self._budget = budget
        self._stamped = 0  # versionstamped writes so far: their order within the commit
        self._thread = threading.get_ident()
        self._open = True
        # The first FDB error this attempt hit. Set even if the body catches
        # it, so the runner retries instead of committing a broken attempt.
        self.failure: Exception | None = None

    def _check_usable(self) -> None:
        if not self._open:
            raise StorageError("transaction used after its body returned")
        if threading.get_ident() != self._thread:
            raise StorageError("transaction used from a thread other than its own")
        if self.failure is not None:
            raise _FdbOperationError(
                f"transaction used after FoundationDB error {self.failure}; it will be run again"
            ) from self.failure

    def _check_write(self, key: bytes) -> None:
        if self._read_only:
            raise ReadOnlyTransactionError(
                f"write to {keys.describe(key)} in a read-only transaction"
            )

    def _charge(self, nbytes: int, what: str) -> None:
        if self._budget is not None:
            self._budget.charge(nbytes, what)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        try:
            return fn()
        except self._fdb.FDBError as exc:
            self.failure = exc
            info = classify(exc.code)
            raise _FdbOperationError(
                f"FoundationDB error {info.name} ({exc.code}) {what}; the transaction will be "
                "run again if FoundationDB allows it"
            ) from exc

    # -- Transaction -------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        self._check_usable()
        stored = self._codec.pack(key)
        self._charge(read_cost(stored), f"reading {keys.describe(key)}")
        value: bytes | None = self._call(lambda: self._tr.get(stored).value,
                                         f"reading {keys.describe(key)}")
        return value

    def set(self, key: bytes, value: bytes) -> None:
        self._check_usable()
        stored = self._codec.pack(key)
        value = check_value(key, value)
        self._check_write(key)
        self._charge(set_cost(stored, value), f"writing {keys.describe(key)}")
        self._call(lambda: self._tr.set(stored, value), f"writing {keys.describe(key)}")

    @property
    def supports_versionstamps(self) -> bool:
        return True

    def set_versionstamped(self, prefix: bytes, value: bytes) -> None:
        self._check_usable()
        # The key as it will be, with a placeholder stamp: checked like any key.
        placeholder = keys.versionstamped_key(prefix, bytes(keys.STAMP_BYTES), self._stamped)
        stored = self._codec.pack(placeholder)
        value = check_value(placeholder, value)
        self._check_write(placeholder)
        self._charge(set_cost(stored, value), f"writing under {keys.describe(prefix)}")
        self._stamped += 1
        # FoundationDB overwrites the 10 bytes at the offset given in the last
        # four bytes (little-endian, API 520+) with the commit's versionstamp;
        # the two bytes after them (our call count) are kept.
        offset = len(stored) - keys.STAMP_BYTES - 2
        param = stored + offset.to_bytes(4, "little")
        self._call(lambda: self._tr.set_versionstamped_key(param, value),
                   f"writing under {keys.describe(prefix)}")

    def clear(self, key: bytes) -> None:
        self._check_usable()
        stored = self._codec.pack(key)
        self._check_write(key)
        self._charge(clear_cost(stored), f"clearing {keys.describe(key)}")
        self._call(lambda: self._tr.clear(stored), f"clearing {keys.describe(key)}")

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_usable()
        stored_begin, stored_end = self._codec.range(begin, end)
        if begin > end:
            raise StorageError(
                f"inverted range: begin {keys.describe(begin)} > end {keys.describe(end)}"
            )
        self._check_write(begin)
        what = f"clearing from {keys.describe(begin)} to {keys.describe(end)}"
        self._charge(clear_range_cost(stored_begin, stored_end), what)
        self._call(lambda: self._tr.clear_range(stored_begin, stored_end), what)

    def get_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[tuple[bytes, bytes]]:
        return self._read_range(begin, end, limit=limit, reverse=reverse, snapshot=False)

    def get_range_snapshot(
        self, begin: bytes, end: bytes, *, limit: int = 0
    ) -> list[tuple[bytes, bytes]]:
        return self._read_range(begin, end, limit=limit, reverse=False, snapshot=True)

    def _read_range(self, begin: bytes, end: bytes, *, limit: int, reverse: bool,
                    snapshot: bool) -> list[tuple[bytes, bytes]]:
        self._check_usable()
        stored_begin, stored_end = self._codec.range(begin, end)
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if begin >= end:
            return []  # empty or inverted: nothing to read, as with the sqlite backend
        what = f"reading from {keys.describe(begin)} to {keys.describe(end)}"
        self._charge(range_read_cost(stored_begin, stored_end), what)
        modes = self._fdb.StreamingMode
        # want_all: the caller takes the whole (bounded) range now; exact: a
        # limit was given, so ask for exactly that many in one batch.
        mode = modes.exact if limit else modes.want_all
        codec = self._codec

        # A snapshot read adds no read conflict range (Transaction.get_range_snapshot).
        source = self._tr.snapshot if snapshot else self._tr

        def read() -> list[tuple[bytes, bytes]]:
            result = source.get_range(stored_begin, stored_end, limit=limit, reverse=reverse,
                                      streaming_mode=mode)
            return [(codec.unpack(bytes(kv.key)), bytes(kv.value)) for kv in result]

        return self._call(read, what)

    # -- runner ------------------------------------------------------------

    def close(self) -> None:
        self._open = False

    def check_commit(self) -> None:
        if self._budget is not None:
            self._budget.check_commit()


# ---- the store ----------------------------------------------------------------------


def _resolve(future: asyncio.Future[int], code: int) -> None:
    """Event-loop side of a watch callback: 0 when the key changed, else an FDB error code."""
    if not future.done():
        future.set_result(code)


class FdbStore(Store):
    """A Store in a FoundationDB cluster, under one key prefix.

    Construction does no I/O. The first transaction (or ``open()``, which
    ``open_store`` calls to fail fast) loads libfdb_c, selects the API version
    and opens the database; ``open()`` also checks that the cluster answers.
    The FDB client allows one API version and one network thread per process,
    shared by every FdbStore; ``close()`` stops this store's workers and
    watches, not the network thread (the bindings stop it at exit).
    """

    def __init__(self, config: FdbConfig, *, url: str | None = None,
                 max_workers: int = 16) -> None:
        self._config = config
        self._codec = KeyCodec(config.prefix)
        self._url = url or config.to_url()
        self._executor = ThreadPoolExecutor(max_workers=max_workers,
                                            thread_name_prefix="valv-fdb")
        self._lock = threading.Lock()
        self._fdb: Any = None
        self._db: Any = None
        self._closed = False
        # Pending FDB watch futures, cancelled by close(). Event-loop thread only.
        self._watches: set[Any] = set()
        where = config.cluster_file or "the default cluster file"
        self._where = f"FoundationDB cluster in {where} (prefix {config.prefix!r})"

    @property
    def url(self) -> str:
        return self._url

    @property
    def config(self) -> FdbConfig:
        return self._config

    @property
    def codec(self) -> KeyCodec:
        return self._codec

    @property
    def max_key_bytes(self) -> int:
        """The longest logical key this store accepts (the prefix takes the rest)."""
        return self._codec.max_key_bytes

    # -- Store -------------------------------------------------------------

    async def open(self) -> None:
        """Load the client library, open the database and check the cluster answers."""
        await self._call(self._probe_sync)

    async def run(self, body: Callable[[Transaction], T], *, read_only: bool = False) -> T:
        # As with the sqlite backend, a cancelled caller does not stop a body
        # that is already running in its worker: it runs to its end and may
        # commit. Work that must happen whatever becomes of the caller is
        # shielded by the callers (KeyStore._change, the audit writes).
        return await self._call(self._run_sync, body, read_only)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches):
            watch.cancel()  # non-blocking; the callback then reports operation_cancelled
        self._watches.clear()
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def supports_versionstamps(self) -> bool:
        return True

    @property
    def supports_watches(self) -> bool:
        return True

    async def wait_for_change(self, key: bytes, timeout_s: float, *,
                              armed: asyncio.Event | None = None) -> bool:
        """See Store.wait_for_change: an FDB watch on ``key``.

        The watch is set by a read-only transaction committed in a worker
        thread (committing is what registers it with the cluster). Its future
        is completed by the FDB network thread, which hands the result to the
        event loop with ``call_soon_threadsafe``; nothing blocks on it. The
        watch is cancelled on timeout, cancellation or close(), since a
        watch outlives its transaction.
        """
        if timeout_s <= 0:
            return False
        stored = self._codec.pack(key)
        loop = asyncio.get_running_loop()
        changed: asyncio.Future[int] = loop.create_future()
        arming = self._submit(self._arm_watch_sync, stored, key, loop, changed)
        try:
            watch = await asyncio.shield(arming)
        except asyncio.CancelledError:
            # The worker still sets the watch: cancel it once it is set.
            arming.add_done_callback(_cancel_armed_watch)
            raise
        if self._closed:
            watch.cancel()
            raise StorageError(f"store {self._url} is closed")
        self._watches.add(watch)
        if armed is not None:
            armed.set()
        try:
            code = await asyncio.wait_for(changed, timeout_s)
        except TimeoutError:
            return False
        finally:
            if not changed.done() or changed.cancelled():
                watch.cancel()
            self._watches.discard(watch)
        if code:
            raise error_for(code, what=f"watch on {keys.describe(key)} in {self._where}")
        return True

    # -- internals ---------------------------------------------------------

    def _submit(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        if self._closed:
            raise StorageError(f"store {self._url} is closed")
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # executor shut down between the check and here
            raise StorageError(f"store {self._url} is closed") from exc

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        return await self._submit(fn, *args)

    def _database(self) -> tuple[Any, Any]:
        """``(fdb module, Database)``, opening them on first use. Worker threads only."""
        with self._lock:
            if self._db is None:
                bindings = load_bindings(self._config.api_version)
                try:
                    # Reads the cluster file and starts the client's network
                    # thread the first time; does not contact the cluster.
                    self._db = bindings.open(self._config.cluster_file)
                except bindings.FDBError as exc:
                    raise error_for(exc.code, what=f"opening the {self._where}",
                                    description=_description(exc)) from exc
                self._fdb = bindings
            return self._fdb, self._db

    def _create_transaction(self, db: Any, what: str) -> Any:
        try:
            return db.create_transaction()
        except self._fdb.FDBError as exc:
            raise error_for(exc.code, what=what, description=_description(exc)) from exc

    def _set_options(self, tr: Any, *, read_only: bool, what: str) -> None:
        # Set on every attempt, which FoundationDB documents as safe: timeout
        # and retry limit survive on_error (API 610+), and the timeout is
        # measured from the transaction's creation, so it still bounds all
        # attempts together; other options are reset by on_error.
        try:
            tr.options.set_timeout(self._config.timeout_ms)
            tr.options.set_retry_limit(self._config.retry_limit)
            if not read_only and self._config.automatic_idempotency:
                tr.options.set_automatic_idempotency()
        except self._fdb.FDBError as exc:  # e.g. invalid_option: not a retryable state
            raise error_for(exc.code, what=what, description=_description(exc)) from exc

    def _on_error(self, tr: Any, exc: Any, *, what: str, attempts: int,
                  during_commit: bool) -> None:
        """Return after FDB's backoff if ``exc`` may be retried; raise the final error if not."""
        bindings = self._fdb
        info = classify(exc.code)
        if during_commit and (info.maybe_committed or exc.code in _UNKNOWN_IF_COMMITTING):
            # Not run again: a rerun would apply the changes a second time.
            raise error_for(exc.code, what=what, during_commit=True,
                            description=_description(exc)) from exc
        try:
            tr.on_error(exc).wait()
        except bindings.FDBError as final:
            # Not retryable, or retry_limit / timeout_ms ran out.
            raise error_for(final.code, what=what, attempts=attempts,
                            during_commit=during_commit and final.code == exc.code,
                            description=_description(final)) from final

    def _run_sync(self, body: Callable[[Transaction], T], read_only: bool) -> T:
        bindings, db = self._database()
        what = f"{'read-only ' if read_only else ''}transaction on the {self._where}"
        tr = self._create_transaction(db, what)
        attempts = 0
        while True:
            attempts += 1
            self._set_options(tr, read_only=read_only, what=what)
            tx = _FdbTransaction(tr, self._codec, bindings, read_only=read_only,
                                 budget=None if read_only else TransactionBudget())
            during_commit = False
            try:
                try:
                    result = body(tx)
                finally:
                    tx.close()
                failure = tx.failure
                if failure is None:
                    tx.check_commit()
                    if read_only:
                        return result  # nothing to commit, and nothing is
                    during_commit = True
                    tr.commit().wait()
                    return result
            except bindings.FDBError as exc:  # from commit()
                failure = exc
            except Exception:
                if tx.failure is None:
                    raise
                # The body failed because of the FDB error (it propagated or
                # wrapped it): FDB decides whether to run it again.
                failure = tx.failure
            self._on_error(tr, failure, what=what, attempts=attempts,
                           during_commit=during_commit)

    def _probe_sync(self) -> None:
        _, db = self._database()
        what = f"connecting to the {self._where}"
        tr = self._create_transaction(db, what)
        attempts = 0
        while True:
            attempts += 1
            self._set_options(tr, read_only=True, what=what)
            try:
                # The cheapest request that needs a working cluster.
                tr.get_read_version().wait()
                return
            except self._fdb.FDBError as exc:
                self._on_error(tr, exc, what=what, attempts=attempts, during_commit=False)

    def _arm_watch_sync(self, stored: bytes, key: bytes, loop: asyncio.AbstractEventLoop,
                        changed: asyncio.Future[int]) -> Any:
        bindings, db = self._database()
        what = f"setting a watch on {keys.describe(key)} in the {self._where}"
        tr = self._create_transaction(db, what)
        attempts = 0
        while True:
            attempts += 1
            self._set_options(tr, read_only=True, what=what)
            watch = tr.watch(stored)
            try:
                # Registers the watch; the value it compares against is the
                # one at this transaction's read version.
                tr.commit().wait()
                break
            except bindings.FDBError as exc:
                watch.cancel()  # it carries the same error; not wanted
                self._on_error(tr, exc, what=what, attempts=attempts, during_commit=False)

        def on_ready(future: Any) -> None:
            # Runs on the FDB network thread (or here, if already ready): never block.
            try:
                future.wait()  # ready: returns at once, or raises the watch's error
                code = 0
            except bindings.FDBError as exc:
                code = exc.code
            except Exception:
                code = 4000  # unknown_error: nothing else should come out of wait()
            try:
                loop.call_soon_threadsafe(_resolve, changed, code)
            except RuntimeError:
                pass  # the event loop is closed: nobody is waiting any more

        watch.on_ready(on_ready)
        # Dropping the committed transaction does not cancel its watch.
        return watch


def _cancel_armed_watch(arming: asyncio.Future[Any]) -> None:
    if not arming.cancelled() and arming.exception() is None:
        arming.result().cancel()


def _description(exc: Any) -> str | None:
    try:
        text = exc.description
    except Exception:
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text) if text else None
