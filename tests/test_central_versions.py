"""CryptoKeyVersions through Google's official client against a real central.

Creation, the ENABLED/DISABLED/DESTROY_SCHEDULED state machine, destroy and restore,
and primary version changes, with what Encrypt/Decrypt then do.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1

from tests.helpers import CALL

Client = kms_v1.KeyManagementServiceClient
ENCRYPT_DECRYPT = kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
State = kms_v1.CryptoKeyVersion.CryptoKeyVersionState
# The server runs on this machine: its clock and ours agree to well within this.
CLOCK_SLACK = timedelta(seconds=2)


def _new_version(kms: Client, key: str) -> kms_v1.CryptoKeyVersion:
    return kms.create_crypto_key_version(request={"parent": key, "crypto_key_version": {}},
                                         **CALL)


def _set_state(kms: Client, name: str, state: Any, paths: list[str] | None = None
               ) -> kms_v1.CryptoKeyVersion:
    return kms.update_crypto_key_version(request={
        "crypto_key_version": {"name": name, "state": state},
        "update_mask": {"paths": ["state"] if paths is None else paths}}, **CALL)


def _get(kms: Client, name: str) -> kms_v1.CryptoKeyVersion:
    return kms.get_crypto_key_version(request={"name": name}, **CALL)


def _primary(kms: Client, key: str) -> str:
    return kms.get_crypto_key(request={"name": key}, **CALL).primary.name


def _encrypt(kms: Client, name: str, plaintext: bytes = b"data") -> kms_v1.EncryptResponse:
    return kms.encrypt(request={"name": name, "plaintext": plaintext}, **CALL)


def _decrypt(kms: Client, key: str, ciphertext: bytes) -> kms_v1.DecryptResponse:
    return kms.decrypt(request={"name": key, "ciphertext": ciphertext}, **CALL)


def _has(version: kms_v1.CryptoKeyVersion, field: str) -> bool:
    return kms_v1.CryptoKeyVersion.pb(version).HasField(field)


def _v(key: str, n: int) -> str:
    return f"{key}/cryptoKeyVersions/{n}"


# ---- creation -------------------------------------------------------------------------------


def test_create_version_numbers_and_does_not_change_primary(kms: Client,
                                                            crypto_key: str) -> None:
    v2 = _new_version(kms, crypto_key)
    v3 = _new_version(kms, crypto_key)
    assert (v2.name, v3.name) == (_v(crypto_key, 2), _v(crypto_key, 3))
    for v in (v2, v3):
        assert v.state == State.ENABLED
        assert v.algorithm == kms_v1.CryptoKeyVersion.CryptoKeyVersionAlgorithm.\
            GOOGLE_SYMMETRIC_ENCRYPTION
        assert v.protection_level == kms_v1.ProtectionLevel.SOFTWARE
        assert _has(v, "create_time") and _has(v, "generate_time")
        assert not _has(v, "destroy_time")
        assert kms_v1.CryptoKeyVersion.pb(_get(kms, v.name)) == kms_v1.CryptoKeyVersion.pb(v)
    # Cloud KMS does not make a new symmetric version primary; neither does Valv.
    assert _primary(kms, crypto_key) == _v(crypto_key, 1)
    assert _encrypt(kms, crypto_key).name == _v(crypto_key, 1)
    # A new version can be used explicitly, and decrypts through the key.
    ct = _encrypt(kms, v3.name, b"via v3")
    assert ct.name == v3.name
    out = _decrypt(kms, crypto_key, ct.ciphertext)
    assert out.plaintext == b"via v3" and not out.used_primary


def test_concurrent_creates_get_distinct_ids(kms: Client, crypto_key: str) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        names = list(pool.map(lambda _: _new_version(kms, crypto_key).name, range(24)))
    assert sorted(names, key=lambda n: int(n.rsplit("/", 1)[1])) == [
        _v(crypto_key, n) for n in range(2, 26)]
    listed = [v.name for v in kms.list_crypto_key_versions(request={"parent": crypto_key},
                                                           **CALL)]
    assert listed == [_v(crypto_key, n) for n in range(1, 26)]


# ---- ENABLED <-> DISABLED ---------------------------------------------------------------------


def test_disable_and_enable(kms: Client, crypto_key: str) -> None:
    v2 = _new_version(kms, crypto_key)
    ct = _encrypt(kms, v2.name).ciphertext
    disabled = _set_state(kms, v2.name, State.DISABLED)
    assert disabled.state == State.DISABLED
    assert _get(kms, v2.name).state == State.DISABLED
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _encrypt(kms, v2.name)
    assert "DISABLED" in caught.value.message
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _decrypt(kms, crypto_key, ct)
    assert v2.name in caught.value.message
    # Disabling twice is fine (idempotent), and enabling brings it back.
    assert _set_state(kms, v2.name, State.DISABLED).state == State.DISABLED
    assert _set_state(kms, v2.name, State.ENABLED).state == State.ENABLED
    assert _get(kms, v2.name).state == State.ENABLED
    assert _decrypt(kms, crypto_key, ct).plaintext == b"data"


@pytest.mark.parametrize("state", ["DESTROYED", "DESTROY_SCHEDULED", "CRYPTO_KEY_VERSION_STATE_"
                                   "UNSPECIFIED", "PENDING_GENERATION", "IMPORT_FAILED"])
def test_update_cannot_set_other_states(kms: Client, crypto_key: str, state: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _set_state(kms, _v(crypto_key, 1), State[state])
    assert "state" in caught.value.message
    assert _get(kms, _v(crypto_key, 1)).state == State.ENABLED


@pytest.mark.parametrize("paths", [[], ["algorithm"], ["bogus"], ["state", "algorithm"],
                                   ["protection_level"], ["destroy_time"], ["name"]])
def test_update_version_mask_must_be_exactly_state(kms: Client, crypto_key: str,
                                                   paths: list[str]) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        _set_state(kms, _v(crypto_key, 1), State.DISABLED, paths)
    assert "update_mask" in caught.value.message or repr(paths[-1]) in caught.value.message
    assert _get(kms, _v(crypto_key, 1)).state == State.ENABLED


def test_update_version_without_mask(kms: Client, crypto_key: str) -> None:
    with pytest.raises(gexc.InvalidArgument) as caught:
        kms.update_crypto_key_version(request={
            "crypto_key_version": {"name": _v(crypto_key, 1), "state": State.DISABLED}}, **CALL)
    assert "update_mask" in caught.value.message
    assert _get(kms, _v(crypto_key, 1)).state == State.ENABLED


def test_update_missing_version_is_not_found(kms: Client, crypto_key: str) -> None:
    with pytest.raises(gexc.NotFound):
        _set_state(kms, _v(crypto_key, 7), State.DISABLED)
    with pytest.raises(gexc.InvalidArgument):
        _set_state(kms, _v(crypto_key, 0), State.DISABLED)


# ---- destroy and restore ----------------------------------------------------------------------


def _assert_destroy_time(version: kms_v1.CryptoKeyVersion, called_at: datetime,
                         returned_at: datetime, duration: timedelta) -> None:
    destroy_time = kms_v1.CryptoKeyVersion.pb(version).destroy_time.ToDatetime(tzinfo=UTC)
    assert called_at + duration - CLOCK_SLACK <= destroy_time
    assert destroy_time <= returned_at + duration + CLOCK_SLACK


def test_destroy_schedules_with_the_default_duration(kms: Client, crypto_key: str) -> None:
    called_at = datetime.now(UTC)
    scheduled = kms.destroy_crypto_key_version(request={"name": _v(crypto_key, 1)}, **CALL)
    returned_at = datetime.now(UTC)
    assert scheduled.state == State.DESTROY_SCHEDULED
    _assert_destroy_time(scheduled, called_at, returned_at, timedelta(days=30))
    got = _get(kms, scheduled.name)
    assert got.state == State.DESTROY_SCHEDULED
    assert (kms_v1.CryptoKeyVersion.pb(got).destroy_time
            == kms_v1.CryptoKeyVersion.pb(scheduled).destroy_time)
    # It was the primary: encrypting with the key now fails, and says why.
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _encrypt(kms, crypto_key)
    assert "DESTROY_SCHEDULED" in caught.value.message


@pytest.mark.parametrize("duration", [timedelta(days=1), timedelta(days=3, hours=5),
                                      timedelta(days=120)])
def test_destroy_uses_the_keys_duration(kms: Client, key_ring: str,
                                        duration: timedelta) -> None:
    key = kms.create_crypto_key(request={
        "parent": key_ring, "crypto_key_id": "custom",
        "crypto_key": {"purpose": ENCRYPT_DECRYPT, "destroy_scheduled_duration": duration}},
        **CALL)
    called_at = datetime.now(UTC)
    scheduled = kms.destroy_crypto_key_version(request={"name": key.primary.name}, **CALL)
    returned_at = datetime.now(UTC)
    _assert_destroy_time(scheduled, called_at, returned_at, duration)


def test_destroy_twice_is_failed_precondition(kms: Client, crypto_key: str) -> None:
    name = _v(crypto_key, 1)
    first = kms.destroy_crypto_key_version(request={"name": name}, **CALL)
    with pytest.raises(gexc.FailedPrecondition) as caught:
        kms.destroy_crypto_key_version(request={"name": name}, **CALL)
    assert "DESTROY_SCHEDULED" in caught.value.message
    # The failed second call did not push destroy_time back.
    assert (kms_v1.CryptoKeyVersion.pb(_get(kms, name)).destroy_time
            == kms_v1.CryptoKeyVersion.pb(first).destroy_time)


def test_destroy_a_disabled_version(kms: Client, crypto_key: str) -> None:
    v2 = _new_version(kms, crypto_key)
    _set_state(kms, v2.name, State.DISABLED)
    assert kms.destroy_crypto_key_version(request={"name": v2.name}, **CALL).state == (
        State.DESTROY_SCHEDULED)


def test_restore(kms: Client, crypto_key: str) -> None:
    v2 = _new_version(kms, crypto_key)
    ct = _encrypt(kms, v2.name, b"restored").ciphertext
    kms.destroy_crypto_key_version(request={"name": v2.name}, **CALL)
    restored = kms.restore_crypto_key_version(request={"name": v2.name}, **CALL)
    assert restored.state == State.DISABLED
    assert not _has(restored, "destroy_time")
    got = _get(kms, v2.name)
    assert got.state == State.DISABLED and not _has(got, "destroy_time")
    # Restored material is intact: enable it and the old ciphertext decrypts.
    _set_state(kms, v2.name, State.ENABLED)
    assert _decrypt(kms, crypto_key, ct).plaintext == b"restored"


def test_restore_needs_a_scheduled_version(kms: Client, crypto_key: str) -> None:
    with pytest.raises(gexc.FailedPrecondition) as caught:
        kms.restore_crypto_key_version(request={"name": _v(crypto_key, 1)}, **CALL)
    assert "ENABLED" in caught.value.message
    _set_state(kms, _v(crypto_key, 1), State.DISABLED)
    with pytest.raises(gexc.FailedPrecondition):
        kms.restore_crypto_key_version(request={"name": _v(crypto_key, 1)}, **CALL)
    assert _get(kms, _v(crypto_key, 1)).state == State.DISABLED


def test_update_of_a_scheduled_version_is_failed_precondition(kms: Client,
                                                              crypto_key: str) -> None:
    name = _v(crypto_key, 1)
    kms.destroy_crypto_key_version(request={"name": name}, **CALL)
    for state in (State.ENABLED, State.DISABLED):
        with pytest.raises(gexc.FailedPrecondition) as caught:
            _set_state(kms, name, state)
        assert "DESTROY_SCHEDULED" in caught.value.message
    assert _get(kms, name).state == State.DESTROY_SCHEDULED


def test_destroy_and_restore_of_missing_versions(kms: Client, crypto_key: str,
                                                 key_ring: str) -> None:
    for call in (kms.destroy_crypto_key_version, kms.restore_crypto_key_version):
        with pytest.raises(gexc.NotFound):
            call(request={"name": _v(crypto_key, 9)}, **CALL)
        with pytest.raises(gexc.NotFound):
            call(request={"name": f"{key_ring}/cryptoKeys/nope/cryptoKeyVersions/1"}, **CALL)
        with pytest.raises(gexc.InvalidArgument):
            call(request={"name": crypto_key}, **CALL)


# ---- primary version ---------------------------------------------------------------------------


def _set_primary(kms: Client, key: str, version_id: str) -> kms_v1.CryptoKey:
    return kms.update_crypto_key_primary_version(
        request={"name": key, "crypto_key_version_id": version_id}, **CALL)


def test_change_primary(kms: Client, crypto_key: str) -> None:
    old = _encrypt(kms, crypto_key, b"old").ciphertext
    v2 = _new_version(kms, crypto_key)
    updated = _set_primary(kms, crypto_key, "2")
    assert updated.primary.name == v2.name
    assert updated.primary.state == State.ENABLED
    assert _primary(kms, crypto_key) == v2.name
    response = _encrypt(kms, crypto_key, b"new")
    assert response.name == v2.name
    new_out = _decrypt(kms, crypto_key, response.ciphertext)
    assert new_out.plaintext == b"new" and new_out.used_primary
    old_out = _decrypt(kms, crypto_key, old)
    assert old_out.plaintext == b"old" and not old_out.used_primary
    # And back again.
    assert _set_primary(kms, crypto_key, "1").primary.name == _v(crypto_key, 1)
    assert _encrypt(kms, crypto_key).name == _v(crypto_key, 1)


def test_primary_must_be_enabled(kms: Client, crypto_key: str) -> None:
    v2 = _new_version(kms, crypto_key)
    _set_state(kms, v2.name, State.DISABLED)
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _set_primary(kms, crypto_key, "2")
    assert "DISABLED" in caught.value.message
    v3 = _new_version(kms, crypto_key)
    kms.destroy_crypto_key_version(request={"name": v3.name}, **CALL)
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _set_primary(kms, crypto_key, "3")
    assert "DESTROY_SCHEDULED" in caught.value.message
    assert _primary(kms, crypto_key) == _v(crypto_key, 1)


def test_primary_to_missing_or_malformed_version(kms: Client, crypto_key: str,
                                                 key_ring: str) -> None:
    with pytest.raises(gexc.NotFound):
        _set_primary(kms, crypto_key, "2")
    for bad in ("0", "01", "abc", "-1", ""):
        with pytest.raises(gexc.InvalidArgument) as caught:
            _set_primary(kms, crypto_key, bad)
        assert "crypto_key_version_id" in caught.value.message
    with pytest.raises(gexc.NotFound):
        _set_primary(kms, f"{key_ring}/cryptoKeys/nope", "1")
    assert _primary(kms, crypto_key) == _v(crypto_key, 1)


def test_encrypt_with_disabled_primary(kms: Client, crypto_key: str) -> None:
    ct = _encrypt(kms, crypto_key).ciphertext
    _set_state(kms, _v(crypto_key, 1), State.DISABLED)
    # Still the primary, but not usable.
    assert _primary(kms, crypto_key) == _v(crypto_key, 1)
    with pytest.raises(gexc.FailedPrecondition) as caught:
        _encrypt(kms, crypto_key)
    assert "primary" in caught.value.message and "DISABLED" in caught.value.message
    with pytest.raises(gexc.FailedPrecondition):
        _decrypt(kms, crypto_key, ct)
    _set_state(kms, _v(crypto_key, 1), State.ENABLED)
    assert _decrypt(kms, crypto_key, ct).plaintext == b"data"


def test_crypto_key_reports_the_primarys_current_state(kms: Client, crypto_key: str) -> None:
    _set_state(kms, _v(crypto_key, 1), State.DISABLED)
    assert kms.get_crypto_key(request={"name": crypto_key}, **CALL).primary.state == (
        State.DISABLED)
