"""The backup file format: the one module that writes and reads it.

A backup file (``.vbk``) is a logical dump of the keyspace with every value
still sealed (valv.core.storage.sealed), so a stolen backup holds no usable
key. The same container holds a full backup and an active backup's
incremental segment; its header says which.

::

    bytes 0-6   magic "VALVBKP"
    byte 7      format version (1)
    then        one zlib stream of frames, ending exactly at the end of the file

    frame       tag (1 byte) || length (unsigned LEB128) || payload
      H  header    JSON: format, kind ("full" | "segment"), source backend, records
                   schema version, creation time, journal position... (known at the start)
      P  pair      LEB128 key length || key || value: set key to value
      C  clear     LEB128 begin length || begin || end: clear every key in [begin, end)
      M  manifest  JSON: record and clear counts, SHA-256 of every frame before it
                   (header included, uncompressed), the RMK ids needed, the journal
                   seq the dump is consistent at, and the header's facts again

Restoring applies P and C frames in file order. A full backup is the pairs of
a chunked scan followed by replayed ranges (valv.core.backup.dump); a segment
holds replayed ranges only.

The manifest comes last because a backup streams (to stdout too) and its
counts and digest are known only at the end; a file without one is
truncated. Reading checks everything: magic, version, zlib integrity,
frame structure, limits, the digest and counts, and that nothing follows the
manifest. Every problem raises BackupFormatError naming what is wrong, never
another exception, so ``valv backup verify`` and ``valv restore`` can refuse a
bad file before writing anything.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from valv.core.records import SCHEMA_VERSION
from valv.core.storage.base import MAX_KEY_BYTES, MAX_VALUE_BYTES

MAGIC = b"VALVBKP"
FORMAT_VERSION = 1
PREAMBLE = MAGIC + bytes((FORMAT_VERSION,))

TAG_HEADER = ord("H")
TAG_PAIR = ord("P")
TAG_CLEAR = ord("C")
TAG_MANIFEST = ord("M")

KIND_FULL = "full"
KIND_SEGMENT = "segment"
KINDS = frozenset({KIND_FULL, KIND_SEGMENT})

# Bounds that keep a corrupt or hostile file from making the reader allocate
# much: the largest pair a store can hold, and generous room for JSON.
_MAX_JSON_BYTES = 1 << 20
_MAX_PAIR_PAYLOAD = 10 + MAX_KEY_BYTES + MAX_VALUE_BYTES
_MAX_CLEAR_PAYLOAD = 10 + 2 * MAX_KEY_BYTES
_READ_CHUNK = 1 << 16
_COMPRESSION_LEVEL = 6


class BackupFormatError(Exception):
    """A backup file is not one this Valv can read; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Pair:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Clear:
    begin: bytes
    end: bytes


Frame = Pair | Clear


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class BackupWriter:
    """Writes one backup file to ``out`` (any binary stream: a file, stdout).

    Call ``header`` once, then ``pair``/``clear`` any number of times, then
    ``finish`` with the manifest's extra fields. Nothing is flushed to ``out``
    beyond what zlib has produced, so a writer that dies mid-way leaves a
    file without a manifest: truncated, and refused by every reader.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._zlib = zlib.compressobj(_COMPRESSION_LEVEL)
        self._digest = hashlib.sha256()
        self._header: dict[str, Any] | None = None
        self.records = 0
        self.clears = 0
        self.body_bytes = 0
        out.write(PREAMBLE)

    def _frame(self, tag: int, payload: bytes) -> None:
        frame = bytes((tag,)) + _uvarint(len(payload)) + payload
        if tag != TAG_MANIFEST:
            self._digest.update(frame)
        self.body_bytes += len(frame)
        chunk = self._zlib.compress(frame)
        if chunk:
            self._out.write(chunk)

    def header(self, fields: dict[str, Any]) -> None:
        if self._header is not None:
            raise ValueError("header written twice")
        if fields.get("kind") not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}")
        self._header = {"format": FORMAT_VERSION, **fields}
        self._frame(TAG_HEADER, json.dumps(self._header, sort_keys=True).encode())

    def pair(self, key: bytes, value: bytes) -> None:
        self._frame(TAG_PAIR, _uvarint(len(key)) + key + value)
        self.records += 1

    def clear(self, begin: bytes, end: bytes) -> None:
        self._frame(TAG_CLEAR, _uvarint(len(begin)) + begin + end)
        self.clears += 1

    def finish(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest and end the zlib stream; the manifest as written."""
        if self._header is None:
            raise ValueError("no header written")
        if set(fields) & set(self._header):
            raise ValueError("the manifest repeats the header's fields; it can't change them")
        manifest = {**self._header, **fields, "records": self.records, "clears": self.clears,
                    "body_sha256": self._digest.hexdigest()}
        self._frame(TAG_MANIFEST, json.dumps(manifest, sort_keys=True).encode())
        self._out.write(self._zlib.flush())
        self._out.flush()
        return manifest


