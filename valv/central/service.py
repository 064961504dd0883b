"""google.cloud.kms.v1 KeyManagementService, Locations and IAMPolicy on grpclib.

Thin adapters: each handler turns the request into core arguments, calls the
KeyStore and turns the result into the response. Validation and semantics
live in core; what every call goes through (authentication, authorization,
audit, status mapping) lives in valv.central.calls.
"""

from __future__ import annotations

from typing import Any

import grpclib.const

from valv._proto.google.cloud.kms import v1 as kms_v1
from valv._proto.google.cloud.location import (
    GetLocationRequest,
    ListLocationsRequest,
    ListLocationsResponse,
    Location,
    LocationsBase,
)
from valv._proto.google.iam import v1 as iam_v1
from valv._proto.google.iam.v1 import IamPolicyBase
from valv._proto.google.longrunning import OperationsBase
from valv.central import convert
from valv.central.authz import is_dev
from valv.central.calls import Calls
from valv.core import iam
from valv.core.calls import current_call
from valv.core.envelope import crc32c
from valv.core.errors import InvalidArgument, NotFound, Unimplemented
from valv.core.iam import IamPolicies
from valv.core.keystore import CryptoKeyUpdate, KeyStore, NewCryptoKey

SOFTWARE = kms_v1.ProtectionLevel.SOFTWARE


