"""The IAMPolicy mixin through Google's official client, against a real central (dev mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.iam.v1 import policy_pb2
from google.protobuf import field_mask_pb2

from tests.helpers import CALL, STARTUP_DEADLINE_S

Client = kms_v1.KeyManagementServiceClient
ENC_DEC = "roles/cloudkms.cryptoKeyEncrypterDecrypter"


def test_set_get_test_round_trip(kms: Client, crypto_key: str) -> None:
    empty = kms.get_iam_policy(request={"resource": crypto_key}, **CALL)
    assert list(empty.bindings) == [] and empty.etag
    written = kms.set_iam_policy(request={"resource": crypto_key, "policy": {
        "bindings": [{"role": ENC_DEC, "members": ["serviceAccount:app@p.iam.example",
                                                   "user:alice@example.com"]},
                     {"role": "roles/cloudkms.viewer", "members": ["group:ops@example.com"]}],
        "etag": empty.etag}}, **CALL)
    assert written.version == 1
    assert written.etag not in (b"", empty.etag)
    assert [(b.role, list(b.members)) for b in written.bindings] == [
        (ENC_DEC, ["serviceAccount:app@p.iam.example", "user:alice@example.com"]),
        ("roles/cloudkms.viewer", ["group:ops@example.com"])]
    read = kms.get_iam_policy(request={"resource": crypto_key,
                                       "options": {"requested_policy_version": 3}}, **CALL)
    assert read == written
    # Dev mode: the caller (user:dev) has every permission.
    asked = ["cloudkms.cryptoKeyVersions.useToEncrypt", "cloudkms.cryptoKeys.setIamPolicy",
             "not.a.permission"]
    tested = kms.test_iam_permissions(request={"resource": crypto_key, "permissions": asked},
                                      **CALL)
    assert list(tested.permissions) == asked[:2]


def test_key_ring_policies_are_separate(kms: Client, key_ring: str, crypto_key: str) -> None:
    kms.set_iam_policy(request={"resource": key_ring, "policy": {
        "bindings": [{"role": "roles/cloudkms.admin", "members": ["user:bob@example.com"]}]}},
        **CALL)
    assert list(kms.get_iam_policy(request={"resource": crypto_key}, **CALL).bindings) == []
    ring_policy = kms.get_iam_policy(request={"resource": key_ring}, **CALL)
    assert [b.role for b in ring_policy.bindings] == ["roles/cloudkms.admin"]


def test_stale_etag_is_aborted(kms: Client, crypto_key: str) -> None:
    before = kms.get_iam_policy(request={"resource": crypto_key}, **CALL)
    kms.set_iam_policy(request={"resource": crypto_key, "policy": {
        "bindings": [{"role": ENC_DEC, "members": ["user:a@example.com"]}],
        "etag": before.etag}}, **CALL)
    with pytest.raises(gexc.Aborted, match="etag"):
        kms.set_iam_policy(request={"resource": crypto_key, "policy": {
            "bindings": [], "etag": before.etag}}, **CALL)
    assert [b.role for b in kms.get_iam_policy(request={"resource": crypto_key},
                                               **CALL).bindings] == [ENC_DEC]
    # update_mask "bindings" only: the etag is not checked.
    kms.set_iam_policy(request={"resource": crypto_key, "policy": {"etag": before.etag},
                                "update_mask": field_mask_pb2.FieldMask(paths=["bindings"])},
                       **CALL)
    assert list(kms.get_iam_policy(request={"resource": crypto_key}, **CALL).bindings) == []


@pytest.mark.parametrize(("policy", "message"), [
    ({"bindings": [{"role": "roles/cloudkms.superuser", "members": ["user:a@example.com"]}]},
     "roles/cloudkms.superuser"),
    ({"bindings": [{"role": ENC_DEC, "members": ["alice"]}]}, "member 'alice'"),
    ({"bindings": [{"role": ENC_DEC, "members": ["allUsers"]}]}, "allUsers"),
    ({"version": 3, "bindings": [{"role": ENC_DEC, "members": ["user:a@example.com"],
                                  "condition": {"expression": "true"}}]},
     "conditions are not supported"),
    ({"version": 3, "bindings": []}, "conditions are not supported"),
    ({"audit_configs": [{"service": "allServices"}]}, "audit_configs"),
])
def test_invalid_policies(kms: Client, crypto_key: str, policy: dict[str, object],
                          message: str) -> None:
    with pytest.raises(gexc.InvalidArgument, match=message):
        kms.set_iam_policy(request={"resource": crypto_key, "policy": policy}, **CALL)


def test_missing_and_unsupported_resources(kms: Client, key_ring: str, crypto_key: str) -> None:
    policy = policy_pb2.Policy(bindings=[policy_pb2.Binding(role=ENC_DEC,
                                                            members=["user:a@example.com"])])
    for missing in (f"{key_ring}/cryptoKeys/missing", key_ring.replace("/keyRings/ring",
                                                                         "/keyRings/missing")):
        with pytest.raises(gexc.NotFound, match="not found"):
            kms.set_iam_policy(request={"resource": missing, "policy": policy}, **CALL)
        with pytest.raises(gexc.NotFound):
            kms.get_iam_policy(request={"resource": missing}, **CALL)
    with pytest.raises(gexc.NotFound, match="ImportJob"):
        kms.get_iam_policy(request={"resource": f"{key_ring}/importJobs/j"}, **CALL)
    for unsupported in (f"{crypto_key}/cryptoKeyVersions/1", key_ring.rsplit("/keyRings", 1)[0],
                        "nonsense"):
        with pytest.raises(gexc.InvalidArgument, match="not a KeyRing or CryptoKey"):
            kms.set_iam_policy(request={"resource": unsupported, "policy": policy}, **CALL)


def run_valv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "valv", *args], capture_output=True, text=True,
                          timeout=STARTUP_DEADLINE_S, env={**os.environ, **(env or {})},
                          check=False)


def test_bad_root_policy_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "root.json"
    path.write_text(json.dumps({"bindings": [{"role": "roles/nope", "members": ["user:a"]}]}))
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      env={"VALV_ROOT_POLICY_FILE": str(path)})
    assert result.returncode == 2
    assert "root policy file" in result.stderr and "roles/nope" in result.stderr
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      "--root-policy-file", str(tmp_path / "absent.json"))
    assert result.returncode == 2 and "cannot read it" in result.stderr
