"""``valv rmk``: root master key operations (rotate, status, pkcs11-keygen).

See docs/security.md, "Root key operations", for the procedure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

if TYPE_CHECKING:
    from valv.central.server import CentralConfig
    from valv.core.rmk_rotation import Progress
    from valv.core.storage.sealed import SealedStore

T = TypeVar("T")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from valv.cli import _add_store_flags
    from valv.core.rmk_rotation import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE

    rmk = sub.add_parser(
        "rmk", help="root master key operations",
        description="Root master key (RMK) operations. They take the same store and root key "
                    "flags as `valv central`.")
    cmds = rmk.add_subparsers(dest="rmk_command", required=True)

    p = cmds.add_parser(
        "rotate", help="rewrap every KEK and reseal every record under the newest RMK",
        description="Move everything to the newest configured RMK, online: every KEK wrapped "
                    "and every record sealed under an older RMK is rewritten under the newest "
                    "one, in bounded transactions, while central keeps serving. Idempotent and "
                    "safe to rerun after a crash. First add the new RMK as the newest and "
                    "restart every central; afterwards the older RMKs can be removed. Progress "
                    "goes to stderr. Exit 0 when nothing refers to an older RMK any more, 1 if "
                    "something does (listed), 2 on a configuration error.")
    _add_store_flags(p)
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"records per transaction, 1-{MAX_BATCH_SIZE} (default "
                        f"{DEFAULT_BATCH_SIZE})")
    p.set_defaults(func=_run_rotate)

    p = cmds.add_parser(
        "status", help="show the configured RMKs and which RMK each record needs",
        description="Print, as one JSON object, the configured RMK ids (oldest first) and how "
                    "many records are sealed, and KEKs wrapped, under each RMK id. An older RMK "
                    "that no record needs any more can be removed from the configuration.")
    _add_store_flags(p)
    p.set_defaults(func=_run_status)

    p = cmds.add_parser(
        "pkcs11-keygen", help="create a new root key in a PKCS#11 token",
        description="Create a non-extractable, sensitive AES-256 key with the given label in "
                    "the PKCS#11 token and print its RMK id. The PIN comes from "
                    "VALV_PKCS11_PIN or --pkcs11-pin-file. Refuses if the label exists.")
    _add_store_flags(p)
    p.set_defaults(func=_run_keygen)


def _error(command: str, exc: BaseException) -> int:
    print(f"valv rmk {command}: error: {exc}", file=sys.stderr)
    return 2


def _config(args: argparse.Namespace) -> CentralConfig:
    from valv.cli import _store_config

    return _store_config(args)


async def _with_store(config: CentralConfig,
                      work: Callable[[SealedStore, Any], Awaitable[T]]) -> T:
    from valv.central.server import load_root_keys, open_journaled_store
    from valv.core.clock import SystemClock

    keyring = load_root_keys(config, create_dev_key=False)
    try:
        store = await open_journaled_store(config, keyring, SystemClock())
        try:
            return await work(store, keyring)
        finally:
            await store.close()
            store.sealer.forget()
    finally:
        keyring.zeroize()


class _ProgressPrinter:
    """Progress on stderr: one updating line on a terminal, else a line every second."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = 0.0
        self._text = ""

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        total = max(p.total, p.scanned)  # central may add records meanwhile
        done = p.scanned >= total and p.batches > 0
        if not self._tty and not done and p.batches and now - self._last < 1.0:
            return
        pct = 100.0 * p.scanned / total if total else 100.0
        text = (f"rmk rotate: {p.scanned}/{total} records scanned ({pct:.0f}%), "
                f"{p.resealed} resealed, {p.rewrapped} KEKs rewrapped"
                + (f", {p.problem_count} problem(s)" if p.problem_count else ""))
        if text == self._text:
            return
        self._last, self._text = now, text
        if self._tty:
            self._stream.write("\r" + text + "\x1b[K")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


