"""Authentication through real central processes and Google's official client.

Static bearer tokens and JWTs on loopback, the unix socket, the plaintext
rule for non-loopback peers, and dev mode's address rules. TLS and client
certificates are in test_tls.py; the config file parsers in
test_authn_config.py.

Authorization is not what these tests are about: a call that authenticated
may still be refused by IAM (PERMISSION_DENIED), so they check that a call
was *not* UNAUTHENTICATED and read the principal from central's debug log
("authenticated" lines), which names the principal and the method.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from tests.helpers import CALL, STARTUP_DEADLINE_S, CentralProcess
from tests.rmk_support import run_valv as run_valv_clean
from valv.core.authn import hash_token

Client = kms_v1.KeyManagementServiceClient

ALICE_TOKEN = "alice-" + secrets.token_urlsafe(24)
ROBOT_TOKEN = "robot-" + secrets.token_urlsafe(24)
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "valv"


# ---- helpers shared with test_tls.py ------------------------------------------------------


def root_key_env() -> dict[str, str]:
    """A root key in the environment: authenticated centrals refuse the development key."""
    return {"VALV_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}


def write_tokens_file(path: Path, tokens: dict[str, str]) -> Path:
    """A tokens file for ``{principal: token}``; only hashes are written."""
    path.write_text(json.dumps({member: hash_token(token) for member, token in tokens.items()}))
    return path


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def probe(kms: Client, metadata: list[tuple[str, str]] | None = None) -> Exception | None:
    """Make one call; return the error it failed with, or None."""
    try:
        kms.list_key_rings(request={"parent": "projects/authn/locations/global"},
                           metadata=metadata or [], **CALL)
    except gexc.GoogleAPICallError as exc:
        return exc
    return None


def assert_authenticated(error: Exception | None) -> None:
    """The call got past authentication (IAM, once it lands, may still refuse it)."""
    assert error is None or isinstance(error, gexc.PermissionDenied), error


def assert_unauthenticated(error: Exception | None, *fragments: str) -> str:
    assert isinstance(error, gexc.Unauthenticated), error
    message = str(error.message)
    for fragment in fragments:
        assert fragment in message, message
    return message


def authenticated_lines(central: CentralProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in central.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg") == "authenticated"]


def last_principal(central: CentralProcess) -> tuple[str, str]:
    line = authenticated_lines(central)[-1]
    return line["principal"], line["method"]


def serving_line(central: CentralProcess) -> dict[str, Any]:
    """Central's "valv central serving" log line."""
    return next(json.loads(line) for line in central.logs().splitlines()
                if "valv central serving" in line)


def run_valv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "valv", *args], capture_output=True,
                          text=True, timeout=STARTUP_DEADLINE_S,
                          env={**os.environ, **(env or {})}, check=False)


def client_for(target: str) -> Client:
    return Client(transport=KeyManagementServiceGrpcTransport(
        channel=grpc.insecure_channel(target)))


# ---- JWT material ----------------------------------------------------------------------------


