"""Conversions between core domain objects and google.cloud.kms.v1 messages."""

from __future__ import annotations

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv.core.model import CryptoKey, CryptoKeyVersion, KeyRing

__all__ = ["crypto_key", "crypto_key_version", "key_ring"]


def key_ring(ring: KeyRing) -> kms_v1.KeyRing:
    return kms_v1.KeyRing(name=str(ring.name), create_time=ring.create_time)


def crypto_key_version(version: CryptoKeyVersion) -> kms_v1.CryptoKeyVersion:
    return kms_v1.CryptoKeyVersion(
        name=str(version.name),
        state=kms_v1.CryptoKeyVersionCryptoKeyVersionState(int(version.state)),
        protection_level=kms_v1.ProtectionLevel(version.protection_level),
        algorithm=kms_v1.CryptoKeyVersionCryptoKeyVersionAlgorithm(version.algorithm),
        create_time=version.create_time,
        generate_time=version.generate_time,
        destroy_time=version.destroy_time,
        destroy_event_time=version.destroy_event_time,
    )


def crypto_key(key: CryptoKey) -> kms_v1.CryptoKey:
    return kms_v1.CryptoKey(
        name=str(key.name),
        primary=crypto_key_version(key.primary) if key.primary is not None else None,
        purpose=kms_v1.CryptoKeyCryptoKeyPurpose(key.purpose),
        create_time=key.create_time,
        next_rotation_time=key.next_rotation_time,
        rotation_period=key.rotation_period,
        version_template=kms_v1.CryptoKeyVersionTemplate(
            protection_level=kms_v1.ProtectionLevel(key.template_protection_level),
            algorithm=kms_v1.CryptoKeyVersionCryptoKeyVersionAlgorithm(key.template_algorithm),
        ),
        labels=dict(key.labels),
        import_only=key.import_only,
        destroy_scheduled_duration=key.destroy_scheduled_duration,
    )