@dataclass(frozen=True, slots=True)
class BackupSummary:
    """What reading a whole file found (``valv backup verify``)."""

    header: dict[str, Any]
    manifest: dict[str, Any]
    frames: int
    compressed_bytes: int


class BackupReader:
    """Reads a backup from ``stream``, checking it as it goes.

    Iterate ``frames()`` for the P and C frames in order; the header is
    available after the first one is read (``header``), and the manifest once
    the iteration ends (``manifest``). Any problem raises BackupFormatError,
    possibly after some frames were yielded: so restore reads a file through
    once (``verify``) before it writes a byte, then again to apply it.
    """

    def __init__(self, stream: BinaryIO, name: str = "backup") -> None:
        self._stream = stream
        self._name = name
        self.header: dict[str, Any] = {}
        self.manifest: dict[str, Any] = {}
        self.compressed_bytes = 0
        self._frames = 0

    def _fail(self, what: str) -> BackupFormatError:
        return BackupFormatError(f"{self._name}: {what}")

    def _chunks(self) -> Iterator[bytes]:
        """The decompressed bytes, in chunks; checks the preamble and zlib integrity."""
        preamble = self._stream.read(len(PREAMBLE))
        self.compressed_bytes += len(preamble)
        if len(preamble) < len(MAGIC) or preamble[: len(MAGIC)] != MAGIC:
            raise self._fail("not a Valv backup (it does not start with the VALVBKP magic)")
        if len(preamble) < len(PREAMBLE):
            raise self._fail("truncated: the file ends inside its preamble")
        version = preamble[len(MAGIC)]
        if version != FORMAT_VERSION:
            raise self._fail(f"backup format version {version}; this Valv reads version "
                             f"{FORMAT_VERSION} only" + (": upgrade Valv" if version >
                                                         FORMAT_VERSION else ""))
        inflater = zlib.decompressobj()
        while True:
            compressed = self._stream.read(_READ_CHUNK)
            self.compressed_bytes += len(compressed)
            if not compressed:
                break
            try:
                # Bounded output per call, so a tiny "zip bomb" chunk can't take
                # the memory: feed unconsumed input back in until it is used up.
                data = inflater.decompress(compressed, _READ_CHUNK)
                while True:
                    if data:
                        yield data
                    if inflater.eof or not inflater.unconsumed_tail:
                        break
                    data = inflater.decompress(inflater.unconsumed_tail, _READ_CHUNK)
            except zlib.error as exc:
                raise self._fail(f"corrupt: the compressed data is damaged ({exc})") from None
            if inflater.eof:
                if inflater.unused_data or self._stream.read(1):
                    raise self._fail("corrupt: there are bytes after the end of the backup")
                return
        raise self._fail(f"truncated: the file ends inside its compressed data, after "
                         f"{self._frames} frames (was the backup interrupted?)")

    def frames(self) -> Iterator[Frame]:
        buffer = bytearray()
        position = 0
        digest = hashlib.sha256()
        records = clears = 0
        done = False
        chunks = self._chunks()

        def need(n: int) -> bool:
            """Make ``n`` bytes available at ``position``; False at the end of the data."""
            nonlocal buffer, position
            while len(buffer) - position < n:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return False
                if position:
                    del buffer[:position]
                    position = 0
                buffer += chunk
            return True

        def read_uvarint(limit: int, what: str) -> int:
            nonlocal position
            value = shift = 0
            while True:
                if not need(1):
                    raise self._fail(f"truncated: the data ends inside frame {self._frames + 1}")
                byte = buffer[position]
                position += 1
                value |= (byte & 0x7F) << shift
                if value > limit:
                    raise self._fail(f"corrupt: frame {self._frames + 1} has a {what} of over "
                                     f"{limit} bytes")
                if not byte & 0x80:
                    return value
                shift += 7

        while True:
            if not need(1):
                if not done:
                    raise self._fail(f"truncated: no manifest after {self._frames} frames (was "
                                     "the backup interrupted?)")
                return
            if done:
                raise self._fail("corrupt: frames after the manifest")
            tag = buffer[position]
            position += 1
            limits = {TAG_HEADER: _MAX_JSON_BYTES, TAG_MANIFEST: _MAX_JSON_BYTES,
                      TAG_PAIR: _MAX_PAIR_PAYLOAD, TAG_CLEAR: _MAX_CLEAR_PAYLOAD}
            if tag not in limits:
                raise self._fail(f"corrupt: frame {self._frames + 1} has unknown type "
                                 f"0x{tag:02x}")
            length = read_uvarint(limits[tag], "length")
            if not need(length):
                raise self._fail(f"truncated: the data ends inside frame {self._frames + 1}")
            payload = bytes(buffer[position : position + length])
            position += length
            # Rebuilt rather than sliced (need() may have compacted the buffer). A
            # non-canonical length encoding then fails the digest, as it should.
            frame_bytes = bytes((tag,)) + _uvarint(length) + payload
            self._frames += 1
            if self._frames == 1 and tag != TAG_HEADER:
                raise self._fail("corrupt: the first frame is not the header")
            if tag == TAG_HEADER:
                if self._frames != 1:
                    raise self._fail(f"corrupt: a second header at frame {self._frames}")
                digest.update(frame_bytes)
                self.header = self._json(payload, "header")
                self._check_header(self.header)
            elif tag == TAG_MANIFEST:
                self.manifest = self._json(payload, "manifest")
                self._check_manifest(self.manifest, digest.hexdigest(), records, clears)
                done = True
            else:
                digest.update(frame_bytes)
                first, rest = self._split(payload)
                if tag == TAG_PAIR:
                    if len(first) > MAX_KEY_BYTES or len(rest) > MAX_VALUE_BYTES:
                        raise self._fail(f"corrupt: frame {self._frames} holds a key or value "
                                         "larger than any store allows")
                    records += 1
                    yield Pair(first, rest)
                else:
                    if first > rest:
                        raise self._fail(f"corrupt: frame {self._frames} clears an inverted "
                                         "range")
                    clears += 1
                    yield Clear(first, rest)

    def _split(self, payload: bytes) -> tuple[bytes, bytes]:
        length = shift = index = 0
        while True:
            if index >= len(payload) or shift > 28:
                raise self._fail(f"corrupt: frame {self._frames} is malformed")
            byte = payload[index]
            index += 1
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        if index + length > len(payload):
            raise self._fail(f"corrupt: frame {self._frames} is malformed")
        return payload[index : index + length], payload[index + length :]

    def _json(self, payload: bytes, what: str) -> dict[str, Any]:
        try:
            value = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self._fail(f"corrupt: the {what} is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise self._fail(f"corrupt: the {what} is not a JSON object")
        return value

    def _check_header(self, header: dict[str, Any]) -> None:
        if header.get("format") != FORMAT_VERSION:
            raise self._fail(f"corrupt: the header says format {header.get('format')!r}, the "
                             f"preamble {FORMAT_VERSION}")
        if header.get("kind") not in KINDS:
            raise self._fail(f"corrupt: unknown backup kind {header.get('kind')!r}")
        schema = header.get("schema_version")
        if not isinstance(schema, int) or schema < 1:
            raise self._fail(f"corrupt: bad records schema version {schema!r}")
        if schema > SCHEMA_VERSION:
            raise self._fail(f"its records have schema version {schema}, newer than this "
                             f"Valv understands ({SCHEMA_VERSION}): upgrade Valv to restore it")

    def _check_manifest(self, manifest: dict[str, Any], body_sha256: str, records: int,
                        clears: int) -> None:
        expected = manifest.get("body_sha256")
        if expected != body_sha256:
            raise self._fail(f"corrupt: the body's SHA-256 is {body_sha256}, the manifest "
                             f"says {expected}")
        for key, value in self.header.items():
            if manifest.get(key) != value:
                raise self._fail(f"corrupt: the manifest's {key!r} does not match the header")
        if manifest.get("records") != records or manifest.get("clears") != clears:
            raise self._fail(f"corrupt: the manifest counts {manifest.get('records')} records "
                             f"and {manifest.get('clears')} clears, the body holds {records} "
                             f"and {clears}")

    def verify(self) -> BackupSummary:
        """Read the whole file and check it; what it holds."""
        for _ in self.frames():
            pass
        return BackupSummary(self.header, self.manifest, self._frames, self.compressed_bytes)


def verify_file(path: str) -> BackupSummary:
    """Check the backup file at ``path`` end to end (BackupFormatError if it is bad)."""
    try:
        with open(path, "rb") as stream:
            return BackupReader(stream, path).verify()
    except OSError as exc:
        raise BackupFormatError(f"{path}: cannot read it: {exc.strerror or exc}") from None