class Signer:
    def __init__(self, kid: str, algorithm: str = "RS256") -> None:
        self.kid = kid
        self.algorithm = algorithm
        self.key: Any = (rsa.generate_private_key(public_exponent=65537, key_size=2048)
                         if algorithm.startswith("RS") else ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = (jwt.algorithms.RSAAlgorithm if self.algorithm.startswith("RS")
                     else jwt.algorithms.ECAlgorithm)
        data: dict[str, Any] = json.loads(algorithm.to_jwk(self.key.public_key()))
        return {**data, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def token(self, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": [AUDIENCE], "sub": "system:serviceaccount:payments:api",
                  "iat": now, "nbf": now, "exp": now + 600}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, self.key, algorithm=self.algorithm,
                          headers={"kid": self.kid})


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("k8s-1")


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Iterator[CentralProcess]:
    """Central with a tokens file and a Kubernetes-style JWT issuer, on loopback + unix socket."""
    work = tmp_path_factory.mktemp("authn")
    tokens = write_tokens_file(work / "tokens.json", {"user:alice@example.com": ALICE_TOKEN,
                                                      "serviceAccount:robot": ROBOT_TOKEN})
    (work / "jwks.json").write_text(json.dumps({"keys": [signer.jwk()]}))
    issuers = work / "issuers.json"
    issuers.write_text(json.dumps([{"issuer": ISSUER, "audiences": [AUDIENCE],
                                    "jwks_file": "jwks.json"}]))
    # Once IAM authorizes calls, alice may manage and use keys (the env var is
    # ignored by a central without IAM, where everything is allowed).
    policy = work / "root-policy.json"
    policy.write_text(json.dumps({"bindings": [
        {"role": "roles/cloudkms.admin", "members": ["user:alice@example.com"]},
        {"role": "roles/cloudkms.cryptoKeyEncrypterDecrypter",
         "members": ["user:alice@example.com"]}]}))
    process = CentralProcess(work / "central", "--tokens-file", str(tokens),
                             "--jwt-issuers-file", str(issuers), "--log-level", "debug",
                             "--unix-socket", str(work / "valv.sock"),
                             env={"VALV_ROOT_POLICY_FILE": str(policy),
                                  **root_key_env()}).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def kms(central: CentralProcess) -> Client:
    return central.client()


# ---- static tokens -----------------------------------------------------------------------------


def test_right_token_authenticates_as_its_principal(central: CentralProcess, kms: Client) -> None:
    assert_authenticated(probe(kms, bearer(ALICE_TOKEN)))
    assert last_principal(central) == ("user:alice@example.com", "token")
    assert_authenticated(probe(kms, bearer(ROBOT_TOKEN)))
    assert last_principal(central) == ("serviceAccount:robot", "token")


def test_a_full_key_workflow_with_a_token(kms: Client) -> None:
    """Google's client with per-call metadata, end to end."""
    meta = bearer(ALICE_TOKEN)
    ring = kms.create_key_ring(request={"parent": "projects/authn-flow/locations/global",
                                        "key_ring_id": "r", "key_ring": {}},
                               metadata=meta, **CALL)
    key = kms.create_crypto_key(
        request={"parent": ring.name, "crypto_key_id": "k",
                 "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT}},
        metadata=meta, **CALL)
    ct = kms.encrypt(request={"name": key.name, "plaintext": b"dek"}, metadata=meta,
                     **CALL).ciphertext
    pt = kms.decrypt(request={"name": key.name, "ciphertext": ct}, metadata=meta,
                     **CALL).plaintext
    assert pt == b"dek"


def test_missing_token_is_unauthenticated(kms: Client) -> None:
    message = assert_unauthenticated(probe(kms), "missing")
    assert "Bearer" in message


def test_wrong_token_is_unauthenticated_and_never_echoed(central: CentralProcess,
                                                         kms: Client) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(24)
    message = assert_unauthenticated(probe(kms, bearer(wrong)), "unknown token")
    assert wrong not in message
    # A token that differs from a real one in its last character.
    near = ALICE_TOKEN[:-1] + ("A" if ALICE_TOKEN[-1] != "A" else "B")
    assert_unauthenticated(probe(kms, bearer(near)), "unknown token")
    log = central.logs()
    assert "authentication failed" in log
    for secret in (wrong, near, ALICE_TOKEN, ROBOT_TOKEN):
        assert secret not in log


@pytest.mark.parametrize(("value", "expect"), [
    ("Basic dXNlcjpwYXNz", "must be 'Bearer <token>' (got scheme 'Basic')"),
    ("Bearer ", "empty bearer token"),
    (ALICE_TOKEN, "not a Bearer credential"),
])
def test_malformed_authorization_is_unauthenticated(kms: Client, value: str,
                                                   expect: str) -> None:
    message = assert_unauthenticated(probe(kms, [("authorization", value)]), expect)
    assert ALICE_TOKEN not in message and "dXNlcjpwYXNz" not in message


def test_a_bare_token_is_never_echoed(central: CentralProcess, kms: Client) -> None:
    """A token sent without "Bearer ": short and alphabetic, it looks like a scheme."""
    bare = "".join(secrets.choice(string.ascii_letters) for _ in range(12))
    message = assert_unauthenticated(probe(kms, [("authorization", bare)]),
                                     "not a Bearer credential")
    log = central.logs()
    for part in (bare, bare[:6], bare[6:]):
        assert part not in message and part not in log


def test_two_authorization_entries_are_refused(kms: Client) -> None:
    assert_unauthenticated(
        probe(kms, [*bearer(ALICE_TOKEN), *bearer(ROBOT_TOKEN)]), "more than one")


def test_bearer_scheme_is_case_insensitive(kms: Client) -> None:
    assert_authenticated(probe(kms, [("authorization", f"bearer {ALICE_TOKEN}")]))


def test_token_over_the_unix_socket(central: CentralProcess) -> None:
    sock = central.data_dir.parent / "valv.sock"
    kms = client_for(f"unix:{sock}")
    assert_authenticated(probe(kms, bearer(ROBOT_TOKEN)))
    line = authenticated_lines(central)[-1]
    assert (line["principal"], line["method"], line["peer"]) == (
        "serviceAccount:robot", "token", "unix")
    assert_unauthenticated(probe(kms), "missing")


# ---- JWTs ---------------------------------------------------------------------------------------


def test_kubernetes_service_account_jwt(central: CentralProcess, kms: Client,
                                        signer: Signer) -> None:
    assert_authenticated(probe(kms, bearer(signer.token())))
    assert last_principal(central) == ("serviceAccount:system:serviceaccount:payments:api",
                                       "jwt")


def test_jwt_with_a_single_string_audience(kms: Client, signer: Signer) -> None:
    assert_authenticated(probe(kms, bearer(signer.token(aud=AUDIENCE))))


@pytest.mark.parametrize(("case", "expect"), [
    ("expired", "expired"),
    ("wrong-audience", "wrong audience"),
    ("wrong-issuer", "unknown issuer 'https://evil.example'"),
    ("bad-signature", "bad signature"),
    ("not-yet-valid", "not valid yet"),
    ("no-exp", "no 'exp' claim"),
    ("unknown-kid", "key id 'other'"),
    ("hs256", "algorithm 'HS256' is not allowed"),
    ("garbage", "malformed"),
])
def test_bad_jwts_are_unauthenticated_with_the_reason(
        central: CentralProcess, kms: Client, signer: Signer, case: str, expect: str) -> None:
    now = int(time.time())
    if case == "expired":
        token = signer.token(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    elif case == "wrong-audience":
        token = signer.token(aud=["someone-else"])
    elif case == "wrong-issuer":
        token = signer.token(iss="https://evil.example")
    elif case == "bad-signature":
        token = Signer(signer.kid).token()  # same kid, another key
    elif case == "not-yet-valid":
        token = signer.token(nbf=now + 3600, iat=now + 3600, exp=now + 7200)
    elif case == "no-exp":
        token = signer.token(exp=None)
    elif case == "unknown-kid":
        token = Signer("other").token()
    elif case == "hs256":
        token = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 60},
                           "a-shared-secret-of-at-least-32-bytes!", algorithm="HS256")
    else:
        token = "eyJhbGciOiJSUzI1NiJ9.not-base64!.sig"
    message = assert_unauthenticated(probe(kms, bearer(token)), expect)
    assert token not in message
    assert token not in central.logs()


def test_jwt_only_server_refuses_static_tokens(tmp_path: Path, signer: Signer) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [signer.jwk()]}))
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps([{"issuer": ISSUER, "audiences": [AUDIENCE],
                                    "jwks_file": str(tmp_path / "jwks.json"),
                                    "principal": "serviceAccount:{namespace}/{name}"}]))
    process = CentralProcess(tmp_path / "c", "--jwt-issuers-file", str(issuers),
                             "--log-level", "debug", env=root_key_env()).start()
    try:
        kms = process.client()
        assert_unauthenticated(probe(kms, bearer(ALICE_TOKEN)), "no tokens file configured")
        assert_authenticated(probe(kms, bearer(signer.token())))
        assert last_principal(process) == ("serviceAccount:payments/api", "jwt")
        assert_unauthenticated(probe(kms, bearer(signer.token(sub="alice"))),
                               "not a Kubernetes service account")
        serving = serving_line(process)
        assert serving["auth"] == "authenticated" and serving["tls"] is False
    finally:
        process.stop()


