"""The backup file format (valv.core.backup.format): round trips, and every damaged
file refused with BackupFormatError, never another exception."""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from valv.core.backup.format import (
    FORMAT_VERSION,
    MAGIC,
    PREAMBLE,
    TAG_PAIR,
    BackupFormatError,
    BackupReader,
    BackupWriter,
    Clear,
    Pair,
    _uvarint,
)
from valv.core.records import SCHEMA_VERSION
from valv.core.storage.base import MAX_KEY_BYTES, MAX_VALUE_BYTES

HEADER: dict[str, Any] = {"kind": "full", "source": "sqlite", "schema_version": SCHEMA_VERSION}

keys_ = st.binary(min_size=1, max_size=40)
frames = st.lists(st.one_of(
    st.builds(Pair, keys_, st.binary(max_size=200)),
    st.tuples(keys_, keys_).map(lambda t: Clear(min(t), max(t)))), max_size=30)


def write(items: list[Pair | Clear], header: dict[str, Any] | None = None,
          manifest: dict[str, Any] | None = None) -> bytes:
    out = io.BytesIO()
    writer = BackupWriter(out)
    writer.header(header or HEADER)
    for item in items:
        if isinstance(item, Pair):
            writer.pair(item.key, item.value)
        else:
            writer.clear(item.begin, item.end)
    writer.finish(manifest or {"journal_seq": 7})
    return out.getvalue()


def read(data: bytes) -> tuple[list[Pair | Clear], BackupReader]:
    reader = BackupReader(io.BytesIO(data), "b.vbk")
    return list(reader.frames()), reader


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_round_trip(items: list[Pair | Clear]) -> None:
    data = write(items)
    assert data.startswith(MAGIC + bytes((FORMAT_VERSION,)))
    got, reader = read(data)
    assert got == items
    assert reader.header["kind"] == "full" and reader.manifest["journal_seq"] == 7
    assert reader.manifest["records"] == sum(isinstance(i, Pair) for i in items)
    assert reader.manifest["clears"] == sum(isinstance(i, Clear) for i in items)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.data())
def test_every_truncation_is_refused(items: list[Pair | Clear], data: st.DataObject) -> None:
    whole = write(items)
    cut = data.draw(st.integers(0, len(whole) - 1))
    with pytest.raises(BackupFormatError) as error:
        read(whole[:cut])
    assert "b.vbk" in str(error.value)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.data())
def test_every_single_byte_change_is_refused(items: list[Pair | Clear],
                                             data: st.DataObject) -> None:
    whole = bytearray(write(items))
    index = data.draw(st.integers(0, len(whole) - 1))
    whole[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(BackupFormatError):
        read(bytes(whole))


@settings(max_examples=100)
@given(st.binary(max_size=300))
def test_garbage_is_refused_cleanly(garbage: bytes) -> None:
    for data in (garbage, PREAMBLE + garbage, PREAMBLE + zlib.compress(garbage)):
        with pytest.raises(BackupFormatError):
            read(data)


def test_a_large_backup_round_trips_across_read_chunks() -> None:
    """Many frames, some near the value limit: frames straddle the reader's chunks."""
    items: list[Pair | Clear] = []
    for i in range(3000):
        items.append(Pair(b"k%06d" % i, bytes([i % 251]) * (i % 700)))
        if i % 97 == 0:
            items.append(Clear(b"k%06d" % i, b"k%06d" % (i + 5)))
    items.append(Pair(b"big", b"\x01" * MAX_VALUE_BYTES))
    got, reader = read(write(items))
    assert got == items and reader.manifest["records"] == 3001


def test_bytes_after_the_end_are_refused() -> None:
    with pytest.raises(BackupFormatError, match="bytes after the end"):
        read(write([Pair(b"k", b"v")]) + b"\x00")


def test_a_newer_format_version_says_upgrade() -> None:
    data = bytearray(write([]))
    data[len(MAGIC)] = FORMAT_VERSION + 1
    with pytest.raises(BackupFormatError, match=f"format version {FORMAT_VERSION + 1}.*upgrade"):
        read(bytes(data))


def test_not_a_backup() -> None:
    with pytest.raises(BackupFormatError, match="not a Valv backup"):
        read(b"SQLite format 3\x00")


def test_a_newer_records_schema_says_upgrade() -> None:
    data = write([], header={**HEADER, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(BackupFormatError, match=r"schema version .*upgrade Valv"):
        read(data)


def body(*frames_: bytes) -> bytes:
    return PREAMBLE + zlib.compress(b"".join(frames_))


def frame(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _uvarint(len(payload)) + payload


def test_a_digest_mismatch_is_named() -> None:
    header = json.dumps({"format": 1, **HEADER}).encode()
    manifest = json.dumps({"format": 1, **HEADER, "records": 0, "clears": 0,
                           "body_sha256": "00" * 32}).encode()
    with pytest.raises(BackupFormatError, match="SHA-256"):
        read(body(frame(ord("H"), header), frame(ord("M"), manifest)))


def test_oversize_frames_are_refused_before_they_are_read() -> None:
    header = json.dumps({"format": 1, **HEADER}).encode()
    huge = bytes((TAG_PAIR,)) + _uvarint(MAX_KEY_BYTES + MAX_VALUE_BYTES + 1000)
    with pytest.raises(BackupFormatError, match="length of over"):
        read(body(frame(ord("H"), header), huge))


def test_the_writer_refuses_misuse() -> None:
    writer = BackupWriter(io.BytesIO())
    with pytest.raises(ValueError):
        writer.finish({})
    writer.header(HEADER)
    with pytest.raises(ValueError):
        writer.header(HEADER)
    with pytest.raises(ValueError):
        writer.finish({"kind": "segment"})  # would contradict the header
