"""Unit tests of valv.core.authn and valv.central.authn: config parsers and the rules.

The parsers get arbitrary input (Hypothesis): every bad file is an
AuthConfigError with a message, never another exception. The transport rule
for bearer tokens is tested with fake peers, since a real non-loopback peer
cannot be made on a test machine.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from valv.central.authn import AuthSettings, GrpcAuthenticator, connection_of, setup_authentication
from valv.central.calls import DevAuthenticator
from valv.core.addresses import is_loopback
from valv.core.authn import (
    AuthConfigError,
    Authn,
    Connection,
    JwtIssuer,
    JwtVerifier,
    StaticTokens,
    VerificationKey,
    hash_token,
    looks_like_jwt,
    principal_from_certificate,
)
from valv.core.calls import Principal
from valv.core.errors import Unauthenticated

HEX = "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12)


# ---- tokens file -------------------------------------------------------------------------------


def test_tokens_file_round_trip() -> None:
    tokens = StaticTokens.parse(json.dumps({"user:alice": hash_token("s3cret"),
                                            "serviceAccount:ci": hash_token("other").upper(),
                                            "group:ops": HEX}), "t")
    assert tokens.verify("s3cret") == Principal("user:alice", "token")
    assert tokens.verify("other") == Principal("serviceAccount:ci", "token")
    with pytest.raises(Unauthenticated, match="unknown token"):
        tokens.verify("s3cret ")


@pytest.mark.parametrize(("text", "expect"), [
    ("", "not valid JSON"),
    ("[]", "must be a JSON object"),
    ("{}", "defines no tokens"),
    ('{"alice": "' + HEX + '"}', "'alice' is not a principal"),
    ('{"domain:example.com": "' + HEX + '"}', "is not a principal"),
    ('{"user:": "' + HEX + '"}', "1-512 printable characters"),
    ('{"user:a b": "' + HEX + '"}', "without spaces"),
    ('{"user:a": "' + HEX[:-1] + '"}', "64 hex digits"),
    ('{"user:a": 5}', "64 hex digits"),
    ('{"user:a": "' + HEX + '", "user:a": "' + HEX + '"}', "more than once"),
    ('{"user:a": "' + HEX + '", "user:b": "' + HEX.upper() + '"}', "have the same token"),
    ("[" * 100_000, "not valid JSON"),
])
def test_bad_tokens_files(text: str, expect: str) -> None:
    with pytest.raises(AuthConfigError, match=expect) as info:
        StaticTokens.parse(text, "tokens file /x.json")
    assert str(info.value).startswith("tokens file /x.json: ")


def test_tokens_file_unreadable_or_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        StaticTokens.load(tmp_path / "absent.json")
    (tmp_path / "latin1.json").write_bytes(b'{"user:\xe9": "x"}')
    with pytest.raises(AuthConfigError, match="not UTF-8"):
        StaticTokens.load(tmp_path / "latin1.json")


@given(st.text(max_size=200))
def test_tokens_parser_never_raises_anything_else_on_text(text: str) -> None:
    try:
        StaticTokens.parse(text, "t")
    except AuthConfigError as exc:
        assert str(exc).startswith("t: ")


@given(json_values)
def test_tokens_parser_never_raises_anything_else_on_json(value: Any) -> None:
    try:
        StaticTokens.parse(json.dumps(value), "t")
    except AuthConfigError:
        pass


@given(st.dictionaries(st.sampled_from(["user:", "serviceAccount:", "group:", "", "x:"])
                       .flatmap(lambda p: st.text(max_size=10).map(lambda s: p + s)),
                       st.text(alphabet="0123456789abcdefABCDEFxyz", min_size=60, max_size=66),
                       max_size=5))
def test_tokens_parser_accepts_exactly_valid_entries(entries: dict[str, str]) -> None:
    try:
        tokens = StaticTokens.parse(json.dumps(entries), "t")
    except AuthConfigError:
        return
    assert set(tokens.by_digest.values()) == set(entries)
    for member, digest in entries.items():
        assert len(digest) == 64
        assert tokens.by_digest[bytes.fromhex(digest)] == member


# ---- JWT issuers file ----------------------------------------------------------------------------


def _rsa_jwk(kid: str | None = "k1") -> tuple[Any, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    if kid:
        jwk["kid"] = kid
    return key, jwk


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with a JWKS, PEM public keys and junk, for issuer files to point at."""
    work = tmp_path_factory.mktemp("keys")
    _, jwk = _rsa_jwk()
    (work / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (work / "ec.pem").write_bytes(ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (work / "ec-private.pem").write_bytes(ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (work / "junk.txt").write_text("junk")
    (work / "oct.json").write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    private = dict(jwk, d="AQAB")
    (work / "private-jwks.json").write_text(json.dumps({"keys": [private]}))
    (work / "empty-jwks.json").write_text(json.dumps({"keys": []}))
    (work / "bad-jwk.json").write_text(json.dumps({"keys": [{"kty": "RSA", "n": 5}]}))
    return work


def _issuers(keyfiles: Path, **fields: Any) -> JwtVerifier:
    entry = {"issuer": "https://iss", "audiences": ["valv"], "jwks_file": "jwks.json",
             **fields}
    entry = {k: v for k, v in entry.items() if v is not None}
    return JwtVerifier.parse(json.dumps([entry]), "issuers", keyfiles)


@pytest.mark.parametrize(("fields", "expect"), [
    ({"issuer": None}, "'issuer' must be"),
    ({"issuer": ""}, "'issuer' must be"),
    ({"audiences": None}, "'audiences' must be"),
    ({"audiences": []}, "'audiences' must be"),
    ({"audiences": "valv"}, "'audiences' must be"),
    ({"algorithms": ["HS256"]}, "symmetric HS"),
    ({"algorithms": ["none"]}, "'algorithms' must be"),
    ({"algorithms": []}, "'algorithms' must be"),
    ({"algorithms": ["ES256"]}, "none of its keys"),
    ({"jwks_file": None}, "exactly one of"),
    ({"public_key_file": "ec.pem"}, "exactly one of"),
    ({"jwks_file": "absent.json"}, "cannot read"),
    ({"jwks_file": "junk.txt"}, "not valid JSON"),
    ({"jwks_file": "oct.json"}, "symmetric 'oct'"),
    ({"jwks_file": "private-jwks.json"}, "private key"),
    ({"jwks_file": "empty-jwks.json"}, "at least one key"),
    ({"jwks_file": "bad-jwk.json"}, "not a usable public key"),
    ({"jwks_file": 7}, "must be a file path"),
    ({"audience": ["valv"]}, "unknown field"),
    ({"principal": "{sub}"}, "does not make a 'user:"),
    ({"principal": "group:{sub}"}, "does not make a 'user:"),
    ({"principal": "user:{email}"}, "may only use the placeholders"),
    ({"principal": "user:{sub!r}"}, "may only use the placeholders"),
    ({"principal": "user:{sub"}, "'principal'"),
    ({"principal": 5}, "'principal' must be a string"),
])
def test_bad_issuer_entries(keyfiles: Path, fields: dict[str, Any], expect: str) -> None:
    with pytest.raises(AuthConfigError, match=expect):
        _issuers(keyfiles, **fields)


def test_public_key_file_issuers(keyfiles: Path) -> None:
    verifier = _issuers(keyfiles, jwks_file=None, public_key_file="ec.pem",
                        algorithms=["ES256"])
    assert len(verifier.issuers["https://iss"].keys) == 1
    with pytest.raises(AuthConfigError, match="not a PEM public key"):
        _issuers(keyfiles, jwks_file=None, public_key_file="junk.txt")
    with pytest.raises(AuthConfigError, match="not a PEM public key"):
        _issuers(keyfiles, jwks_file=None, public_key_file="ec-private.pem")


def test_issuers_file_shape(keyfiles: Path) -> None:
    for text, expect in [("{}", "non-empty JSON list"), ("[]", "non-empty JSON list"),
                         ("[1]", "must be a JSON object"), ("nope", "not valid JSON"),
                         ('[{"issuer": "a", "issuer": "b"}]', "appears twice")]:
        with pytest.raises(AuthConfigError, match=expect):
            JwtVerifier.parse(text, "issuers", keyfiles)
    entry = {"issuer": "https://iss", "audiences": ["valv"], "jwks_file": "jwks.json"}
    with pytest.raises(AuthConfigError, match="listed twice"):
        JwtVerifier.parse(json.dumps([entry, entry]), "issuers", keyfiles)


def _many_issuers(keyfiles: Path, *templates: str | None, issuers: tuple[str, ...] = ()
                  ) -> JwtVerifier:
    names = issuers or tuple(f"https://cluster-{i}.example" for i in range(len(templates)))
    entries = [{"issuer": name, "audiences": ["valv"], "jwks_file": "jwks.json",
                **({"principal": template} if template is not None else {})}
               for name, template in zip(names, templates, strict=True)]
    return JwtVerifier.parse(json.dumps(entries), "issuers", keyfiles)


@pytest.mark.parametrize("templates", [
    (None, None),  # both the default serviceAccount:{sub}
    (None, "serviceAccount:{sub}"),
    ("serviceAccount:{sub}", "serviceAccount:{sub}@b"),  # "x@b" from the first = "x" from b
    ("user:a-{sub}", "user:{sub}-b"),  # "a-x-b" either way
    ("serviceAccount:{namespace}/{name}", "serviceAccount:{namespace}/{name}"),
    ("serviceAccount:{sub}@a", "serviceAccount:{sub}@b", "serviceAccount:{sub}"),
    ("serviceAccount:robot", "serviceAccount:{sub}"),  # a constant another can make
    ("serviceAccount:robot", "serviceAccount:robot"),
])
def test_issuers_whose_principals_can_meet_are_refused(keyfiles: Path,
                                                       templates: tuple[str | None, ...]) -> None:
    with pytest.raises(AuthConfigError, match="can map subjects to the same principal") as info:
        _many_issuers(keyfiles, *templates)
    assert "serviceAccount:{sub}@cluster-a" in str(info.value)  # what to do instead


def test_iss_alone_does_not_separate_issuers_that_prefix_each_other(keyfiles: Path) -> None:
    # "https://a/x" + "/foo" from the first issuer = "https://a" + "/x/foo" from the second.
    with pytest.raises(AuthConfigError, match="same principal"):
        _many_issuers(keyfiles, "serviceAccount:{iss}/{sub}", "serviceAccount:{iss}/{sub}",
                      issuers=("https://a/x", "https://a"))


@pytest.mark.parametrize("templates", [
    ("serviceAccount:{sub}@cluster-a", "serviceAccount:{sub}@cluster-b"),
    ("serviceAccount:a/{sub}", "serviceAccount:b/{sub}"),
    ("serviceAccount:{sub}@{iss}", "serviceAccount:{sub}@{iss}"),  # issuers end differently
    ("serviceAccount:{iss}/{sub}", "serviceAccount:{iss}/{sub}"),  # -0./ vs -1./
    ("user:{namespace}.{name}@a.k8s", "serviceAccount:{sub}"),  # user: vs serviceAccount:
    ("serviceAccount:robot-a", "serviceAccount:robot-b"),
])
def test_issuers_with_separate_principals_are_accepted(keyfiles: Path,
                                                       templates: tuple[str, ...]) -> None:
    verifier = _many_issuers(keyfiles, *templates)
    assert len(verifier.issuers) == len(templates)


def test_one_issuer_keeps_the_default_template(keyfiles: Path) -> None:
    verifier = _many_issuers(keyfiles, None)
    assert next(iter(verifier.issuers.values())).principal == "serviceAccount:{sub}"


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(value=json_values, extra=st.dictionaries(
    st.sampled_from(["issuer", "audiences", "jwks_file", "public_key_file", "algorithms",
                     "principal", "other"]), json_values, max_size=4))
def test_issuers_parser_never_raises_anything_else(keyfiles: Path, value: Any,
                                                   extra: dict[str, Any]) -> None:
    base = {"issuer": "https://iss", "audiences": ["valv"], "jwks_file": "jwks.json"}
    for document in (value, [value], [{**base, **extra}]):
        try:
            JwtVerifier.parse(json.dumps(document), "issuers", keyfiles)
        except AuthConfigError as exc:
            assert str(exc).startswith("issuers")


# ---- JWT verification -------------------------------------------------------------------------


def _token(key: Any, algorithm: str = "RS256", kid: str | None = "k1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": "https://iss", "aud": "valv", "sub": "system:serviceaccount:ns:app",
               "iat": now, "exp": now + 60, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key,
                      algorithm=algorithm, headers={"kid": kid} if kid else None)


def test_jwt_key_selection_and_rotation() -> None:
    old, old_jwk = _rsa_jwk("old")
    new, new_jwk = _rsa_jwk("new")
    keys = tuple(VerificationKey(jwt.PyJWK(j).key, j["kid"], None) for j in (old_jwk, new_jwk))
    verifier = JwtVerifier([JwtIssuer("https://iss", ("valv",), keys)])
    for key, kid in ((old, "old"), (new, "new")):
        assert verifier.verify(_token(key, kid=kid)).member == (
            "serviceAccount:system:serviceaccount:ns:app")
    # Without a kid every key that fits the algorithm is tried.
    assert verifier.verify(_token(new, kid=None)).method == "jwt"
    with pytest.raises(Unauthenticated, match="bad signature"):
        verifier.verify(_token(new, kid="old"))


def test_jwt_ed25519_and_templates() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    issuer = JwtIssuer("https://iss", ("valv",), (VerificationKey(key.public_key(), None, None),),
                       algorithms=("EdDSA",), principal="user:{name}@{namespace}.k8s")
    verifier = JwtVerifier([issuer])
    assert verifier.verify(_token(key, "EdDSA")).member == "user:app@ns.k8s"
    with pytest.raises(Unauthenticated, match="not a Kubernetes service account"):
        verifier.verify(_token(key, "EdDSA", sub="alice"))
    with pytest.raises(Unauthenticated, match="'sub' claim"):
        verifier.verify(_token(key, "EdDSA", sub="has space"))
    with pytest.raises(Unauthenticated, match="no 'sub' claim"):
        verifier.verify(_token(key, "EdDSA", sub=None))
    with pytest.raises(Unauthenticated, match="algorithm 'RS256' is not allowed"):
        verifier.verify(_token(_rsa_jwk()[0]))
    with pytest.raises(Unauthenticated, match="no 'iss'"):
        verifier.verify(_token(key, "EdDSA", iss=None))


def test_looks_like_jwt() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert looks_like_jwt(_token(key, "ES256"))
    for token in ("plain-token", "a.b.c", "a.b", "e30.e30.x", "eyJhbGciOiJub25lIn0..",
                  "....", ""):
        assert looks_like_jwt(token) == (token == "eyJhbGciOiJub25lIn0.."), token


# ---- certificates and the transport rule ---------------------------------------------------------


@pytest.mark.parametrize(("sans", "member"), [
    ((("DNS", "a.svc"), ("URI", "spiffe://td/ns/x")), "serviceAccount:spiffe://td/ns/x"),
    ((("URI", "https://not-spiffe"), ("DNS", "b.svc"), ("DNS", "c.svc")), "serviceAccount:b.svc"),
    ((("IP Address", "10.0.0.1"), ("DNS", "d.svc")), "serviceAccount:d.svc"),
])
def test_certificate_principals(sans: tuple[tuple[str, str], ...], member: str) -> None:
    assert principal_from_certificate({"subjectAltName": sans}) == Principal(member, "mtls")


@pytest.mark.parametrize(("cert", "expect"), [
    ({"subject": ((("commonName", "x"),),)}, "no SPIFFE URI SAN or DNS SAN"),
    ({"subjectAltName": (("IP Address", "10.0.0.1"),)}, "no SPIFFE URI SAN or DNS SAN"),
    ({"subjectAltName": (("URI", "spiffe://a/x"), ("URI", "spiffe://a/y"))}, "more than one"),
])
def test_certificates_without_a_usable_san(cert: dict[str, Any], expect: str) -> None:
    with pytest.raises(Unauthenticated, match=expect):
        principal_from_certificate(cert)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.8.7", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("localhost", True), ("10.0.0.5", False), ("0.0.0.0", False), ("::", False),
    ("192.168.1.1", False), ("example.com", False), ("", False), ("fe80::1%eth0", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


TOKENS = StaticTokens.parse(json.dumps({"user:alice": hash_token("t0ken")}), "t")


@pytest.mark.parametrize(("connection", "allowed"), [
    (Connection(host="127.0.0.1", tls=False), True),
    (Connection(host="::1", tls=False), True),
    (Connection(host=None, tls=False), True),  # unix socket
    (Connection(host="10.1.2.3", tls=True), True),
    (Connection(host="10.1.2.3", tls=False), False),
    (Connection(host="", tls=False), False),  # unknown peer
])
def test_bearer_tokens_only_over_tls_loopback_or_unix(connection: Connection,
                                                      allowed: bool) -> None:
    authn = Authn(tokens=TOKENS)
    if allowed:
        assert authn.authenticate(["Bearer t0ken"], connection).member == "user:alice"
    else:
        with pytest.raises(Unauthenticated, match="refused over plaintext") as info:
            authn.authenticate(["Bearer t0ken"], connection)
        assert "t0ken" not in info.value.message
        assert connection.host is not None and connection.host in info.value.message


@pytest.mark.parametrize(("value", "expect"), [
    ("Basic dXNlcjpwYXNz", "(got scheme 'Basic')"),
    ("Negotiate abc", "(got scheme 'Negotiate')"),
    ("token", "not a Bearer credential"),
    ("QzXkWvRtPl", "not a Bearer credential"),  # a short alphabetic bare token
    ("Bearer\tt0ken", "not a Bearer credential"),
    ("x" * 30 + " y", "not a Bearer credential"),  # too long to be a scheme
    ("t0k3n! rest", "not a Bearer credential"),
])
def test_authorization_that_is_not_bearer(value: str, expect: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        Authn(tokens=TOKENS).authenticate([value], Connection(host="127.0.0.1", tls=False))
    message = info.value.message
    assert expect in message and "must be 'Bearer <token>'" in message
    if "got scheme" not in expect:
        assert message == NOT_BEARER  # nothing of the value


NOT_BEARER = ("the 'authorization' metadata must be 'Bearer <token>': it is not a Bearer "
              "credential")


@given(st.text(alphabet=st.characters(blacklist_characters=" "), min_size=1, max_size=40)
       .filter(lambda v: v.strip() and v.strip().lower() != "bearer"))
def test_a_value_without_a_space_is_never_echoed(value: str) -> None:
    """Maybe a bare token: the message is the same whatever the value."""
    with pytest.raises(Unauthenticated) as info:
        Authn(tokens=TOKENS).authenticate([value], Connection(host=None, tls=False))
    assert info.value.message == NOT_BEARER


def test_rules_without_a_bearer_token() -> None:
    cert = {"subjectAltName": (("DNS", "job.svc"),)}
    remote_tls = Connection(host="10.1.2.3", tls=True, client_cert=cert)
    assert Authn(client_certs=True).authenticate([], remote_tls).member == "serviceAccount:job.svc"
    with pytest.raises(Unauthenticated, match="missing credentials"):
        Authn(tokens=TOKENS).authenticate([], remote_tls)  # certificates not configured
    with pytest.raises(Unauthenticated, match="over the TLS port"):
        Authn(client_certs=True).authenticate([], Connection(host=None, tls=False))
    with pytest.raises(Unauthenticated, match="no JWT issuers"):
        Authn(tokens=TOKENS).authenticate(["Bearer eyJhbGciOiJSUzI1NiJ9.e30.x"], remote_tls)
    with pytest.raises(Unauthenticated, match="longer than"):
        Authn(tokens=TOKENS).authenticate(["Bearer " + "x" * 9000], remote_tls)


# ---- the grpclib adapter ------------------------------------------------------------------------


class FakeTransport:
    def __init__(self, peername: Any, family: socket.AddressFamily, ssl_object: Any) -> None:
        self._info = {"peername": peername, "ssl_object": ssl_object,
                      "socket": type("S", (), {"family": family})()}

    def get_extra_info(self, name: str) -> Any:
        return self._info.get(name)


class FakePeer:
    def __init__(self, transport: FakeTransport) -> None:
        self._transport = transport

    def addr(self) -> Any:
        return self._transport.get_extra_info("peername")


class FakeSSL:
    def __init__(self, cert: dict[str, Any] | None) -> None:
        self.cert = cert

    def getpeercert(self) -> dict[str, Any] | None:
        return self.cert


def fake_stream(peername: Any = ("10.9.8.7", 4242), family: socket.AddressFamily = socket.AF_INET,
                ssl_object: Any = None, authorization: str | None = None) -> Any:
    metadata: MultiDict[str] = MultiDict()
    if authorization is not None:
        metadata.add("authorization", authorization)
    stream = type("Stream", (), {})()
    stream.peer = FakePeer(FakeTransport(peername, family, ssl_object))
    stream.metadata = metadata
    return stream


async def test_grpc_authenticator_refuses_plaintext_bearer_from_a_remote_peer(
        caplog: pytest.LogCaptureFixture) -> None:
    authenticator = GrpcAuthenticator(Authn(tokens=TOKENS))
    with pytest.raises(Unauthenticated, match=r"non-loopback address \(10.9.8.7\)"):
        await authenticator.authenticate("Encrypt", fake_stream(authorization="Bearer t0ken"))
    assert "t0ken" not in caplog.text
    call = await authenticator.authenticate(
        "Encrypt", fake_stream(authorization="Bearer t0ken", ssl_object=FakeSSL(None)))
    assert (call.principal, call.peer, call.rpc) == (
        Principal("user:alice", "token"), "10.9.8.7:4242", "Encrypt")
    call = await authenticator.authenticate(
        "Decrypt", fake_stream(peername="", family=socket.AF_UNIX, authorization="Bearer t0ken"))
    assert call.peer == "unix"


def test_connection_facts() -> None:
    cert = {"subjectAltName": (("DNS", "a"),)}
    assert connection_of(fake_stream(ssl_object=FakeSSL(cert))) == Connection(
        "10.9.8.7", True, cert)
    assert connection_of(fake_stream(ssl_object=FakeSSL({}))) == Connection(
        "10.9.8.7", True, None)
    assert connection_of(fake_stream(peername="", family=socket.AF_UNIX)) == Connection(
        None, False, None)
    assert connection_of(fake_stream(peername=None)) == Connection("", False, None)


def test_setup_authentication_modes(tmp_path: Path) -> None:
    dev = setup_authentication(AuthSettings(), "127.0.0.1")
    assert isinstance(dev.authenticator, DevAuthenticator) and dev.mode == "dev"
    assert AuthSettings().default_address == "127.0.0.1:50051"
    with pytest.raises(AuthConfigError, match="--insecure"):
        setup_authentication(AuthSettings(), "0.0.0.0")
    assert setup_authentication(AuthSettings(insecure=True), "0.0.0.0").mode == "dev"
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"user:a": HEX}))
    configured = AuthSettings(tokens_file=tokens)
    # Without TLS, tokens would cross the network in clear: loopback by default.
    assert configured.default_address == "127.0.0.1:50051"
    assert setup_authentication(configured, "127.0.0.1").mode == "authenticated"
    assert setup_authentication(configured, "::1").mode == "authenticated"


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "valv")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_authenticated_without_tls_refuses_a_non_loopback_address(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, host: str) -> None:
    tokens = tmp_path / "t.json"
    tokens.write_text(json.dumps({"user:a": HEX}))
    with pytest.raises(AuthConfigError, match="without TLS") as info:
        setup_authentication(AuthSettings(tokens_file=tokens), host)
    assert "--tls-terminated-by-proxy" in str(info.value)
    assert "--tls-cert-file" in str(info.value)
    # --insecure is about dev mode: it does not allow this.
    with pytest.raises(AuthConfigError, match="without TLS"):
        setup_authentication(AuthSettings(tokens_file=tokens, insecure=True), host)
    # A proxy on this host terminates TLS: allowed, with a warning.
    proxied = AuthSettings(tokens_file=tokens, tls_terminated_by_proxy=True)
    assert proxied.default_address == "127.0.0.1:50051"
    assert setup_authentication(proxied, host).mode == "authenticated"
    assert "--tls-terminated-by-proxy" in caplog.text
    # With TLS on the port, any address is fine and 0.0.0.0 is the default.
    cert, key = _self_signed(tmp_path)
    with_tls = AuthSettings(tokens_file=tokens, tls_cert_file=cert, tls_key_file=key)
    assert with_tls.default_address == "0.0.0.0:50051"
    assert setup_authentication(with_tls, host).ssl_context is not None
    # The flag does not change dev mode's rule.
    with pytest.raises(AuthConfigError, match="dev mode"):
        setup_authentication(AuthSettings(tls_terminated_by_proxy=True), host)
