"""Cloud KMS resource names: parsing, validation and canonical form.

    projects/{p}/locations/{l}/keyRings/{r}/cryptoKeys/{k}/cryptoKeyVersions/{n}

Every id matches ``[a-zA-Z0-9_-]{1,63}``. Version ids are decimal integers
without leading zeros, 1 to 2**32-1 (they are stored as uint32 in the
ciphertext header). ``str()`` of a name is its canonical form, and parsing the
canonical form gives back an equal name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from valv.core.errors import InvalidArgument

ID_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,63}")
_VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,9}")
MAX_VERSION_ID = 2**32 - 1


def is_valid_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """Return ``value`` if it is a valid resource id, else raise InvalidArgument."""
    if not is_valid_id(value):
        raise InvalidArgument(
            f"{what} {value!r} is invalid: it must be 1 to 63 characters from "
            "[a-zA-Z0-9_-]"
        )
    return value


@dataclass(frozen=True, slots=True)
class ProjectName:
    project: str

    def __str__(self) -> str:
        return f"projects/{self.project}"


@dataclass(frozen=True, slots=True)
class LocationName:
    project: str
    location: str

    def __str__(self) -> str:
        return f"projects/{self.project}/locations/{self.location}"

    def key_ring(self, key_ring_id: str) -> KeyRingName:
        return KeyRingName(self.project, self.location, key_ring_id)


@dataclass(frozen=True, slots=True)
class KeyRingName:
    project: str
    location: str
    key_ring: str

    def __str__(self) -> str:
        return f"projects/{self.project}/locations/{self.location}/keyRings/{self.key_ring}"

    @property
    def parent(self) -> LocationName:
        return LocationName(self.project, self.location)

    def crypto_key(self, crypto_key_id: str) -> CryptoKeyName:
        return CryptoKeyName(self.project, self.location, self.key_ring, crypto_key_id)


@dataclass(frozen=True, slots=True)
class CryptoKeyName:
    project: str
    location: str
    key_ring: str
    crypto_key: str

    def __str__(self) -> str:
        return f"{self.parent}/cryptoKeys/{self.crypto_key}"

    @property
    def parent(self) -> KeyRingName:
        return KeyRingName(self.project, self.location, self.key_ring)

    def version(self, version_id: int) -> CryptoKeyVersionName:
        return CryptoKeyVersionName(
            self.project, self.location, self.key_ring, self.crypto_key, version_id
        )


@dataclass(frozen=True, slots=True)
class CryptoKeyVersionName:
    project: str
    location: str
    key_ring: str
    crypto_key: str
    version: int

    def __str__(self) -> str:
        return f"{self.parent}/cryptoKeyVersions/{self.version}"

    @property
    def parent(self) -> CryptoKeyName:
        return CryptoKeyName(self.project, self.location, self.key_ring, self.crypto_key)


_SHAPES = {
    "project": "projects/{project}",
    "location": "projects/{project}/locations/{location}",
    "key ring": "projects/{project}/locations/{location}/keyRings/{key_ring}",
    "crypto key": "projects/{project}/locations/{location}/keyRings/{key_ring}/"
    "cryptoKeys/{crypto_key}",
    "crypto key version": "projects/{project}/locations/{location}/keyRings/{key_ring}/"
    "cryptoKeys/{crypto_key}/cryptoKeyVersions/{version}",
}
_COLLECTIONS = ("projects", "locations", "keyRings", "cryptoKeys", "cryptoKeyVersions")


def _split(name: str, kind: str, depth: int, field: str) -> list[str]:
    """Split ``name`` into ``depth`` ids, checking collection words and ids."""

    def bad() -> InvalidArgument:
        return InvalidArgument(
            f"{field} {name!r} is not a valid {kind} name: expected {_SHAPES[kind]}"
        )

    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{field} is required: expected {_SHAPES[kind]}")
    parts = name.split("/")
    if len(parts) != 2 * depth:
        raise bad()
    ids: list[str] = []
    for i in range(depth):
        if parts[2 * i] != _COLLECTIONS[i]:
            raise bad()
        segment = parts[2 * i + 1]
        if i == 4:
            if _VERSION_PATTERN.fullmatch(segment) is None or int(segment) > MAX_VERSION_ID:
                raise InvalidArgument(
                    f"{field} {name!r} is not a valid crypto key version name: the version "
                    "id must be a decimal integer from 1 to 4294967295"
                )
        elif not is_valid_id(segment):
            raise InvalidArgument(
                f"{field} {name!r} is not a valid {kind} name: {segment!r} must be 1 to 63 "
                "characters from [a-zA-Z0-9_-]"
            )
        ids.append(segment)
    return ids


def parse_project(name: str, field: str = "name") -> ProjectName:
    (p,) = _split(name, "project", 1, field)
    return ProjectName(p)


def parse_location(name: str, field: str = "name") -> LocationName:
    p, loc = _split(name, "location", 2, field)
    return LocationName(p, loc)


def parse_key_ring(name: str, field: str = "name") -> KeyRingName:
    p, loc, r = _split(name, "key ring", 3, field)
    return KeyRingName(p, loc, r)


def parse_crypto_key(name: str, field: str = "name") -> CryptoKeyName:
    p, loc, r, k = _split(name, "crypto key", 4, field)
    return CryptoKeyName(p, loc, r, k)


def parse_crypto_key_version(name: str, field: str = "name") -> CryptoKeyVersionName:
    p, loc, r, k, v = _split(name, "crypto key version", 5, field)
    return CryptoKeyVersionName(p, loc, r, k, int(v))


def parse_key_or_version(name: str, field: str = "name") -> CryptoKeyName | CryptoKeyVersionName:
    """A CryptoKey or CryptoKeyVersion name, as Encrypt accepts."""
    if isinstance(name, str) and name.count("/") == 9:
        return parse_crypto_key_version(name, field)
    if isinstance(name, str) and name.count("/") == 7:
        return parse_crypto_key(name, field)
    raise InvalidArgument(
        f"{field} {name!r} is not a valid crypto key or crypto key version name: expected "
        f"{_SHAPES['crypto key']} or .../cryptoKeyVersions/{{version}}"
    )
