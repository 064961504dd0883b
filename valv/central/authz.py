"""The Authorizer: every call's permission, checked in one place.

The call guard (valv.central.calls) calls ``authorize`` as soon as the request
message is read, before any handler code runs. The permission and the
resource come from the table in valv.central.permissions; the policies from
valv.core.iam.

- Dev mode (no authentication configured: the caller's method is "dev"):
  everything is allowed. The IAM mixin still stores and returns policies.
- Otherwise a call without the permission is PERMISSION_DENIED, with the same
  message whether or not the resource exists, so a caller who may not read a
  resource can't learn whether it exists. A caller who may gets the
  handler's NOT_FOUND.
- The sidecars' private service (valv.sidecar.v1) first needs
  ``valv.sidecar.connect`` in the root policy, whatever the request.
"""

from __future__ import annotations

from typing import Any

from valv.central import permissions
from valv.core import iam
from valv.core.calls import CallContext
from valv.core.errors import PermissionDenied
from valv.core.iam import IamPolicies

DEV_METHOD = "dev"


def is_dev(call: CallContext) -> bool:
    return call.principal.method == DEV_METHOD


def denied(permission: str, resource: str) -> PermissionDenied:
    return PermissionDenied(
        f"Permission '{permission}' denied on resource '{resource}' (or it may not exist).")


class IamAuthorizer:
    def __init__(self, policies: IamPolicies) -> None:
        self.policies = policies

    async def authorize(self, call: CallContext, request: Any) -> None:
        if is_dev(call):
            return
        if permissions.sidecar_only(call.rpc) and not self.policies.root_allows(
                call.principal.member, iam.SIDECAR_CONNECT):
            raise PermissionDenied(
                f"Permission '{iam.SIDECAR_CONNECT}' denied: {call.rpc} is for Valv sidecars "
                f"only, and {call.principal.member} is not one. To run a sidecar as this "
                f"identity, grant it {iam.SIDECAR_ROLE} in the root policy "
                "(--root-policy-file); applications call Encrypt and Decrypt instead.")
        check = permissions.required(call.rpc, request)
        if check is None:
            return
        if not await self.policies.allowed(call.principal.member, check.resource,
                                           check.permission):
            raise denied(check.permission, check.name)
