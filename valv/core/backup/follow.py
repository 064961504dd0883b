"""Active backup: a base backup, then the write journal tailed into segments.

``valv backup --follow DIR`` writes into DIR:

    g000001-base.vbk        a full backup (valv.core.backup.dump)
    g000001-s000001.vbk     every range written since, as of one read
    g000001-s000002.vbk     ...

Every ``interval`` it reads the journal after the last seq it wrote and, in
the same read-only transaction, the ranges those entries list, and writes
them as the next segment. Nothing is written when nothing changed. Each file
is written to a temporary name, fsynced, renamed into place and the
directory fsynced, so a file under its final name is complete; a crash
leaves at most a ``.tmp`` file, which is ignored.

Recovery point: a write acknowledged before a segment's ``read_at`` (in its
header) is in that segment or an earlier file. With the default 1 s
interval, a lost store loses at most about the last second of writes, plus
the time the segment took to write.

When the follower falls so far behind that the journal was trimmed past its
position (it was stopped for longer than the journal's retention, one
hour), it starts a new generation with a new base backup. Older generations
beyond ``keep_generations`` are removed once the new base is in place.

Restore (valv.core.backup.restore.plan_directory) takes the newest
generation's base and its segments in order, optionally up to a segment
number or a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valv.core.backup.dump import (
    DumpProgress,
    ReplayRound,
    dump,
    now_iso,
    replay_body,
    source_name,
    wall_time,
    write_round,
)
from valv.core.backup.format import KIND_SEGMENT, BackupWriter
from valv.core.backup.restore import BASE_NAME, SEGMENT_NAME, base_file_name, segment_file_name
from valv.core.records import SCHEMA_VERSION
from valv.core.storage import journal
from valv.core.storage.sealed import SealedStore

log = logging.getLogger("valv.backup")

DEFAULT_INTERVAL_S = 1.0
DEFAULT_KEEP_GENERATIONS = 2


@dataclass(frozen=True, slots=True)
class Written:
    """A file the follower put in place."""

    path: Path
    kind: str
    manifest: dict[str, Any]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file written under a temporary name and moved into place only when complete."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.stream = open(self.tmp, "wb")  # closed by commit() or abort()

    def commit(self) -> None:
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.stream.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class ActiveBackup:
    """Follows ``store``'s write journal into ``directory``."""

    def __init__(self, store: SealedStore, directory: Path, *,
                 interval_s: float = DEFAULT_INTERVAL_S,
                 keep_generations: int = DEFAULT_KEEP_GENERATIONS,
                 chunk: int | None = None,
                 on_write: Callable[[Written], None] | None = None,
                 progress: Callable[[DumpProgress], None] | None = None) -> None:
        if interval_s <= 0:
            raise ValueError("the interval must be positive")
        if keep_generations < 1:
            raise ValueError("keep at least one generation")
        self.store = store
        self.directory = directory
        self.interval_s = interval_s
        self.keep_generations = keep_generations
        self.chunk = chunk
        self.on_write = on_write
        self.progress = progress
        self.generation = 0
        self.segment = 0
        self.seen = 0

    def _existing_generations(self) -> list[int]:
        found = set()
        for name in os.listdir(self.directory):
            match = BASE_NAME.match(name) or SEGMENT_NAME.match(name)
            if match:
                found.add(int(match.group(1)))
        return sorted(found)

    async def _base(self) -> None:
        generations = self._existing_generations()
        self.generation = (generations[-1] if generations else 0) + 1
        self.segment = 0
        target = AtomicFile(self.directory / base_file_name(self.generation))
        try:
            kwargs: dict[str, Any] = {} if self.chunk is None else {"chunk": self.chunk}
            result = await dump(self.store, BackupWriter(target.stream), progress=self.progress,
                                extra_header={"generation": self.generation}, **kwargs)
            target.commit()
        except BaseException:
            target.abort()
            raise
        self.seen = result.journal_seq
        self._wrote(Written(target.path, "base", result.manifest))
        self._prune()

    def _prune(self) -> None:
        keep = set(self._existing_generations()[-self.keep_generations:])
        for name in os.listdir(self.directory):
            match = BASE_NAME.match(name) or SEGMENT_NAME.match(name)
            if match and int(match.group(1)) not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.directory / name)

    def _wrote(self, written: Written) -> None:
        log.info("backup file written", extra={"fields": {
            "file": str(written.path), "kind": written.kind,
            "journal_seq": written.manifest.get("journal_seq"),
            "records": written.manifest.get("records")}})
        if self.on_write is not None:
            self.on_write(written)

    async def step(self) -> bool:
        """Write the next segment if anything changed; True if one was written.

        A journal trimmed past our position starts a new generation instead.
        """
        await journal.sequence(self.store)
        read_at = wall_time()
        after = self.seen
        round_: ReplayRound = await self.store.run(
            lambda tr: replay_body(tr, after), read_only=True)
        if round_.gap:
            log.warning("the write journal was trimmed past the active backup's position "
                        "(it was stopped longer than the retention); writing a new base "
                        "backup", extra={"fields": {"seen": self.seen}})
            await self._base()
            return True
        if round_.to_seq == self.seen:
            return False
        self.segment += 1
        target = AtomicFile(self.directory / segment_file_name(self.generation, self.segment))
        try:
            writer = BackupWriter(target.stream)
            writer.header({"kind": KIND_SEGMENT, "source": source_name(self.store),
                           "schema_version": SCHEMA_VERSION, "created_at": now_iso(),
                           "generation": self.generation, "segment": self.segment,
                           "from_seq": self.seen, "read_at": read_at})
            rmk_ids: set[str] = set()
            write_round(writer, round_, rmk_ids)
            manifest = writer.finish({"journal_seq": round_.to_seq,
                                      "complete": round_.complete,
                                      "rmk_ids": sorted(rmk_ids)})
            target.commit()
        except BaseException:
            target.abort()
            self.segment -= 1
            raise
        self.seen = round_.to_seq
        self._wrote(Written(target.path, "segment", manifest))
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """A base backup, then a segment every interval until ``stop``; then a last one."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self._base()
        failing = False
        while True:
            stopping = stop.is_set()
            try:
                # Catch up at once while rounds stop short of the head.
                while await self.step() and not stop.is_set():
                    pass
                if failing:
                    log.info("active backup: the store is readable again")
                failing = False
            except Exception as exc:
                if stopping:
                    raise
                if not failing:
                    log.error("active backup: reading the store failed; retrying every "
                              "interval", extra={"fields": {"error": str(exc)}})
                failing = True
            if stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
