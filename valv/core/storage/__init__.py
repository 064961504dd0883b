"""Valv's storage: an ordered, transactional key-value store (DESIGN.md §4).

``open_store(url)`` opens a backend from a storage URL. Wrap the result in
``valv.core.storage.sealed.SealedStore`` before putting records in it: storage
is untrusted, and only sealed values may reach it.

Supported URLs:

- ``sqlite:///abs/path/valv.db``: the embedded default, an absolute path.
- ``sqlite:relative/path/valv.db``: relative to the working directory.
- ``fdb://``: FoundationDB through the default cluster file (``FDB_CLUSTER_FILE``,
  then ``./fdb.cluster``, then ``/etc/foundationdb/fdb.cluster``).
- ``fdb:///etc/foundationdb/fdb.cluster``: through that cluster file
  (``fdb:relative/fdb.cluster`` for one relative to the working directory).
  Parameters: ``prefix`` (default ``valv``: one per deployment sharing a
  cluster), ``api_version`` (default 730), ``timeout_ms`` (default 5000, per
  transaction, retries included) and ``retry_limit`` (default 100), e.g.
  ``fdb:///etc/foundationdb/fdb.cluster?prefix=valv-prod&api_version=730``.
  Needs the FoundationDB client library, libfdb_c (docs/foundationdb.md).
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

_SUPPORTED = (
    "sqlite:///absolute/path.db, sqlite:relative/path.db, or fdb:///path/to/fdb.cluster "
    "(FoundationDB)"
)


async def open_store(url: str) -> Store:
    """Open the store at ``url`` and check that it is usable.

    Raises StorageError for a malformed or unsupported URL, or a store that
    cannot be opened (for example a directory that cannot be created).
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced "[" where a host would be
        raise StorageError(f"storage URL {url!r} is malformed ({exc}); use {_SUPPORTED}") from None
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
        # Imported here: the sqlite default needs nothing of FoundationDB's.
        from valv.core.storage.fdb import FdbStore, parse_url

        fdb_store = FdbStore(parse_url(url), url=url)
        try:
            # Load libfdb_c and reach the cluster now, so a missing client
            # library or an unreachable cluster fails at startup.
            await fdb_store.open()
        except BaseException:
            await fdb_store.close()
            raise
        return fdb_store
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
