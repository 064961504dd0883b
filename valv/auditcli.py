"""`valv audit verify | tail | query`: read the audit log of a store.

They never write: a store whose log was never created (central not started
yet) is simply empty to them, and verify reports a log that was deleted.
They take the same store and root-key flags as `valv fsck`, read the log a
chunk at a time (each chunk its own read-only transaction, so they never load
the whole log and are safe to run while central serves), and print JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from valv.settings import parse_duration

_ERRORS = "valv audit"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from valv.cli import _add_store_flags

    p = sub.add_parser(
        "audit", help="verify and read the audit log",
        description="Verify the audit log's hash chain, or print its records as JSON lines. "
                    "Safe to run while central serves.")
    commands = p.add_subparsers(dest="audit_command", required=True)

    verify = commands.add_parser(
        "verify", help="check that no record was deleted, edited, reordered or truncated",
        description="Check the whole hash chain, the sealed head and the genesis marker (so "
                    "a log deleted as a whole is reported too). Exits 0 if the log is "
                    "intact, 1 with one line per problem if not, 2 if the store can't be "
                    "opened. A rollback of the whole store is only caught with --anchor.")
    _add_store_flags(verify)
    verify.add_argument("--anchor", action="append", default=[], metavar="SEQ:HASH",
                        help="a record hash noted earlier (e.g. from a previous verify's "
                             "output): it must still be there, unchanged. Repeatable")
    verify.add_argument("--json", action="store_true", help="print the report as one JSON "
                                                            "object")
    verify.set_defaults(func=_run_verify)

    tail = commands.add_parser("tail", help="print the last records as JSON lines")
    _add_store_flags(tail)
    tail.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                      help="how many records (default 10)")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="keep printing records as they are appended (Ctrl-C stops)")
    tail.add_argument("--interval", type=float, default=1.0, help=argparse.SUPPRESS)
    tail.set_defaults(func=_run_tail)

    query = commands.add_parser(
        "query", help="print the records that match as JSON lines",
        description="Print matching records, oldest first. Times are ISO 8601 (UTC unless "
                    "an offset is given) or a duration back from now (30m, 12h, 7d).")
    _add_store_flags(query)
    query.add_argument("--principal", help="exact principal, e.g. user:alice@example.com")
    query.add_argument("--resource", help="a resource name: matches it and everything under "
                                          "it (a KeyRing matches its keys and versions)")
    query.add_argument("--since", help="records at or after this time")
    query.add_argument("--until", help="records before this time")
    query.add_argument("--result", help="OK, DENIED (UNAUTHENTICATED or PERMISSION_DENIED), "
                                        "FAILED (anything but OK), or a status name such as "
                                        "FAILED_PRECONDITION")
    query.add_argument("--rpc", help="the RPC, e.g. DestroyCryptoKeyVersion")
    query.add_argument("--reported", action="store_true",
                       help="only Encrypt/Decrypt counts reported by sidecars (ReportUsage); "
                            "their records show \"reported_by\": \"sidecar\"")
    query.add_argument("--limit", type=int, default=0, help="stop after N records")
    query.set_defaults(func=_run_query)


def parse_time(text: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (naive means UTC), or a duration back from ``now``."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            delta = parse_duration(text)
        except argparse.ArgumentTypeError:
            delta = None
        if delta is None:
            raise ValueError(f"{text!r} is not a time: use ISO 8601 (2030-01-01T12:00:00Z) "
                             "or a duration back from now (30m, 12h, 7d)") from None
        return (now or datetime.now(UTC)) - delta
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _with_log(args: argparse.Namespace, what: str,
              work: Callable[[Any], Awaitable[int]]) -> int:
    """Open the store read-only from the flags, run ``work(audit_log)``; exit codes."""
    from valv.central.server import open_sealed_store
    from valv.cli import _store_config
    from valv.core.audit import AuditLog
    from valv.core.clock import SystemClock
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.errors import ValvError
    from valv.core.storage.base import StorageError

    config = _store_config(args)

    async def run() -> int:
        store = await open_sealed_store(config, create_dev_key=False)
        try:
            return await work(AuditLog(store, SystemClock()))
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except (RootKeyConfigError, StorageError, OSError, ValvError) as exc:
        print(f"{_ERRORS} {what}: error: {exc}", file=sys.stderr)
        return 2


def _print(record: Any) -> None:
    from valv.core.audit import record_to_json

    print(json.dumps(record_to_json(record), sort_keys=False), flush=True)


def _run_verify(args: argparse.Namespace) -> int:
    anchors: dict[int, bytes] = {}
    for text in args.anchor:
        seq, _, digest = text.partition(":")
        try:
            anchors[int(seq)] = bytes.fromhex(digest)
        except ValueError:
            print(f"{_ERRORS} verify: error: --anchor {text!r} is not SEQ:HEX", file=sys.stderr)
            return 2

    async def work(audit_log: Any) -> int:
        def progress(n: int) -> None:
            print(f"... {n} records checked", file=sys.stderr, flush=True)

        from valv.core.clock import from_micros

        report = await audit_log.verify(anchors=anchors, progress=progress)
        head, genesis = report.head, report.genesis
        if args.json:
            created = (from_micros(genesis.created_us).isoformat().replace("+00:00", "Z")
                       if genesis else None)
            print(json.dumps({"ok": report.ok, "records_checked": report.checked,
                              "head_seq": head.seq if head else None,
                              "head_hash": head.hash.hex() if head else None,
                              "log_created": created,
                              "problems": report.problems}))
        else:
            for problem in report.problems:
                print(f"PROBLEM: {problem}")
            where = f"head seq {head.seq} hash {head.hash.hex()}" if head else "no head"
            if report.ok:
                print(f"audit log intact: {report.checked} records verified; {where}")
            else:
                print(f"audit log NOT intact: {len(report.problems)} problem(s); "
                      f"{report.checked} records verified; {where}")
        return 0 if report.ok else 1

    return _with_log(args, "verify", work)


def _run_tail(args: argparse.Namespace) -> int:
    if args.lines < 0:
        print(f"{_ERRORS} tail: error: -n must be 0 or more", file=sys.stderr)
        return 2

    async def work(audit_log: Any) -> int:
        records = await audit_log.last(args.lines)
        for record in records:
            _print(record)
        if not args.follow:
            return 0
        head = await audit_log.head()
        seen = head.seq if head is not None else 0
        while True:
            await asyncio.sleep(args.interval)
            head = await audit_log.head()
            if head is None or head.seq <= seen:
                continue
            async for record in audit_log.records(seen + 1, head.seq):
                _print(record)
            seen = head.seq

    try:
        return _with_log(args, "tail", work)
    except KeyboardInterrupt:
        return 0


def _run_query(args: argparse.Namespace) -> int:
    from valv.core.audit import Query

    try:
        now = datetime.now(UTC)
        q = Query(principal=args.principal, resource=args.resource,
                  since=parse_time(args.since, now=now) if args.since else None,
                  until=parse_time(args.until, now=now) if args.until else None,
                  result=args.result, rpc=args.rpc,
                  reported=True if args.reported else None)
    except ValueError as exc:
        print(f"{_ERRORS} query: error: {exc}", file=sys.stderr)
        return 2

    async def work(audit_log: Any) -> int:
        printed = bad = 0
        expected = 1
        async for item in audit_log.items():
            if item.seq > expected:
                bad += 1
                gap = (f"record {expected} is" if item.seq == expected + 1
                       else f"records {expected}..{item.seq - 1} are")
                print(f"{_ERRORS} query: {gap} missing", file=sys.stderr)
            expected = max(expected, item.seq + 1)
            if item.record is None:
                bad += 1
                print(f"{_ERRORS} query: record {item.seq} skipped: {item.problem}",
                      file=sys.stderr)
                continue
            if q.matches(item.record):
                _print(item.record)
                printed += 1
                if args.limit and printed >= args.limit:
                    break
        if bad:
            print(f"{_ERRORS} query: {bad} record(s) failed verification; run "
                  "`valv audit verify`", file=sys.stderr)
        return 1 if bad else 0

    return _with_log(args, "query", work)