def _run_rotate(args: argparse.Namespace) -> int:
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.rmk_rotation import MAX_BATCH_SIZE, Census, RmkRotation, census
    from valv.core.storage.base import StorageError

    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        print(f"valv rmk rotate: error: --batch-size must be between 1 and {MAX_BATCH_SIZE}",
              file=sys.stderr)
        return 2
    printer = _ProgressPrinter(sys.stderr)
    newest = ""
    ids: list[dict[str, str]] = []

    async def work(store: SealedStore, keyring: Any) -> tuple[Progress, Census]:
        nonlocal newest, ids
        newest, ids = keyring.newest_id, keyring.describe()
        print(f"rmk rotate: moving everything to root key {newest} (configured: "
              f"{', '.join(i['id'] for i in ids)}) in {config.effective_store_url}",
              file=sys.stderr)
        rotation = RmkRotation(store, keyring, batch_size=args.batch_size,
                               on_progress=printer)
        progress = await rotation.run()
        printer.finish()
        return progress, await census(store)

    try:
        config = _config(args)
        progress, after = asyncio.run(_with_store(config, work))
    except (RootKeyConfigError, StorageError, OSError, ValueError) as exc:
        printer.finish()
        return _error("rotate", exc)
    for problem in progress.problems:
        print(json.dumps({"record": problem}))
    elapsed = time.monotonic() - progress.started
    print(f"rmk rotate: done in {elapsed:.1f}s: {progress.scanned} records scanned, "
          f"{progress.resealed} resealed, {progress.rewrapped} KEKs rewrapped", file=sys.stderr)
    left = after.outside(newest)
    if left or progress.problem_count:
        older = sorted({k for k, n in (after.sealed + after.wrapped).items()
                        if n and k != newest})
        print(f"rmk rotate: {left} seal(s) or wrap(s) still need an older or unknown root key "
              f"({', '.join(older) or 'unreadable records'}); {progress.problem_count} "
              "record(s) could not be rotated (listed on stdout). If a central still runs "
              "without the new root key as newest, restart it with the new configuration and "
              "run `valv rmk rotate` again", file=sys.stderr)
        return 1
    retired = [i["id"] for i in ids if i["id"] != newest]
    if retired:
        print(f"rmk rotate: nothing refers to {', '.join(retired)} any more; they can be "
              "removed from the configuration (then restart central)", file=sys.stderr)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from valv.core.crypto.errors import RootKeyConfigError
    from valv.core.rmk_rotation import Census, census
    from valv.core.storage.base import StorageError

    async def work(store: SealedStore, keyring: Any) -> tuple[list[dict[str, str]], str, Census]:
        return keyring.describe(), keyring.newest_id, await census(store)

    try:
        ids, newest, counts = asyncio.run(_with_store(_config(args), work))
    except (RootKeyConfigError, StorageError, OSError) as exc:
        return _error("status", exc)
    print(json.dumps({
        "configured": [{**i, "newest": i["id"] == newest} for i in ids],
        "records": counts.total,
        "sealed_by_rmk": dict(sorted(counts.sealed.items())),
        "keks_by_rmk": dict(sorted(counts.wrapped.items())),
        "unreadable_key_material": counts.unreadable,
        "needs_rotation": counts.outside(newest),
    }))
    return 0


def _run_keygen(args: argparse.Namespace) -> int:
    from valv.core.crypto.errors import RootKeyConfigError

    settings = _config(args).pkcs11
    labels = settings.key_labels
    if len(labels) != 1:
        print("valv rmk pkcs11-keygen: error: give exactly one --pkcs11-key-label, the label "
              "of the key to create", file=sys.stderr)
        return 2
    try:
        from valv.core.crypto.pkcs11 import generate_token_key
    except ImportError as exc:
        return _error("pkcs11-keygen", RootKeyConfigError(
            f"python-pkcs11 is not installed ({exc}); `pip install 'valv[pkcs11]'`"))
    try:
        rmk_id = generate_token_key(settings, labels[0])
    except RootKeyConfigError as exc:
        return _error("pkcs11-keygen", exc)
    print(json.dumps({"token": settings.token_label, "label": labels[0], "rmk_id": rmk_id}))
    return 0
