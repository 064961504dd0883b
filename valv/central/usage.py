"""valv.sidecar.v1.KeyMaterial/ReportUsage: a sidecar's Encrypt/Decrypt counts, audited.

A sidecar answers Encrypt and Decrypt from cached key material and reports
how often, per version x RPC x status x minute. Central checks every entry
(``check_usage``) and records them all, or none: one bad entry is
INVALID_ARGUMENT naming its index and field, and nothing is recorded.

Checked per entry: ``rpc`` is "Encrypt" or "Decrypt"; ``crypto_key_version``
is a CryptoKeyVersion name (it need not exist any more: it may have been
destroyed since); ``status`` is a gRPC status code name ("OK",
"INVALID_ARGUMENT"...); ``window_start_us`` starts on a minute, no more than
24 h before and 5 min after central's clock; 1 <= ``count`` <= MAX_COUNT. At
most MAX_COUNTS entries per request.

Recorded (CentralAuditor.record_reported) as DATA_ACCESS_AGGREGATE records
through the data-access aggregator, with principal = the caller (the sidecar's
identity), marked ``"reported_by": "sidecar"`` (valv.core.audit). With
``--audit-data-access off`` the counts are accepted and dropped, like central's
own data access. A count is in the log once it is flushed (every
``--audit-flush-interval``, and at shutdown), exactly once; a central that
crashes before that loses it, as it loses its own unflushed counts.

The call needs no permission on the keys (any authenticated caller may
report, and only under its own name); the call itself is not recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from grpclib.const import Status

from valv._proto.valv.sidecar import v1 as sidecar_v1
from valv.core.audit import WINDOW
from valv.core.clock import Clock, to_micros
from valv.core.errors import InvalidArgument
from valv.core.names import parse_crypto_key_version

RPCS = frozenset({"Encrypt", "Decrypt"})
STATUSES = frozenset(status.name for status in Status)
MAX_COUNTS = 10_000
# Uses of one version by one RPC with one outcome in one minute, per entry:
# far beyond what one sidecar serves (~17 million a second).
MAX_COUNT = 1_000_000_000
MAX_AGE = timedelta(hours=24)
MAX_AHEAD = timedelta(minutes=5)
_WINDOW_US = WINDOW // timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class ReportedUse:
    """One checked entry."""

    rpc: str
    resource: str  # the CryptoKey
    target: str  # the CryptoKeyVersion
    status: str
    window_start_us: int
    count: int


def check_usage(counts: Sequence[sidecar_v1.UsageCount], clock: Clock) -> list[ReportedUse]:
    """Every entry, checked; InvalidArgument naming the first bad one's index and field."""
    if len(counts) > MAX_COUNTS:
        raise InvalidArgument(
            f"counts has {len(counts)} entries; at most {MAX_COUNTS} per request")
    now_us = to_micros(clock.now())
    earliest = now_us - MAX_AGE // timedelta(microseconds=1)
    latest = now_us + MAX_AHEAD // timedelta(microseconds=1)
    checked: list[ReportedUse] = []
    for index, entry in enumerate(counts):
        where = f"counts[{index}]"
        if entry.rpc not in RPCS:
            raise InvalidArgument(f"{where}.rpc {entry.rpc!r} is not Encrypt or Decrypt")
        field = f"{where}.crypto_key_version"
        version = parse_crypto_key_version(entry.crypto_key_version, field)
        if entry.status not in STATUSES:
            raise InvalidArgument(
                f"{where}.status {entry.status!r} is not a gRPC status code name such as OK "
                "or INVALID_ARGUMENT")
        start = entry.window_start_us
        if start % _WINDOW_US:
            raise InvalidArgument(
                f"{where}.window_start_us {start} does not start on a minute")
        if not earliest <= start <= latest:
            raise InvalidArgument(
                f"{where}.window_start_us {start} is not within 24 hours before and 5 minutes "
                f"after central's clock ({now_us})")
        if not 1 <= entry.count <= MAX_COUNT:
            raise InvalidArgument(
                f"{where}.count {entry.count} is not between 1 and {MAX_COUNT}")
        checked.append(ReportedUse(rpc=entry.rpc, resource=str(version.parent),
                                   target=str(version), status=entry.status,
                                   window_start_us=start, count=entry.count))
    return checked
