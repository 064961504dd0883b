"""The keystore's domain objects: KeyRing, CryptoKey, CryptoKeyVersion.

Enum values equal Cloud KMS's wire numbers, so the adapters convert by value.
Only the values that Valv reasons about are named here; any other wire value
is carried as a plain int and rejected with a clear message where unsupported.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from valv.core.names import CryptoKeyName, CryptoKeyVersionName, KeyRingName


class Purpose(enum.IntEnum):
    UNSPECIFIED = 0
    ENCRYPT_DECRYPT = 1
    ASYMMETRIC_SIGN = 5
    ASYMMETRIC_DECRYPT = 6
    RAW_ENCRYPT_DECRYPT = 7
    MAC = 9
    KEY_ENCAPSULATION = 10
    AES_WRAPPING = 11


class Algorithm(enum.IntEnum):
    # CryptoKeyVersionAlgorithm, all values, so messages can name any of them.
    UNSPECIFIED = 0
    GOOGLE_SYMMETRIC_ENCRYPTION = 1
    AES_128_GCM = 41
    AES_256_GCM = 19
    AES_128_CBC = 42
    AES_256_CBC = 43
    AES_128_CTR = 44
    AES_256_CTR = 45
    RSA_SIGN_PSS_2048_SHA256 = 2
    RSA_SIGN_PSS_3072_SHA256 = 3
    RSA_SIGN_PSS_4096_SHA256 = 4
    RSA_SIGN_PSS_4096_SHA512 = 15
    RSA_SIGN_PKCS1_2048_SHA256 = 5
    RSA_SIGN_PKCS1_3072_SHA256 = 6
    RSA_SIGN_PKCS1_4096_SHA256 = 7
    RSA_SIGN_PKCS1_4096_SHA512 = 16
    RSA_SIGN_RAW_PKCS1_2048 = 28
    RSA_SIGN_RAW_PKCS1_3072 = 29
    RSA_SIGN_RAW_PKCS1_4096 = 30
    RSA_DECRYPT_OAEP_2048_SHA256 = 8
    RSA_DECRYPT_OAEP_3072_SHA256 = 9
    RSA_DECRYPT_OAEP_4096_SHA256 = 10
    RSA_DECRYPT_OAEP_4096_SHA512 = 17
    RSA_DECRYPT_OAEP_2048_SHA1 = 37
    RSA_DECRYPT_OAEP_3072_SHA1 = 38
    RSA_DECRYPT_OAEP_4096_SHA1 = 39
    EC_SIGN_P256_SHA256 = 12
    EC_SIGN_P384_SHA384 = 13
    EC_SIGN_SECP256K1_SHA256 = 31
    EC_SIGN_ED25519 = 40
    HMAC_SHA256 = 32
    HMAC_SHA1 = 33
    HMAC_SHA384 = 34
    HMAC_SHA512 = 35
    HMAC_SHA224 = 36
    EXTERNAL_SYMMETRIC_ENCRYPTION = 18
    ML_KEM_768 = 47
    ML_KEM_1024 = 48
    KEM_XWING = 63
    PQ_SIGN_ML_DSA_44 = 68
    PQ_SIGN_ML_DSA_65 = 56
    PQ_SIGN_ML_DSA_87 = 69
    PQ_SIGN_SLH_DSA_SHA2_128S = 57
    PQ_SIGN_HASH_SLH_DSA_SHA2_128S_SHA256 = 60
    PQ_SIGN_ML_DSA_44_EXTERNAL_MU = 70
    PQ_SIGN_ML_DSA_65_EXTERNAL_MU = 67
    PQ_SIGN_ML_DSA_87_EXTERNAL_MU = 71
    AES_256_KWP = 73


class ProtectionLevel(enum.IntEnum):
    UNSPECIFIED = 0
    SOFTWARE = 1
    HSM = 2
    EXTERNAL = 3
    EXTERNAL_VPC = 4
    HSM_SINGLE_TENANT = 5


class VersionState(enum.IntEnum):
    UNSPECIFIED = 0
    ENABLED = 1
    DISABLED = 2
    DESTROYED = 3
    DESTROY_SCHEDULED = 4
    PENDING_GENERATION = 5
    PENDING_IMPORT = 6
    IMPORT_FAILED = 7
    GENERATION_FAILED = 8
    PENDING_EXTERNAL_DESTRUCTION = 9
    EXTERNAL_DESTRUCTION_FAILED = 10


def enum_name(enum_type: type[enum.IntEnum], value: int) -> str:
    """A readable name for a wire enum value, known to Valv or not."""
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


@dataclass(frozen=True, slots=True)
class KeyRing:
    name: KeyRingName
    create_time: datetime


@dataclass(frozen=True, slots=True)
class CryptoKeyVersion:
    name: CryptoKeyVersionName
    state: VersionState
    algorithm: int
    protection_level: int
    create_time: datetime
    generate_time: datetime | None = None
    destroy_time: datetime | None = None
    destroy_event_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class CryptoKey:
    name: CryptoKeyName
    purpose: int
    create_time: datetime
    template_algorithm: int
    template_protection_level: int
    destroy_scheduled_duration: timedelta
    rotation_period: timedelta | None = None
    next_rotation_time: datetime | None = None
    labels: dict[str, str] = field(default_factory=dict)
    import_only: bool = False
    # The primary version, resolved at read time; None when the key has none.
    primary: CryptoKeyVersion | None = None
