"""Storage keys: tuples packed with ``fdb.tuple``.

Every backend stores keys in the same byte layout (DESIGN.md §4), so a backup
taken from one backend restores into any other. ``fdb.tuple`` is pure Python
and works without libfdb_c. Packed tuples sort the way the tuples do: element
by element, strings and bytes by their bytes, integers numerically (version 10
sorts after version 9), and a tuple sorts before every tuple it is a prefix of.

Keyspace layout. The first element names the kind of record. Add a row here
when you add a prefix, and never reuse one.

===========================================================  ==================================
key                                                          value
===========================================================  ==================================
("kr", project, location, ring)                              KeyRingRecord
("ck", project, location, ring, key)                         CryptoKeyRecord
("cv", project, location, ring, key, version:int)            CryptoKeyVersionRecord (metadata)
("km", project, location, ring, key, version:int)            KeyMaterialRecord (wrapped KEK)
("iam", project, location, ring[, key])                      PolicyRecord (valv.core.iam)
("ix", index name, ...)                                      secondary indexes
("audit", seq:int)                                           AuditRecord (valv.core.audit)
("audit-head",)                                              AuditHead: the audit chain's end
("audit-genesis",)                                           the log's birth: creation time and
                                                             first hash (a deleted log is detected)
("log", seq:int), ("log-head",)                              the change log (valv.core.changelog)
("log-epoch",)                                               ChangeLogEpoch: the log's incarnation
                                                             (cleared by a restore)
("wj", seq:int)                                              JournalEntry: the ranges one write
                                                             transaction changed (journal.py)
("wj-head",)                                                 JournalHead: last and first seq
("meta", "restore")                                          an unfinished restore's position
                                                             (valv.core.backup.restore; JSON)
("meta", ...)                                                store metadata
===========================================================  ==================================

Records are ``valv.storage.v1`` protobuf messages, sealed by
``valv.core.storage.sealed`` with the packed key as AAD. Key material is kept
apart from version metadata so that listing versions never reads it and
destruction can clear it on its own.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeAlias

import fdb.tuple

# What fdb.tuple can pack. Nested tuples are allowed too.
KeyPart: TypeAlias = str | bytes | int | float | bool | uuid.UUID | tuple[Any, ...] | None

# describe() output is meant for error messages; keep it bounded.
_DESCRIBE_MAX_CHARS = 300


def pack(*parts: KeyPart) -> bytes:
    """The storage key for the tuple ``parts``: ``pack("km", "p", "l", "r", "k", 1)``."""
    key: bytes = fdb.tuple.pack(parts)
    return key


def unpack(key: bytes) -> tuple[Any, ...]:
    """The tuple a storage key was packed from. Raises ValueError on garbage."""
    try:
        parts: tuple[Any, ...] = fdb.tuple.unpack(key)
    except ValueError:
        raise
    except Exception as exc:  # fdb.tuple raises assorted errors on malformed input
        raise ValueError(f"not a packed tuple: {exc}") from exc
    return parts


def range_of(*prefix: KeyPart) -> tuple[bytes, bytes]:
    """``(begin, end)`` covering every key strictly under the tuple ``prefix``.

    The key packed from ``prefix`` itself is not included. Use the pair as
    ``get_range(begin, end)`` or ``clear_range(begin, end)``.
    """
    r = fdb.tuple.range(prefix)
    begin: bytes = r.start
    end: bytes = r.stop
    return begin, end


def describe(key: bytes) -> str:
    """A short human-readable form of ``key`` for error messages.

    ``('km', 'p', 'l', 'r', 'k', 1)`` for a packed tuple; the raw bytes for
    anything else. Never raises.
    """
    try:
        text = repr(unpack(bytes(key)))
    except Exception:
        try:
            text = f"raw key {bytes(key)!r}"
        except Exception:
            text = f"unprintable key of type {type(key).__name__}"
    if len(text) > _DESCRIBE_MAX_CHARS:
        size = len(key) if isinstance(key, bytes | bytearray | memoryview) else "?"
        text = f"{text[: _DESCRIBE_MAX_CHARS - 40]}... ({size} bytes)"
    return text


# A versionstamp in a packed tuple: fdb.tuple's code 0x33, then the 10-byte
# stamp the store fills in at commit, then a 2-byte number ordering one
# transaction's writes. Written by hand because fdb.tuple packs versionstamps
# only with libfdb_c loaded; ``unpack`` reads them back as
# fdb.tuple.Versionstamp without it.
VERSIONSTAMP_CODE = 0x33
STAMP_BYTES = 10
MAX_USER_VERSION = 0xFFFF


def versionstamped_key(prefix: bytes, stamp: bytes, user_version: int) -> bytes:
    """``prefix`` (a packed tuple) followed by a versionstamp element."""
    if len(stamp) != STAMP_BYTES:
        raise ValueError(f"a versionstamp is {STAMP_BYTES} bytes")
    if not 0 <= user_version <= MAX_USER_VERSION:
        raise ValueError("too many versionstamped writes in one transaction")
    return prefix + bytes((VERSIONSTAMP_CODE,)) + stamp + user_version.to_bytes(2, "big")


def stamp_of(key: bytes, prefix: bytes) -> tuple[bytes, int]:
    """(stamp, user version) of a key written by ``versionstamped_key(prefix, ...)``."""
    start = len(prefix) + 1
    if not key.startswith(prefix) or len(key) < start + STAMP_BYTES + 2 \
            or key[len(prefix)] != VERSIONSTAMP_CODE:
        raise ValueError(f"{describe(key)} is not a versionstamped key under the prefix")
    stamp = key[start : start + STAMP_BYTES]
    return stamp, int.from_bytes(key[start + STAMP_BYTES : start + STAMP_BYTES + 2], "big")
