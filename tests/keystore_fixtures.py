"""An in-process KeyStore on a real SQLite file, with a FakeClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from valv.core.clock import FakeClock, to_micros
from valv.core.crypto.rootkey import RootKey, RootKeyring
from valv.core.keystore import KeyStore, KeystoreSettings
from valv.core.storage.journal import journaled_store
from valv.core.storage.sealed import SealedStore, Sealer
from valv.core.storage.sqlite import SqliteStore


@asynccontextmanager
async def open_keystore(db: Path, clock: FakeClock, root: RootKey | None = None, *,
                        versionstamps: bool = False,
                        **settings: object) -> AsyncIterator[tuple[KeyStore, SealedStore]]:
    """A KeyStore over ``db``. Several may share one file (and one root key).

    ``versionstamps``: SQLite emulating them, so the change log and the journal
    stage and sequence their entries as they do on FoundationDB."""
    ring = RootKeyring([root or RootKey(b"\x01" * 32)])
    # As central opens it: sealed, every write journaled (valv.core.storage.journal).
    store = journaled_store(SqliteStore(str(db), versionstamps=versionstamps), Sealer(ring),
                            lambda: to_micros(clock.now()))
    options: dict[str, object] = {"use_cache_ttl": timedelta(0)}
    options.update(settings)
    keystore = KeyStore(store, ring, clock, KeystoreSettings(**options))  # type: ignore[arg-type]
    try:
        yield keystore, store
    finally:
        await store.close()
