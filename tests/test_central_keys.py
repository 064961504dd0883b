"""KeyRings and CryptoKeys through Google's official client against a real central.

Ids, names and duplicates; CreateCryptoKey defaults and validation; UpdateCryptoKey;
durability across a restart.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.protobuf import duration_pb2, timestamp_pb2

from tests.helpers import CALL, CentralProcess

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
Algorithm = kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
DAY = timedelta(days=1)

VALID_IDS = ["a", "A", "0", "-", "_", "a" * 63, "Key_ring-01", "x-" * 31 + "y"]
INVALID_IDS = ["", "a" * 64, "a/b", "a.b", ".", "é", "ключ", "a b", "a\n", "a:b", "*"]


# ---- helpers ----------------------------------------------------------------------------


def _pb(key: kms_v1.CryptoKey) -> Any:
    return kms_v1.CryptoKey.pb(key)


def _micros(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _dur_micros(d: duration_pb2.Duration) -> int:
    return d.seconds * 1_000_000 + d.nanos // 1000


def _create_key(kms: Client, key_ring: str, key_id: str = "k", **crypto_key: Any
                ) -> kms_v1.CryptoKey:
    spec = {"purpose": ENCRYPT_DECRYPT, **crypto_key}
    return kms.create_crypto_key(
        request={"parent": key_ring, "crypto_key_id": key_id, "crypto_key": spec}, **CALL)


def _encrypt(kms: Client, name: str, plaintext: bytes = b"secret") -> kms_v1.EncryptResponse:
    return kms.encrypt(request={"name": name, "plaintext": plaintext}, **CALL)


def _decrypt(kms: Client, name: str, ciphertext: bytes) -> bytes:
    return kms.decrypt(request={"name": name, "ciphertext": ciphertext}, **CALL).plaintext


def _versions(kms: Client, key: str) -> list[str]:
    pager = kms.list_crypto_key_versions(request={"parent": key}, **CALL)
    return [v.name.rsplit("/", 1)[1] for v in pager]


# ---- ids, names, duplicates ---------------------------------------------------------------


@pytest.mark.parametrize("ring_id", VALID_IDS)
def test_valid_ids_are_accepted(kms: Client, location: str, ring_id: str) -> None:
    ring = kms.create_key_ring(
        request={"parent": location, "key_ring_id": ring_id, "key_ring": {}}, **CALL)
    assert ring.name == f"{location}/keyRings/{ring_id}"
    key = _create_key(kms, ring.name, ring_id)
    assert key.name == f"{ring.name}/cryptoKeys/{ring_id}"
    assert kms.get_crypto_key(request={"name": key.name}, **CALL).name == key.name


@pytest.mark.parametrize("bad_id", INVALID_IDS)
def test_invalid_key_ring_id(kms: Client, location: str, bad_id: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        kms.create_key_ring(
            request={"parent": location, "key_ring_id": bad_id, "key_ring": {}}, **CALL)
    assert "key_ring_id" in caught.value.message


@pytest.mark.parametrize("bad_id", INVALID_IDS)
def test_invalid_crypto_key_id(kms: Client, key_ring: str, bad_id: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, bad_id)
    assert "crypto_key_id" in caught.value.message
    assert list(kms.list_crypto_keys(request={"parent": key_ring}, **CALL)) == []


@pytest.mark.parametrize("suffix", [
    "", "/", "/extra", "/keyRings/r", "/keyRings/r/cryptoKeys/k",
])
def test_malformed_key_ring_parent(kms: Client, project: str, suffix: str) -> None:
    # The parent of a KeyRing is a location; anything else is malformed.
    parents = [f"projects/{project}{suffix}", f"projects/{project}/locations/global{suffix}"]
    for parent in parents:
        if parent == f"projects/{project}/locations/global":
            continue
        with pytest.raises(gexc.InvalidArgument) as caught:
            kms.create_key_ring(request={"parent": parent, "key_ring_id": "r", "key_ring": {}},
                                **CALL)
        assert "parent" in caught.value.message


@pytest.mark.parametrize("make_name", [
    lambda ring: ring.replace("/keyRings/", "/keyrings/"),
    lambda ring: ring.replace("/locations/", "/location/"),
    lambda ring: ring.replace("projects/", "project/"),
    lambda ring: ring + "/",
    lambda ring: ring + "/cryptoKeys",
    lambda ring: ring + "/cryptoKeys/k/extra",
    lambda ring: ring.replace("/keyRings/ring", "/keyRings/ri.ng"),
    lambda ring: "/" + ring,
])
def test_malformed_names(kms: Client, key_ring: str, make_name: Any) -> None:
    bad = make_name(key_ring)
    with pytest.raises(gexc.InvalidArgument):
        kms.get_key_ring(request={"name": bad}, **CALL)
    with pytest.raises(gexc.InvalidArgument):
        kms.create_crypto_key(request={"parent": bad, "crypto_key_id": "k",
                                       "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)
    with pytest.raises(gexc.InvalidArgument):
        kms.get_crypto_key(request={"name": bad + "/cryptoKeys/k"}, **CALL)


@pytest.mark.parametrize("version_id", ["0", "01", "abc", "-1", "1.0", "4294967296", ""])
def test_malformed_version_ids(kms: Client, crypto_key: str, version_id: str) -> None:
    name = f"{crypto_key}/cryptoKeyVersions/{version_id}"
    with pytest.raises(gexc.InvalidArgument) as caught:
        kms.get_crypto_key_version(request={"name": name}, **CALL)
    assert "name" in caught.value.message
    with pytest.raises(gexc.InvalidArgument):
        kms.destroy_crypto_key_version(request={"name": name}, **CALL)


def test_a_key_name_is_not_a_ring_name_and_vice_versa(kms: Client, crypto_key: str) -> None:
    with pytest.raises(gexc.InvalidArgument):
        kms.get_key_ring(request={"name": crypto_key}, **CALL)
    with pytest.raises(gexc.InvalidArgument):
        kms.get_crypto_key(request={"name": crypto_key + "/cryptoKeyVersions/1"}, **CALL)
    with pytest.raises(gexc.InvalidArgument):
        kms.get_crypto_key_version(request={"name": crypto_key}, **CALL)


def test_duplicate_key_ring_is_already_exists_and_changes_nothing(
        kms: Client, location: str) -> None:
    ring = kms.create_key_ring(
        request={"parent": location, "key_ring_id": "dup", "key_ring": {}}, **CALL)
    key = _create_key(kms, ring.name)
    with pytest.raises(gexc.AlreadyExists) as caught:
        kms.create_key_ring(
            request={"parent": location, "key_ring_id": "dup", "key_ring": {}}, **CALL)
    assert ring.name in caught.value.message
    again = kms.get_key_ring(request={"name": ring.name}, **CALL)
    assert _micros(kms_v1.KeyRing.pb(again).create_time) == _micros(
        kms_v1.KeyRing.pb(ring).create_time)
    assert [k.name for k in kms.list_crypto_keys(request={"parent": ring.name}, **CALL)] == [
        key.name]


def test_duplicate_crypto_key_is_already_exists_and_overwrites_nothing(
        kms: Client, key_ring: str) -> None:
    key = _create_key(kms, key_ring, "dup", labels={"env": "prod"})
    ciphertext = _encrypt(kms, key.name, b"keep me").ciphertext
    for attempt in (
        {"labels": {"env": "dev", "other": "x"}},
        {"rotation_period": timedelta(days=2),
         "next_rotation_time": datetime.now(UTC) + timedelta(days=1)},
        {"destroy_scheduled_duration": timedelta(days=2)},
    ):
        with pytest.raises(gexc.AlreadyExists) as caught:
            _create_key(kms, key_ring, "dup", **attempt)
        assert key.name in caught.value.message
    with pytest.raises(gexc.AlreadyExists):
        kms.create_crypto_key(
            request={"parent": key_ring, "crypto_key_id": "dup", "skip_initial_version_creation":
                     True, "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)
    now = kms.get_crypto_key(request={"name": key.name}, **CALL)
    assert dict(now.labels) == {"env": "prod"}
    assert _pb(now).rotation_period == _pb(key).rotation_period
    assert _pb(now).destroy_scheduled_duration == _pb(key).destroy_scheduled_duration
    assert now.primary.name == key.primary.name
    assert _versions(kms, key.name) == ["1"]
    assert _decrypt(kms, key.name, ciphertext) == b"keep me"


def test_key_ring_in_unconfigured_location_is_not_found(kms: Client, project: str) -> None:
    with pytest.raises(gexc.NotFound) as caught:
        kms.create_key_ring(request={"parent": f"projects/{project}/locations/us-east1",
                                     "key_ring_id": "r", "key_ring": {}}, **CALL)
    assert "us-east1" in caught.value.message
    assert "global" in caught.value.message  # says which locations exist


def test_missing_resources_are_not_found(kms: Client, key_ring: str, crypto_key: str) -> None:
    missing_ring = key_ring + "-missing"
    with pytest.raises(gexc.NotFound) as caught:
        kms.get_key_ring(request={"name": missing_ring}, **CALL)
    assert missing_ring in caught.value.message
    with pytest.raises(gexc.NotFound):
        _create_key(kms, missing_ring)
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key(request={"name": f"{key_ring}/cryptoKeys/missing"}, **CALL)
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key(request={"name": f"{missing_ring}/cryptoKeys/key"}, **CALL)
    with pytest.raises(gexc.NotFound) as caught:
        kms.get_crypto_key_version(
            request={"name": f"{crypto_key}/cryptoKeyVersions/2"}, **CALL)
    assert "cryptoKeyVersions/2" in caught.value.message
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key_version(
            request={"name": f"{key_ring}/cryptoKeys/missing/cryptoKeyVersions/1"}, **CALL)
    with pytest.raises(gexc.NotFound):
        kms.create_crypto_key_version(
            request={"parent": f"{key_ring}/cryptoKeys/missing", "crypto_key_version": {}},
            **CALL)


# ---- CreateCryptoKey ------------------------------------------------------------------------


def test_purpose_is_required(kms: Client, key_ring: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        kms.create_crypto_key(
            request={"parent": key_ring, "crypto_key_id": "k", "crypto_key": {}}, **CALL)
    assert "purpose" in caught.value.message
    with pytest.raises(gexc.InvalidArgument):
        kms.create_crypto_key(request={"parent": key_ring, "crypto_key_id": "k"}, **CALL)


@pytest.mark.parametrize("purpose", ["ASYMMETRIC_SIGN", "ASYMMETRIC_DECRYPT", "MAC",
                                     "RAW_ENCRYPT_DECRYPT"])
def test_other_purposes_are_unimplemented(kms: Client, key_ring: str, purpose: str) -> None:
    with pytest.raises(gexc.MethodNotImplemented) as caught:
        kms.create_crypto_key(request={
            "parent": key_ring, "crypto_key_id": "k",
            "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose[purpose]}}, **CALL)
    assert purpose in caught.value.message
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key(request={"name": f"{key_ring}/cryptoKeys/k"}, **CALL)


@pytest.mark.parametrize("level", ["HSM", "EXTERNAL"])
def test_non_software_protection_is_unimplemented(kms: Client, key_ring: str,
                                                  level: str) -> None:
    with pytest.raises(gexc.MethodNotImplemented) as caught:
        _create_key(kms, key_ring,
                    version_template={"protection_level": kms_v1.ProtectionLevel[level]})
    assert level in caught.value.message


@pytest.mark.parametrize("algorithm", ["RSA_SIGN_PSS_2048_SHA256", "HMAC_SHA256", "AES_256_GCM",
                                       "EC_SIGN_P256_SHA256"])
def test_incompatible_algorithm(kms: Client, key_ring: str, algorithm: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, version_template={"algorithm": Algorithm[algorithm]})
    assert algorithm in caught.value.message
    assert "ENCRYPT_DECRYPT" in caught.value.message


def test_defaults(kms: Client, key_ring: str) -> None:
    key = _create_key(kms, key_ring)
    pb = _pb(key)
    assert key.name == f"{key_ring}/cryptoKeys/k"
    assert key.purpose == ENCRYPT_DECRYPT
    assert key.version_template.algorithm == Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
    assert key.version_template.protection_level == kms_v1.ProtectionLevel.SOFTWARE
    assert key.primary.name == f"{key.name}/cryptoKeyVersions/1"
    assert key.primary.state == State.ENABLED
    assert key.primary.algorithm == Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
    assert key.primary.protection_level == kms_v1.ProtectionLevel.SOFTWARE
    assert _micros(pb.primary.create_time) == _micros(pb.create_time)
    # Valv's one documented difference: default rotation, 30 days from create_time, exactly.
    assert pb.HasField("rotation_period")
    assert _dur_micros(pb.rotation_period) == 30 * 86_400 * 1_000_000
    assert _micros(pb.next_rotation_time) == _micros(pb.create_time) + 30 * 86_400 * 1_000_000
    assert _dur_micros(pb.destroy_scheduled_duration) == 30 * 86_400 * 1_000_000
    assert dict(key.labels) == {}
    assert not key.import_only
    # What Create returned is what Get returns.
    assert _pb(kms.get_crypto_key(request={"name": key.name}, **CALL)) == pb
    version = kms.get_crypto_key_version(request={"name": key.primary.name}, **CALL)
    assert version.state == State.ENABLED
    assert _encrypt(kms, key.name).name == key.primary.name


def test_explicit_template_values_are_accepted(kms: Client, key_ring: str) -> None:
    key = _create_key(kms, key_ring, version_template={
        "algorithm": Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
        "protection_level": kms_v1.ProtectionLevel.SOFTWARE})
    assert key.version_template.algorithm == Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
    assert key.version_template.protection_level == kms_v1.ProtectionLevel.SOFTWARE


def test_skip_initial_version_creation(kms: Client, key_ring: str) -> None:
    key = kms.create_crypto_key(request={
        "parent": key_ring, "crypto_key_id": "empty", "skip_initial_version_creation": True,
        "crypto_key": {"purpose": ENCRYPT_DECRYPT}}, **CALL)
    assert not _pb(key).HasField("primary")
    assert not _pb(kms.get_crypto_key(request={"name": key.name}, **CALL)).HasField("primary")
    assert _versions(kms, key.name) == []
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _encrypt(kms, key.name)
    assert "primary" in caught.value.message
    # The first version is 1, and (as in Cloud KMS) creating it does not make it primary.
    v1 = kms.create_crypto_key_version(
        request={"parent": key.name, "crypto_key_version": {}}, **CALL)
    assert v1.name == f"{key.name}/cryptoKeyVersions/1"
    assert not _pb(kms.get_crypto_key(request={"name": key.name}, **CALL)).HasField("primary")
    with pytest.raises(gexc.FailedPrecondition):
        _encrypt(kms, key.name)
    updated = kms.update_crypto_key_primary_version(
        request={"name": key.name, "crypto_key_version_id": "1"}, **CALL)
    assert updated.primary.name == v1.name
    assert _encrypt(kms, key.name).name == v1.name


def test_rotation_period_without_next_rotation_time_is_invalid(kms: Client,
                                                                key_ring: str) -> None:
    """As Cloud KMS: "If rotation_period is set, next_rotation_time must also be set"."""
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, rotation_period=timedelta(days=2, hours=3))
    assert "next_rotation_time" in caught.value.message
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key(request={"name": f"{key_ring}/cryptoKeys/k"}, **CALL)


def test_next_rotation_time_without_a_period_gets_the_default_period(kms: Client,
                                                                    key_ring: str) -> None:
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    key = _create_key(kms, key_ring, next_rotation_time=when)
    assert key.next_rotation_time == when
    assert key.rotation_period == timedelta(days=30)


def test_explicit_rotation_period_and_next_rotation_time(kms: Client, key_ring: str) -> None:
    when = datetime.now(UTC).replace(microsecond=123456) + timedelta(days=7)
    key = _create_key(kms, key_ring, rotation_period=timedelta(days=90), next_rotation_time=when)
    pb = _pb(key)
    assert _dur_micros(pb.rotation_period) == 90 * 86_400 * 1_000_000
    assert pb.next_rotation_time.ToDatetime(tzinfo=UTC) == when


@pytest.mark.parametrize("period", [
    timedelta(hours=24), timedelta(days=36_500), timedelta(hours=24, microseconds=1),
])
def test_rotation_period_bounds_accepted(kms: Client, key_ring: str,
                                         period: timedelta) -> None:
    key = _create_key(kms, key_ring, rotation_period=period,
                      next_rotation_time=datetime.now(UTC) + timedelta(days=1))
    assert key.rotation_period == period


@pytest.mark.parametrize("period", [
    timedelta(hours=24) - timedelta(seconds=1), timedelta(hours=1), timedelta(seconds=1),
    timedelta(days=36_500, seconds=1), timedelta(days=365 * 200),
])
def test_rotation_period_out_of_bounds(kms: Client, key_ring: str, period: timedelta) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, rotation_period=period,
                    next_rotation_time=datetime.now(UTC) + timedelta(days=1))
    assert "rotation_period" in caught.value.message


@pytest.fixture
def central_without_default_rotation(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path / "central-norot", "--default-rotation-period",
                             "off").start()
    yield process
    process.stop()


def test_default_rotation_can_be_disabled(
        central_without_default_rotation: CentralProcess) -> None:
    kms = central_without_default_rotation.client()
    ring = kms.create_key_ring(request={"parent": "projects/p/locations/global",
                                        "key_ring_id": "r", "key_ring": {}}, **CALL)
    key = _create_key(kms, ring.name)
    assert not _pb(key).HasField("rotation_period")
    assert not _pb(key).HasField("next_rotation_time")
    assert not _pb(kms.get_crypto_key(request={"name": key.name}, **CALL)).HasField(
        "next_rotation_time")
    # An explicit period still works there.
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(days=3)
    explicit = _create_key(kms, ring.name, "k2", rotation_period=timedelta(days=3),
                           next_rotation_time=when)
    assert explicit.next_rotation_time == when
    assert explicit.rotation_period == timedelta(days=3)
    # A next time alone rotates once (there is no default period to apply).
    once = _create_key(kms, ring.name, "k3", next_rotation_time=when)
    assert once.next_rotation_time == when
    assert not _pb(once).HasField("rotation_period")


@pytest.mark.parametrize("duration", [timedelta(days=1), timedelta(days=120),
                                      timedelta(days=45, hours=6)])
def test_destroy_scheduled_duration_accepted(kms: Client, key_ring: str,
                                             duration: timedelta) -> None:
    key = _create_key(kms, key_ring, destroy_scheduled_duration=duration)
    assert key.destroy_scheduled_duration == duration
    got = kms.get_crypto_key(request={"name": key.name}, **CALL)
    assert got.destroy_scheduled_duration == duration


@pytest.mark.parametrize("duration", [
    timedelta(days=1) - timedelta(seconds=1), timedelta(hours=1), timedelta(seconds=1),
    timedelta(days=120, seconds=1), timedelta(days=1000),
])
def test_destroy_scheduled_duration_out_of_bounds(kms: Client, key_ring: str,
                                                  duration: timedelta) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, destroy_scheduled_duration=duration)
    assert "destroy_scheduled_duration" in caught.value.message


GOOD_LABELS = [
    {"env": "prod"},
    {"a": ""},
    {"k" * 63: "v" * 63},
    {"a-b_c9": "0-_x"},
    {"v": "123"},
    {f"l{i}": str(i) for i in range(64)},
    {"ключ": "значение"},  # international lowercase letters are allowed, as in Google Cloud
]
BAD_LABELS = [
    {"Ключ": "x"},
    {"Env": "prod"},
    {"1env": "prod"},
    {"_env": "prod"},
    {"-env": "prod"},
    {"": "x"},
    {"k" * 64: "v"},
    {"env": "v" * 64},
    {"env": "Prod"},
    {"env": "a.b"},
    {"env": "a b"},
    {"e.nv": "x"},
    {"env/x": "x"},
    {f"l{i}": str(i) for i in range(65)},
]


@pytest.mark.parametrize("labels", GOOD_LABELS)
def test_valid_labels(kms: Client, key_ring: str, labels: dict[str, str]) -> None:
    key = _create_key(kms, key_ring, labels=labels)
    assert dict(key.labels) == labels
    assert dict(kms.get_crypto_key(request={"name": key.name}, **CALL).labels) == labels


@pytest.mark.parametrize("labels", BAD_LABELS)
def test_invalid_labels(kms: Client, key_ring: str, labels: dict[str, str]) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _create_key(kms, key_ring, labels=labels)
    assert "label" in caught.value.message
    with pytest.raises(gexc.NotFound):
        kms.get_crypto_key(request={"name": f"{key_ring}/cryptoKeys/k"}, **CALL)


def test_version_ids_are_never_reused(kms: Client, crypto_key: str) -> None:
    created = [kms.create_crypto_key_version(
        request={"parent": crypto_key, "crypto_key_version": {}}, **CALL).name
        for _ in range(3)]
    assert [n.rsplit("/", 1)[1] for n in created] == ["2", "3", "4"]
    kms.destroy_crypto_key_version(request={"name": created[-1]}, **CALL)
    nxt = kms.create_crypto_key_version(
        request={"parent": crypto_key, "crypto_key_version": {}}, **CALL)
    assert nxt.name.endswith("/cryptoKeyVersions/5")
    assert _versions(kms, crypto_key) == ["1", "2", "3", "4", "5"]


# ---- UpdateCryptoKey --------------------------------------------------------------------------


def _update(kms: Client, name: str, paths: list[str] | None, **fields: Any) -> kms_v1.CryptoKey:
    request: dict[str, Any] = {"crypto_key": {"name": name, **fields}}
    if paths is not None:
        request["update_mask"] = {"paths": paths}
    return kms.update_crypto_key(request=request, **CALL)


def test_update_mask_is_required(kms: Client, crypto_key: str) -> None:
    for paths in (None, []):
        with pytest.raises(gexc.InvalidArgument) as caught:
            _update(kms, crypto_key, paths, labels={"a": "b"})
        assert "update_mask" in caught.value.message
    assert dict(kms.get_crypto_key(request={"name": crypto_key}, **CALL).labels) == {}


@pytest.mark.parametrize("path", [
    "purpose", "destroy_scheduled_duration", "name", "primary", "create_time", "import_only",
    "version_template.protection_level", "bogus", "labels.env", "rotationPeriod", "",
])
def test_update_rejects_unknown_and_immutable_paths(kms: Client, crypto_key: str,
                                                    path: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["labels", path], labels={"a": "b"},
                destroy_scheduled_duration=timedelta(days=5))
    assert repr(path) in caught.value.message
    key = kms.get_crypto_key(request={"name": crypto_key}, **CALL)
    assert dict(key.labels) == {}
    assert key.destroy_scheduled_duration == timedelta(days=30)


def test_update_rotation_period_and_next_rotation_time(kms: Client, crypto_key: str) -> None:
    before = _pb(kms.get_crypto_key(request={"name": crypto_key}, **CALL))
    key = _update(kms, crypto_key, ["rotation_period"], rotation_period=timedelta(days=7))
    assert key.rotation_period == timedelta(days=7)
    assert _pb(key).next_rotation_time == before.next_rotation_time  # not in the mask
    when = datetime.now(UTC).replace(microsecond=5) + timedelta(days=3)
    key = _update(kms, crypto_key, ["next_rotation_time"], next_rotation_time=when)
    assert _pb(key).next_rotation_time.ToDatetime(tzinfo=UTC) == when
    assert key.rotation_period == timedelta(days=7)
    got = _pb(kms.get_crypto_key(request={"name": crypto_key}, **CALL))
    assert got.next_rotation_time.ToDatetime(tzinfo=UTC) == when
    assert _dur_micros(got.rotation_period) == 7 * 86_400 * 1_000_000
    assert got.create_time == before.create_time
    assert got.primary == before.primary


def test_update_can_disable_rotation(kms: Client, crypto_key: str) -> None:
    key = _update(kms, crypto_key, ["rotation_period", "next_rotation_time"])
    assert not _pb(key).HasField("rotation_period")
    assert not _pb(key).HasField("next_rotation_time")
    got = _pb(kms.get_crypto_key(request={"name": crypto_key}, **CALL))
    assert not got.HasField("rotation_period") and not got.HasField("next_rotation_time")


def test_update_cannot_leave_a_period_without_a_next_rotation_time(kms: Client,
                                                                  crypto_key: str) -> None:
    _update(kms, crypto_key, ["rotation_period", "next_rotation_time"])  # rotation off
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["rotation_period"], rotation_period=timedelta(days=7))
    assert "next_rotation_time" in caught.value.message
    assert not _pb(kms.get_crypto_key(request={"name": crypto_key}, **CALL)).HasField(
        "rotation_period")
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    key = _update(kms, crypto_key, ["rotation_period", "next_rotation_time"],
                  rotation_period=timedelta(days=7), next_rotation_time=when)
    assert key.rotation_period == timedelta(days=7)
    # Removing only the next time while a period remains is refused too.
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["next_rotation_time"])
    assert "next_rotation_time" in caught.value.message
    # A one-off rotation (a next time, no period) is fine.
    one_off = _update(kms, crypto_key, ["rotation_period"])
    assert not _pb(one_off).HasField("rotation_period")
    assert _pb(one_off).next_rotation_time.ToDatetime(tzinfo=UTC) == when


@pytest.mark.parametrize("period", [timedelta(hours=1), timedelta(0),
                                    timedelta(days=36_501)])
def test_update_with_invalid_rotation_period(kms: Client, crypto_key: str,
                                             period: timedelta) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["rotation_period"], rotation_period=period)
    assert "rotation_period" in caught.value.message
    assert kms.get_crypto_key(request={"name": crypto_key}, **CALL).rotation_period == (
        timedelta(days=30))


def test_update_labels_replaces_the_map(kms: Client, key_ring: str) -> None:
    key = _create_key(kms, key_ring, labels={"a": "1", "b": "2"})
    updated = _update(kms, key.name, ["labels"], labels={"c": "3"})
    assert dict(updated.labels) == {"c": "3"}
    cleared = _update(kms, key.name, ["labels"])
    assert dict(cleared.labels) == {}
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, key.name, ["labels"], labels={"Bad": "x"})
    assert "Bad" in caught.value.message
    assert dict(kms.get_crypto_key(request={"name": key.name}, **CALL).labels) == {}


def test_update_version_template_algorithm(kms: Client, crypto_key: str) -> None:
    key = _update(kms, crypto_key, ["version_template.algorithm"],
                  version_template={"algorithm": Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION})
    assert key.version_template.algorithm == Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["version_template.algorithm"],
                version_template={"algorithm": Algorithm.RSA_SIGN_PSS_2048_SHA256})
    assert "RSA_SIGN_PSS_2048_SHA256" in caught.value.message


def test_update_cannot_change_protection_level(kms: Client, crypto_key: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _update(kms, crypto_key, ["version_template"],
                version_template={"algorithm": Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                                  "protection_level": kms_v1.ProtectionLevel.HSM})
    assert "protection_level" in caught.value.message
    key = kms.get_crypto_key(request={"name": crypto_key}, **CALL)
    assert key.version_template.protection_level == kms_v1.ProtectionLevel.SOFTWARE
    # Restating the current level is not a change.
    same = _update(kms, crypto_key, ["version_template"],
                   version_template={"algorithm": Algorithm.GOOGLE_SYMMETRIC_ENCRYPTION,
                                     "protection_level": kms_v1.ProtectionLevel.SOFTWARE})
    assert same.version_template.protection_level == kms_v1.ProtectionLevel.SOFTWARE


def test_update_missing_key_is_not_found(kms: Client, key_ring: str) -> None:
    with pytest.raises(gexc.NotFound):
        _update(kms, f"{key_ring}/cryptoKeys/missing", ["labels"], labels={"a": "b"})
    with pytest.raises(gexc.InvalidArgument):
        _update(kms, f"{key_ring}/cryptoKey/missing", ["labels"], labels={"a": "b"})


# ---- durability -------------------------------------------------------------------------------


def test_everything_survives_a_restart(fresh_central: CentralProcess) -> None:
    kms = fresh_central.client()
    location = "projects/durable/locations/global"
    ring = kms.create_key_ring(request={"parent": location, "key_ring_id": "r", "key_ring": {}},
                               **CALL)
    key = _create_key(kms, ring.name, labels={"env": "prod"},
                      destroy_scheduled_duration=timedelta(days=2))
    v2 = kms.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}},
                                       **CALL)
    kms.update_crypto_key_version(request={
        "crypto_key_version": {"name": key.primary.name, "state": State.ENABLED},
        "update_mask": {"paths": ["state"]}}, **CALL)
    ct1 = _encrypt(kms, key.name, b"before restart").ciphertext
    kms.update_crypto_key_primary_version(
        request={"name": key.name, "crypto_key_version_id": "2"}, **CALL)
    ct2 = _encrypt(kms, key.name, b"second").ciphertext
    kms.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}}, **CALL)
    destroyed = kms.destroy_crypto_key_version(
        request={"name": f"{key.name}/cryptoKeyVersions/3"}, **CALL)
    before_key = _pb(kms.get_crypto_key(request={"name": key.name}, **CALL))
    before_ring = kms_v1.KeyRing.pb(kms.get_key_ring(request={"name": ring.name}, **CALL))
    first_page = kms.list_crypto_key_versions(request={"parent": key.name, "page_size": 2},
                                              **CALL)
    assert first_page.next_page_token
    kms.transport.close()

    fresh_central.restart()
    kms = fresh_central.client()
    assert kms_v1.KeyRing.pb(kms.get_key_ring(request={"name": ring.name}, **CALL)) == (
        before_ring)
    after_key = _pb(kms.get_crypto_key(request={"name": key.name}, **CALL))
    assert after_key == before_key
    assert after_key.primary.name == v2.name
    assert _decrypt(kms, key.name, ct1) == b"before restart"
    assert _decrypt(kms, key.name, ct2) == b"second"
    v3 = kms.get_crypto_key_version(request={"name": destroyed.name}, **CALL)
    assert v3.state == State.DESTROY_SCHEDULED
    assert kms_v1.CryptoKeyVersion.pb(v3).destroy_time == kms_v1.CryptoKeyVersion.pb(
        destroyed).destroy_time
    # Ids continue: the next version is 4, not a reused 3.
    v4 = kms.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}},
                                       **CALL)
    assert v4.name == f"{key.name}/cryptoKeyVersions/4"
    assert _versions(kms, key.name) == ["1", "2", "3", "4"]
    with pytest.raises(gexc.AlreadyExists):
        _create_key(kms, ring.name)
    # A page token issued before the restart still continues the listing.
    rest = kms.list_crypto_key_versions(request={
        "parent": key.name, "page_size": 2, "page_token": first_page.next_page_token}, **CALL)
    assert [v.name.rsplit("/", 1)[1] for v in rest.crypto_key_versions] == ["3", "4"]
    kms.transport.close()


def test_a_next_rotation_time_at_the_unix_epoch_is_kept(kms: Client, key_ring: str) -> None:
    """0 microseconds is a time like any other (records keep presence explicitly)."""
    epoch = timestamp_pb2.Timestamp(seconds=0)
    key = _create_key(kms, key_ring, next_rotation_time=epoch,
                      rotation_period=duration_pb2.Duration(seconds=86400))
    assert key.next_rotation_time == datetime(1970, 1, 1, tzinfo=UTC)
    got = kms.get_crypto_key(request={"name": key.name}, **CALL)
    assert got.next_rotation_time == datetime(1970, 1, 1, tzinfo=UTC)
    updated = kms.update_crypto_key(
        request={"crypto_key": {"name": key.name, "labels": {"a": "b"}},
                 "update_mask": {"paths": ["labels"]}}, **CALL)
    assert updated.labels == {"a": "b"}
