"""The one source of time in Valv.

Everything that needs "now" takes a Clock, so tests can move time forward by
months without sleeping. Times are timezone-aware UTC datetimes at microsecond
precision, which is what the wire (protobuf Timestamp via betterproto2) and the
records (integer microseconds) can hold exactly.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Protocol

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, UTC, timezone-aware."""
        ...


class SystemClock:
    """Wall-clock time."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock that only moves when told to. Thread-safe."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2030, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock needs a timezone-aware start time")
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> datetime:
        with self._lock:
            self._now += delta
            return self._now

    def set(self, when: datetime) -> None:
        with self._lock:
            self._now = when


class FileClock:
    """Test-only: the time written in a file (ISO 8601), so black-box tests can
    move the clock of real processes. Never use it in production."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.now()  # fail at startup, not at first use, if the file is bad

    def now(self) -> datetime:
        with open(self._path) as f:
            text = f.read().strip()
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"clock file {self._path} does not hold an ISO 8601 time") from None
        if when.tzinfo is None:
            raise ValueError(f"clock file {self._path} needs a time with a UTC offset")
        return when


def to_micros(when: datetime) -> int:
    """Microseconds since the Unix epoch; exact for any aware datetime."""
    delta = when - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