# ---- dev mode and addresses ------------------------------------------------------------------


def test_dev_mode_is_user_dev_and_ignores_tokens(fresh_central: CentralProcess) -> None:
    kms = fresh_central.client()
    assert probe(kms) is None
    assert probe(kms, bearer("anything")) is None
    serving = serving_line(fresh_central)
    assert serving["auth"] == "dev"


def _configs_seen(monkeypatch: pytest.MonkeyPatch, *argv: str,
                  env: dict[str, str] | None = None) -> Any:
    """The CentralConfig ``valv central ARGV`` would serve with (without serving)."""
    import valv.central.server
    import valv.logs
    from valv import cli

    seen: list[Any] = []

    async def fake_run(config: Any, **_: Any) -> None:
        seen.append(config)

    monkeypatch.setattr(valv.central.server, "run_central", fake_run)
    monkeypatch.setattr(valv.logs, "setup_logging", lambda level: None)
    for name in ("VALV_ADDR", "VALV_TOKENS_FILE", "VALV_JWT_ISSUERS_FILE",
                 "VALV_TLS_CLIENT_CA_FILE", "VALV_TLS_CERT_FILE", "VALV_TLS_KEY_FILE",
                 "VALV_INSECURE", "VALV_TLS_TERMINATED_BY_PROXY", "VALV_DEV_ROOT_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    assert cli.main(["central", *argv]) == 0
    return seen[0]


def test_default_address_is_any_only_with_auth_and_tls(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _configs_seen(monkeypatch, "--data-dir", str(tmp_path))
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert config.dev_root_key is False
    tokens = write_tokens_file(tmp_path / "t.json", {"user:a": "x"})
    # Tokens without TLS: remote callers would send them in clear.
    config = _configs_seen(monkeypatch, "--data-dir", str(tmp_path), "--tokens-file",
                           str(tokens))
    assert (config.host, config.port) == ("127.0.0.1", 50051)
    assert config.auth.tokens_file == tokens
    config = _configs_seen(monkeypatch, "--data-dir", str(tmp_path), "--tokens-file",
                           str(tokens), "--tls-cert-file", "c.pem", "--tls-key-file", "k.pem")
    assert (config.host, config.port) == ("0.0.0.0", 50051)
    config = _configs_seen(monkeypatch, "--data-dir", str(tmp_path), "--tokens-file",
                           str(tokens), "--tls-terminated-by-proxy", "--dev-root-key")
    assert config.auth.tls_terminated_by_proxy is True and config.dev_root_key is True
    config = _configs_seen(monkeypatch, "--data-dir", str(tmp_path), "--tokens-file",
                           str(tokens), env={"VALV_DEV_ROOT_KEY": "1",
                                             "VALV_TLS_TERMINATED_BY_PROXY": "1"})
    assert config.auth.tls_terminated_by_proxy is True and config.dev_root_key is True


def test_authenticated_without_tls_refuses_a_non_loopback_address(tmp_path: Path) -> None:
    tokens = write_tokens_file(tmp_path / "t.json", {"user:alice": ALICE_TOKEN})
    result = run_valv("central", "--addr", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"),
                      "--tokens-file", str(tokens), env=root_key_env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "without TLS" in result.stderr and "--tls-terminated-by-proxy" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_tls_terminated_by_proxy_allows_a_non_loopback_address(tmp_path: Path) -> None:
    tokens = write_tokens_file(tmp_path / "t.json", {"user:alice": ALICE_TOKEN})
    process = CentralProcess(tmp_path / "c", "--addr", "0.0.0.0:0", "--tokens-file",
                             str(tokens), "--tls-terminated-by-proxy", env=root_key_env()
                             ).start()
    try:
        assert process.addr.startswith("0.0.0.0:")
        port = process.addr.rsplit(":", 1)[1]
        kms = client_for(f"127.0.0.1:{port}")  # as a sidecar proxy would, from loopback
        assert_authenticated(probe(kms, bearer(ALICE_TOKEN)))
        assert_unauthenticated(probe(kms), "missing")
        warnings = [json.loads(line) for line in process.logs().splitlines()
                    if "--tls-terminated-by-proxy" in line]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    finally:
        process.stop()


# ---- root key in authenticated mode ----------------------------------------------------------


def test_authenticated_central_refuses_the_development_root_key(tmp_path: Path) -> None:
    tokens = write_tokens_file(tmp_path / "t.json", {"user:alice": ALICE_TOKEN})
    result = run_valv_clean("central", "--addr", "127.0.0.1:0", "--data-dir",
                            str(tmp_path / "d"), "--tokens-file", str(tokens))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for fragment in ("no root key", "--master-key-file", "--dev-root-key",
                     "VALV_DEV_ROOT_KEY=1"):
        assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "d").exists()  # no development key was created


@pytest.mark.parametrize("how", ["flag", "env"])
def test_dev_root_key_flag_allows_it_with_the_warning(tmp_path: Path, how: str) -> None:
    tokens = write_tokens_file(tmp_path / "t.json", {"user:alice": ALICE_TOKEN})
    args = ("--tokens-file", str(tokens), *(("--dev-root-key",) if how == "flag" else ()))
    env = {"VALV_DEV_ROOT_KEY": "1"} if how == "env" else {}
    process = CentralProcess(tmp_path / "c", *args, env=env).start()
    try:
        assert_authenticated(probe(process.client(), bearer(ALICE_TOKEN)))
        assert "DEVELOPMENT ROOT KEY IN USE" in process.logs()
        assert (tmp_path / "c" / "master.key").exists()
    finally:
        process.stop()


def test_dev_mode_still_creates_the_development_root_key(fresh_central: CentralProcess) -> None:
    """The quick start: no configuration at all."""
    assert (fresh_central.data_dir / "master.key").exists()
    assert "DEVELOPMENT ROOT KEY IN USE" in fresh_central.logs()


def test_issuers_that_share_principals_stop_central(tmp_path: Path, signer: Signer) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [signer.jwk()]}))
    issuers = tmp_path / "issuers.json"
    issuers.write_text(json.dumps([
        {"issuer": f"https://cluster-{c}.example", "audiences": [AUDIENCE],
         "jwks_file": "jwks.json"} for c in "ab"]))
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      "--jwt-issuers-file", str(issuers), env=root_key_env())
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "can map subjects to the same principal" in result.stderr
    assert "serviceAccount:{sub}@cluster-a" in result.stderr