class KeyManagementService(kms_v1.KeyManagementServiceBase):
    def __init__(self, keystore: KeyStore, calls: Calls) -> None:
        self._ks = keystore
        self._calls = calls

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._calls.guard_mapping(super().__mapping__())

    # ---- key rings ---------------------------------------------------------

    async def create_key_ring(self, message: kms_v1.CreateKeyRingRequest) -> kms_v1.KeyRing:
        ring = await self._ks.create_key_ring(message.parent, message.key_ring_id)
        return convert.key_ring(ring)

    async def get_key_ring(self, message: kms_v1.GetKeyRingRequest) -> kms_v1.KeyRing:
        return convert.key_ring(await self._ks.get_key_ring(message.name))

    async def list_key_rings(
        self, message: kms_v1.ListKeyRingsRequest
    ) -> kms_v1.ListKeyRingsResponse:
        page = await self._ks.list_key_rings(
            message.parent, page_size=message.page_size, page_token=message.page_token,
            filter_text=message.filter, order_by=message.order_by)
        return kms_v1.ListKeyRingsResponse(
            key_rings=[convert.key_ring(r) for r in page.items],
            next_page_token=page.next_page_token, total_size=page.total_size)

    # ---- crypto keys -------------------------------------------------------------

    async def create_crypto_key(self, message: kms_v1.CreateCryptoKeyRequest) -> kms_v1.CryptoKey:
        requested = message.crypto_key
        if requested is None:
            raise InvalidArgument("crypto_key is required (at least its purpose)")
        if requested.crypto_key_backend:
            raise Unimplemented("crypto_key_backend (dedicated HSM or EKM backends) is not "
                                "implemented")
        if requested.key_access_justifications_policy is not None:
            raise Unimplemented("key_access_justifications_policy is not implemented")
        if message.trusted_wrapping_enabled:
            raise Unimplemented("trusted_wrapping_enabled is not implemented")
        template = requested.version_template
        spec = NewCryptoKey(
            purpose=int(requested.purpose),
            template_algorithm=int(template.algorithm) if template else 0,
            template_protection_level=int(template.protection_level) if template else 0,
            rotation_period=requested.rotation_period,
            next_rotation_time=requested.next_rotation_time,
            labels=dict(requested.labels),
            import_only=requested.import_only,
            destroy_scheduled_duration=requested.destroy_scheduled_duration,
        )
        key = await self._ks.create_crypto_key(
            message.parent, message.crypto_key_id, spec,
            skip_initial_version_creation=message.skip_initial_version_creation)
        return convert.crypto_key(key)

    async def get_crypto_key(self, message: kms_v1.GetCryptoKeyRequest) -> kms_v1.CryptoKey:
        return convert.crypto_key(await self._ks.get_crypto_key(message.name))

    async def list_crypto_keys(
        self, message: kms_v1.ListCryptoKeysRequest
    ) -> kms_v1.ListCryptoKeysResponse:
        page = await self._ks.list_crypto_keys(
            message.parent, page_size=message.page_size, page_token=message.page_token,
            filter_text=message.filter, order_by=message.order_by)
        return kms_v1.ListCryptoKeysResponse(
            crypto_keys=[convert.crypto_key(k) for k in page.items],
            next_page_token=page.next_page_token, total_size=page.total_size)

    async def update_crypto_key(self, message: kms_v1.UpdateCryptoKeyRequest) -> kms_v1.CryptoKey:
        requested = message.crypto_key
        if requested is None:
            raise InvalidArgument("crypto_key is required")
        template = requested.version_template
        update = CryptoKeyUpdate(
            paths=list(message.update_mask.paths) if message.update_mask else [],
            rotation_period=requested.rotation_period,
            next_rotation_time=requested.next_rotation_time,
            labels=dict(requested.labels),
            template_algorithm=int(template.algorithm) if template else 0,
            template_protection_level=int(template.protection_level) if template else 0,
        )
        return convert.crypto_key(await self._ks.update_crypto_key(requested.name, update))

    async def update_crypto_key_primary_version(
        self, message: kms_v1.UpdateCryptoKeyPrimaryVersionRequest
    ) -> kms_v1.CryptoKey:
        key = await self._ks.update_primary_version(message.name, message.crypto_key_version_id)
        return convert.crypto_key(key)

    # ---- versions ----------------------------------------------------------------

    async def create_crypto_key_version(
        self, message: kms_v1.CreateCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        version = await self._ks.create_crypto_key_version(message.parent)
        return convert.crypto_key_version(version)

    async def get_crypto_key_version(
        self, message: kms_v1.GetCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        return convert.crypto_key_version(await self._ks.get_crypto_key_version(message.name))

    async def list_crypto_key_versions(
        self, message: kms_v1.ListCryptoKeyVersionsRequest
    ) -> kms_v1.ListCryptoKeyVersionsResponse:
        page = await self._ks.list_crypto_key_versions(
            message.parent, page_size=message.page_size, page_token=message.page_token,
            filter_text=message.filter, order_by=message.order_by)
        return kms_v1.ListCryptoKeyVersionsResponse(
            crypto_key_versions=[convert.crypto_key_version(v) for v in page.items],
            next_page_token=page.next_page_token, total_size=page.total_size)

    async def update_crypto_key_version(
        self, message: kms_v1.UpdateCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        requested = message.crypto_key_version
        if requested is None:
            raise InvalidArgument("crypto_key_version is required")
        version = await self._ks.update_crypto_key_version(
            requested.name, message.update_mask.paths if message.update_mask else [],
            int(requested.state))
        return convert.crypto_key_version(version)

    async def destroy_crypto_key_version(
        self, message: kms_v1.DestroyCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        version = await self._ks.destroy_crypto_key_version(message.name)
        return convert.crypto_key_version(version)

    async def restore_crypto_key_version(
        self, message: kms_v1.RestoreCryptoKeyVersionRequest
    ) -> kms_v1.CryptoKeyVersion:
        version = await self._ks.restore_crypto_key_version(message.name)
        return convert.crypto_key_version(version)

    # ---- cryptography ------------------------------------------------------------

    async def encrypt(self, message: kms_v1.EncryptRequest) -> kms_v1.EncryptResponse:
        result = await self._ks.encrypt(
            message.name, message.plaintext, message.additional_authenticated_data,
            plaintext_crc32c=message.plaintext_crc32c,
            aad_crc32c=message.additional_authenticated_data_crc32c)
        return kms_v1.EncryptResponse(
            name=str(result.version_name),
            ciphertext=result.ciphertext,
            ciphertext_crc32c=result.ciphertext_crc32c,
            verified_plaintext_crc32c=result.verified_plaintext_crc32c,
            verified_additional_authenticated_data_crc32c=result.verified_aad_crc32c,
            protection_level=SOFTWARE,
        )

    async def decrypt(self, message: kms_v1.DecryptRequest) -> kms_v1.DecryptResponse:
        result = await self._ks.decrypt(
            message.name, message.ciphertext, message.additional_authenticated_data,
            ciphertext_crc32c=message.ciphertext_crc32c,
            aad_crc32c=message.additional_authenticated_data_crc32c)
        return kms_v1.DecryptResponse(
            plaintext=result.plaintext, plaintext_crc32c=result.plaintext_crc32c,
            used_primary=result.used_primary, protection_level=SOFTWARE)

    async def generate_random_bytes(
        self, message: kms_v1.GenerateRandomBytesRequest
    ) -> kms_v1.GenerateRandomBytesResponse:
        data = self._ks.generate_random_bytes(
            message.location, message.length_bytes, int(message.protection_level))
        return kms_v1.GenerateRandomBytesResponse(data=data, data_crc32c=crc32c(data))


class LocationsService(LocationsBase):
    """The google.cloud.location.Locations mixin over the configured locations."""

    def __init__(self, keystore: KeyStore, calls: Calls) -> None:
        self._ks = keystore
        self._calls = calls

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._calls.guard_mapping(super().__mapping__())

    @staticmethod
    def _location(name: Any) -> Location:
        return Location(name=str(name), location_id=name.location, display_name=name.location)

    async def list_locations(self, message: ListLocationsRequest) -> ListLocationsResponse:
        names = self._ks.list_locations(message.name)
        return ListLocationsResponse(locations=[self._location(n) for n in names])

    async def get_location(self, message: GetLocationRequest) -> Location:
        return self._location(self._ks.get_location(message.name))


class IamPolicyService(IamPolicyBase):
    """The google.iam.v1.IAMPolicy mixin on KeyRings and CryptoKeys (valv.core.iam).

    Who may call what is decided by the Authorizer like for every RPC;
    TestIamPermissions needs no permission and reports the caller's own.
    """

    def __init__(self, policies: IamPolicies, calls: Calls) -> None:
        self._policies = policies
        self._calls = calls

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._calls.guard_mapping(super().__mapping__())

    @staticmethod
    def _policy(policy: iam.Policy) -> iam_v1.Policy:
        return iam_v1.Policy(
            version=1, etag=policy.etag,
            bindings=[iam_v1.Binding(role=b.role, members=list(b.members))
                      for b in policy.bindings])

    async def set_iam_policy(self, message: iam_v1.SetIamPolicyRequest) -> iam_v1.Policy:
        policy = message.policy
        if policy is None:
            raise InvalidArgument("policy is required")
        bindings = [iam.BindingInput(b.role, list(b.members), b.condition is not None)
                    for b in policy.bindings]
        written = await self._policies.set_policy(
            message.resource, bindings, etag=policy.etag, version=policy.version,
            has_audit_configs=bool(policy.audit_configs),
            update_mask=list(message.update_mask.paths) if message.update_mask else [])
        return self._policy(written)

    async def get_iam_policy(self, message: iam_v1.GetIamPolicyRequest) -> iam_v1.Policy:
        requested = message.options.requested_policy_version if message.options else 0
        if requested not in (0, 1, 3):
            raise InvalidArgument(
                f"options.requested_policy_version {requested} is invalid; use 0, 1 or 3")
        # Valv's policies have no conditions, so they are version 1 whatever is asked.
        return self._policy(await self._policies.get_policy(message.resource))

    async def test_iam_permissions(
        self, message: iam_v1.TestIamPermissionsRequest
    ) -> iam_v1.TestIamPermissionsResponse:
        for permission in message.permissions:
            if "*" in permission:
                raise InvalidArgument(
                    f"permission {permission!r} has a wildcard; name each permission")
        try:
            resource = iam.parse_policy_resource(message.resource)
        except NotFound:  # an import job: Valv has none, and a missing resource has none
            return iam_v1.TestIamPermissionsResponse()
        call = current_call.get()
        if call is not None and is_dev(call):
            granted = iam.ALL_PERMISSIONS  # dev mode: full rights
        else:
            member = call.principal.member if call is not None else ""
            granted = await self._policies.permissions(member, resource)
        return iam_v1.TestIamPermissionsResponse(
            permissions=[p for p in dict.fromkeys(message.permissions) if p in granted])


class OperationsService(OperationsBase):
    """The google.longrunning.Operations mixin Google's client exposes (get_operation).

    Valv has no long-running operations yet; serving the service gives a clear
    UNIMPLEMENTED naming the method rather than grpclib's "Method not found".
    """

    def __init__(self, calls: Calls) -> None:
        self._calls = calls

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return self._calls.guard_mapping(super().__mapping__())
