"""``valv backup``, ``valv backup verify`` and ``valv restore`` (valv.core.backup)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from valv.settings import parse_duration

if TYPE_CHECKING:
    from valv.central.server import CentralConfig
    from valv.core.backup.dump import DumpProgress
    from valv.core.backup.restore import RestorePlan, RestoreProgress


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from valv.cli import _add_store_flags

    p = sub.add_parser(
        "backup", help="back up the whole store (consistent, online, still sealed)",
        description="Write a consistent logical dump of the whole store while central keeps "
                    "serving. Records stay sealed, so a stolen backup holds no usable key; "
                    "restoring it needs the same root keys. `valv backup verify FILE|DIR` "
                    "checks a backup without restoring it.")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--out", metavar="FILE|-",
                        help="write one full backup to FILE (written under a temporary name, "
                             "moved into place when complete) or to stdout (-)")
    target.add_argument("--follow", metavar="DIR",
                        help="active backup: a base backup into DIR, then every --interval a "
                             "segment with what changed, until stopped (SIGTERM/Ctrl-C)")
    p.add_argument("--interval", type=_positive_duration, default=1.0,
                   help="with --follow: how often to write a segment (default 1s)")
    p.add_argument("--keep-generations", type=int, default=2,
                   help="with --follow: base backups (with their segments) to keep (default 2)")
    p.add_argument("--chunk", type=int, default=None,
                   help="pairs per read transaction of the scan (default 500)")
    _add_store_flags(p)
    p.set_defaults(func=_run_backup)
    commands = p.add_subparsers(dest="backup_command")
    verify = commands.add_parser(
        "verify", help="check a backup file or an active backup directory",
        description="Read a backup through and check everything: format version, "
                    "compression, structure, the SHA-256 and counts in its manifest; for a "
                    "directory, that its segments chain. Prints a JSON summary; exits 1 if "
                    "the backup is bad, naming what is wrong.")
    verify.add_argument("path", metavar="FILE|DIR")
    verify.add_argument("--until", help="for a directory: the restore point to check, as for "
                                        "valv restore")
    verify.set_defaults(func=_run_verify)

    r = sub.add_parser(
        "restore", help="restore a backup into a store (any backend)",
        description="Restore a backup file, stdin, or an active backup directory into the "
                    "configured store. Everything is checked before anything is written; "
                    "writes go in bounded transactions and an interrupted restore resumes "
                    "when run again. Refuses a non-empty store unless --force.")
    r.add_argument("--in", dest="source", required=True, metavar="FILE|-|DIR",
                   help="a backup file, - for stdin, or a `valv backup --follow` directory")
    r.add_argument("--force", action="store_true",
                   help="clear the target store first if it is not empty (its contents are "
                        "lost)")
    r.add_argument("--until", help="for a directory: restore up to this segment number, or "
                                   "to the last segment read at or before this ISO 8601 time")
    r.add_argument("--no-root-key-check", action="store_true",
                   help="restore even if the root keys the backup needs are not configured "
                        "for the target")
    _add_store_flags(r)
    r.set_defaults(func=_run_restore)


def _positive_duration(text: str) -> float:
    delta = parse_duration(text)
    if delta is None or delta.total_seconds() <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the interval must be a positive duration")
    return delta.total_seconds()


class _Progress:
    """One updating line on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, what: str, stream: IO[str] | None = None) -> None:
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._what = what
        self._last = 0.0

    def show(self, text: str, final: bool = False) -> None:
        if not self._tty:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.1:
            return
        self._last = now
        self._stream.write(f"\r{self._what}: {text}\x1b[K" + ("\n" if final else ""))
        self._stream.flush()

    def dump(self, state: DumpProgress) -> None:
        self.show(f"{state.records} records scanned, {state.replayed} replayed, "
                  f"{state.bytes / 1e6:.1f} MB", final=state.done)

    def restore(self, state: RestoreProgress) -> None:
        self.show(f"{state.records} records written in {state.batches} transactions",
                  final=state.done)


