"""Valv's storage: an ordered, transactional key-value store (DESIGN.md §4).

``open_store(url)`` opens a backend from a storage URL. Wrap the result in
``valv.core.storage.sealed.SealedStore`` before putting records in it: storage
is untrusted, and only sealed values may reach it.

Supported URLs:

- ``sqlite:///abs/path/valv.db``: the embedded default, an absolute path.
- ``sqlite:relative/path/valv.db``: relative to the working directory.
- ``fdb://...``: FoundationDB, not implemented yet.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

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
    "MAX_KEY_BYTES",
    "MAX_TRANSACTION_BYTES",
    "MAX_VALUE_BYTES",
    "LimitExceededError",
    "ReadOnlyTransactionError",
    "StorageError",
    "Store",
    "Transaction",
    "open_store",
]

_SUPPORTED = "sqlite:///absolute/path.db or sqlite:relative/path.db"


async def open_store(url: str) -> Store:
    """Open the store at ``url`` and check that it is usable.

    Raises StorageError for a malformed or unsupported URL, or a store that
    cannot be opened (for example a directory that cannot be created).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        path = _sqlite_path(url)
        from valv.core.storage.sqlite import SqliteStore

        store = SqliteStore(path, url=url)
        try:
            # Create the file and schema now, so a bad path fails at startup.
            await store.run(lambda tx: None, read_only=True)
        except BaseException:
            await store.close()
            raise
        return store
    if scheme == "fdb":
        raise StorageError(
            f"storage URL {url!r}: the FoundationDB backend (fdb://) is not implemented "
            f"yet; use {_SUPPORTED}"
        )
    raise StorageError(f"storage URL {url!r}: unknown scheme {parts.scheme!r}; use {_SUPPORTED}")


def _sqlite_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc:
        raise StorageError(
            f"storage URL {url!r}: sqlite URLs take no host ({parts.netloc!r}); use {_SUPPORTED}"
        )
    if parts.query or parts.fragment:
        raise StorageError(f"storage URL {url!r}: sqlite URLs take no query or fragment")
    path = unquote(parts.path)
    if not path or path.endswith("/"):
        raise StorageError(f"storage URL {url!r}: no database file name; use {_SUPPORTED}")
    if path == ":memory:" or path.startswith("file:"):
        raise StorageError(f"storage URL {url!r}: only a database file is supported")
    if "\x00" in path:
        raise StorageError(f"storage URL {url!r}: NUL in path")
    return os.path.abspath(path)
