"""An in-process KeyStore on a real SQLite file, with a FakeClock.

With ``VALV_TEST_KEYSTORE_BACKEND=fdb`` (and ``VALV_FDB_CLUSTER_FILE``), the same
KeyStores run on FoundationDB instead: each database path becomes a key prefix
of its own (``valv-ks-<hash of the path>``), so keystores that share a file share
a prefix. tests/test_storage_fdb.py runs the keystore suite that way when a
cluster is configured; the prefixes are left behind (use a throwaway cluster).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from valv.core.clock import FakeClock, to_micros
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.keystore import KeyStore, KeystoreSettings
from valv.core.storage import Store, open_store
from valv.core.storage.journal import journaled_store
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore

BACKEND = os.environ.get("VALV_TEST_KEYSTORE_BACKEND", "sqlite")


async def _raw_store(db: Path, versionstamps: bool) -> Store:
    if BACKEND == "fdb":  # versionstamps are FoundationDB's own there
        cluster = os.environ["VALV_FDB_CLUSTER_FILE"]
        prefix = "valv-ks-" + hashlib.sha256(str(Path(db).resolve()).encode()).hexdigest()[:16]
        return await open_store(f"fdb://{quote(os.path.abspath(cluster))}?prefix={prefix}")
    return SqliteStore(str(db), versionstamps=versionstamps)


@asynccontextmanager
async def open_keystore(db: Path, clock: FakeClock, root: RootKey | None = None, *,
                        versionstamps: bool = False,
                        **settings: object) -> AsyncIterator[tuple[KeyStore, SealedStore]]:
    """A KeyStore over ``db``. Several may share one file (and one root key).

    ``versionstamps``: SQLite emulating them, so the change log and the journal
    stage and sequence their entries as they do on FoundationDB."""
    ring = RootKeyring([root or RootKey(b"\x01" * 32)])
    # As central opens it: sealed, every write journaled (valv.core.storage.journal).
    store = journaled_store(await _raw_store(db, versionstamps), Sealer(ring),
                            lambda: to_micros(clock.now()))
    options: dict[str, object] = {"use_cache_ttl": timedelta(0)}
    options.update(settings)
    keystore = KeyStore(store, ring, clock, KeystoreSettings(**options))  # type: ignore[arg-type]
    try:
        yield keystore, store
    finally:
        await store.close()