def _error(command: str, message: object) -> int:
    print(f"valv {command}: error: {message}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> CentralConfig:
    from valv.cli import _store_config

    return _store_config(args)


def _run_backup(args: argparse.Namespace) -> int:
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.storage.base import StorageError

    if args.out is None and args.follow is None:
        return _error("backup", "say where: --out FILE (or - for stdout), --follow DIR, or "
                                "`valv backup verify FILE`")
    if args.chunk is not None and args.chunk < 1:
        return _error("backup", "--chunk must be at least 1")
    if args.keep_generations < 1:
        return _error("backup", "--keep-generations must be at least 1")
    if args.out == "-" and sys.stdout.isatty():
        return _error("backup", "refusing to write a binary backup to a terminal; redirect "
                                "stdout (valv backup --out - > valv.vbk)")
    try:
        config = _config(args)
        if args.follow is not None:
            return asyncio.run(_follow(config, Path(args.follow), args))
        return asyncio.run(_backup_once(config, args.out, args.chunk))
    except (RootKeyConfigError, StorageError, OSError, ValueError) as exc:
        return _error("backup", exc)


@contextlib.contextmanager
def _output(out: str) -> Iterator[BinaryIO]:
    """stdout, or FILE written under a temporary name and moved into place if all went well."""
    if out == "-":
        yield sys.stdout.buffer
        return
    from valv.core.backup.follow import AtomicFile

    target = AtomicFile(Path(out))
    try:
        yield target.stream
    except BaseException:
        target.abort()
        raise
    target.commit()


async def _backup_once(config: CentralConfig, out: str, chunk: int | None) -> int:
    from valv.central.server import open_sealed_store
    from valv.core.backup.dump import dump
    from valv.core.backup.format import BackupWriter

    store = await open_sealed_store(config, create_dev_key=False)
    progress = _Progress("backup")
    try:
        with _output(out) as stream:
            kwargs: dict[str, Any] = {} if chunk is None else {"chunk": chunk}
            result = await dump(store, BackupWriter(stream), progress=progress.dump, **kwargs)
    finally:
        await store.close()
        store.sealer.forget()
    manifest = result.manifest
    where = "stdout" if out == "-" else out
    print(f"backup: {manifest['records']} records, consistent at journal seq "
          f"{manifest['journal_seq']}, root keys needed: {', '.join(manifest['rmk_ids']) or '-'}"
          f" -> {where}", file=sys.stderr)
    return 0


async def _follow(config: CentralConfig, directory: Path, args: argparse.Namespace) -> int:
    from valv.central.server import open_sealed_store
    from valv.core.backup.follow import ActiveBackup, Written

    store = await open_sealed_store(config, create_dev_key=False)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def wrote(written: Written) -> None:
        manifest = written.manifest
        print(json.dumps({"file": str(written.path), "kind": written.kind,
                          "journal_seq": manifest.get("journal_seq"),
                          "records": manifest.get("records"),
                          "read_at": manifest.get("read_at")}), flush=True)

    follower = ActiveBackup(store, directory, interval_s=args.interval,
                            keep_generations=args.keep_generations, chunk=args.chunk,
                            on_write=wrote, progress=_Progress("backup base").dump)
    try:
        await follower.run(stop)
    finally:
        await store.close()
        store.sealer.forget()
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from valv.core.backup.format import BackupFormatError
    from valv.core.backup.restore import RestoreError, plan_directory, plan_file

    path = args.path
    try:
        if os.path.isdir(path):
            plan = plan_directory(path, args.until)
        else:
            if args.until is not None:
                return _error("backup verify", "--until applies to a directory only")
            plan = plan_file(path) if _is_full(path) else _segment_plan(path)
    except (BackupFormatError, RestoreError) as exc:
        print(f"valv backup verify: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(_describe(plan), indent=2))
    print(f"valv backup verify: {path} is good: {plan.records} records in "
          f"{len(plan.sources)} file(s)", file=sys.stderr)
    return 0


def _is_full(path: str) -> bool:
    from valv.core.backup.format import BackupFormatError, BackupReader

    try:
        with open(path, "rb") as stream:
            reader = BackupReader(stream, path)
            next(iter(reader.frames()), None)
            return reader.header.get("kind") == "full"
    except (OSError, BackupFormatError):
        return True  # let the full check report it


def _segment_plan(path: str) -> RestorePlan:
    from valv.core.backup.restore import RestorePlan, Source, check_file

    return RestorePlan([Source(path, check_file(path))])


def _describe(plan: RestorePlan) -> dict[str, Any]:
    files = []
    for source in plan.sources:
        manifest = source.summary.manifest
        files.append({key: manifest.get(key) for key in (
            "kind", "source", "schema_version", "created_at", "finished_at", "generation",
            "segment", "read_at", "from_seq", "journal_seq", "complete", "records", "clears",
            "rmk_ids", "body_sha256") if key in manifest} | {
            "file": source.path, "compressed_bytes": source.summary.compressed_bytes})
    return {"files": files, "records": plan.records, "journal_seq": plan.journal_seq,
            "rmk_ids": plan.rmk_ids, "skipped": plan.skipped_segments}


def _run_restore(args: argparse.Namespace) -> int:
    from valv.core.backup.format import BackupFormatError
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.storage.base import StorageError

    try:
        config = _config(args)
        return asyncio.run(_restore(config, args))
    except BackupFormatError as exc:
        print(f"valv restore: {exc}; nothing was written", file=sys.stderr)
        return 1
    except (RootKeyConfigError, StorageError, OSError, ValueError) as exc:
        return _error("restore", exc)


async def _restore(config: CentralConfig, args: argparse.Namespace) -> int:
    from valv.core.backup.restore import RestoreError, plan_directory, plan_file, restore
    from valv.core.storage import open_store

    with _spooled(args.source, config) as source:
        try:
            if os.path.isdir(source):
                plan = plan_directory(source, args.until)
            else:
                if args.until is not None:
                    return _error("restore", "--until applies to a directory only")
                plan = plan_file(source)
        except RestoreError as exc:  # a bad file or directory, found before any write
            print(f"valv restore: {exc}; nothing was written", file=sys.stderr)
            return 1
        for skipped in plan.skipped_segments:
            print(f"valv restore: not applying {skipped}", file=sys.stderr)
        if not args.no_root_key_check:
            problem = _missing_root_keys(config, plan.rmk_ids)
            if problem:
                return _error("restore", problem)
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = await open_store(config.effective_store_url)
        progress = _Progress("restore")
        try:
            state = await restore(target, plan, force=args.force, progress=progress.restore)
        finally:
            await target.close()
    resumed = (f" (resumed at file {state.resumed_from[0] + 1}, frame {state.resumed_from[1]})"
               if state.resumed_from else "")
    print(f"restore: {plan.records} records from {len(plan.sources)} file(s) into "
          f"{target.url}, as of journal seq {plan.journal_seq}{resumed}", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _spooled(source: str, config: CentralConfig) -> Iterator[str]:
    """A path to read ``source`` from: stdin is copied to a private temporary file first,
    because nothing may be written before the whole backup is checked."""
    if source != "-":
        yield source
        return
    fd, path = tempfile.mkstemp(prefix=".valv-restore-", suffix=".vbk")
    try:
        with os.fdopen(fd, "wb") as spool:
            while chunk := sys.stdin.buffer.read(1 << 20):
                spool.write(chunk)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _missing_root_keys(config: CentralConfig, needed: list[str]) -> str | None:
    """Why the target could not open what the backup holds, or None."""
    from valv.central.server import load_root_keys
    from valv.core.crypto.errors import RootKeyConfigError

    try:
        keyring = load_root_keys(config, create_dev_key=False)
    except (RootKeyConfigError, OSError) as exc:
        return (f"the backup is sealed under root key(s) {', '.join(needed)}, and no root key "
                f"is configured for the target ({exc}). Configure the same root keys as the "
                "source (--master-key-file / VALV_MASTER_KEY_FILE, VALV_MASTER_KEY or "
                "PKCS#11), or pass --no-root-key-check to restore anyway")
    try:
        missing = [rmk_id for rmk_id in needed if rmk_id != "?" and rmk_id not in keyring]
        have = ", ".join(keyring.ids)
    finally:
        keyring.zeroize()
    if missing:
        return (f"the backup needs root key(s) {', '.join(missing)}, which the target's "
                f"configuration does not have (it has {have}). Configure "
                "them, or pass --no-root-key-check to restore anyway")
    return None