def test_non_loopback_dev_mode_needs_insecure(tmp_path: Path) -> None:
    result = run_valv("central", "--addr", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "--insecure" in result.stderr and "dev mode" in result.stderr
    assert not (tmp_path / "d").exists()  # refused before touching anything


@pytest.mark.parametrize("how", ["flag", "env"])
def test_insecure_dev_mode_starts_with_a_loud_warning(tmp_path: Path, how: str) -> None:
    args = ("--addr", "0.0.0.0:0", *(("--insecure",) if how == "flag" else ()))
    env = {"VALV_INSECURE": "1"} if how == "env" else {}
    process = CentralProcess(tmp_path / "c", *args, env=env).start()
    try:
        port = process.addr.rsplit(":", 1)[1]
        assert process.addr.startswith("0.0.0.0:")
        assert probe(client_for(f"127.0.0.1:{port}")) is None
        warnings = [json.loads(line) for line in process.logs().splitlines()
                    if "INSECURE" in line]
        assert len(warnings) == 1 and warnings[0]["level"] == "warning"
        assert "user:dev" in warnings[0]["msg"]
    finally:
        process.stop()


def test_insecure_env_must_be_a_boolean(tmp_path: Path) -> None:
    result = run_valv("central", "--data-dir", str(tmp_path / "d"),
                      env={"VALV_INSECURE": "maybe"})
    assert result.returncode == 2
    assert "VALV_INSECURE" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "content", "expect"), [
    ("--tokens-file", None, "cannot read"),
    ("--tokens-file", '{"alice": "' + "0" * 64 + '"}', "'alice' is not a principal"),
    ("--tokens-file", '{"user:alice": "secret"}', "64 hex digits"),
    ("--tokens-file", "[1, 2", "not valid JSON"),
    ("--jwt-issuers-file", '[{"issuer": "x", "audiences": ["v"]}]', "exactly one of"),
    ("--jwt-issuers-file", "{}", "non-empty JSON list"),
])
def test_bad_auth_files_exit_2_with_a_clear_error(tmp_path: Path, flag: str,
                                                  content: str | None, expect: str) -> None:
    path = tmp_path / "auth.json"
    if content is not None:
        path.write_text(content)
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      flag, str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expect in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
