"""Who is calling: bearer tokens (static or JWT) and client certificates.

This module turns the credentials a connection presents into a Principal in
IAM member syntax, or raises Unauthenticated saying which credential was
missing or why it was rejected. It knows nothing about gRPC: the network
adapter (valv.central.authn) reads the ``authorization`` metadata and the
connection's facts (TLS, verified client certificate, peer address) and hands
them to ``Authn.authenticate``.

The rules, in order (docs/security.md explains them for operators):

1. A bearer token, if one is sent, identifies the caller, even when a client
   certificate is presented too. It is accepted only over TLS, over a unix
   socket, or from a loopback address: a token sent in clear across a network
   is refused.
2. A token that is shaped like a JWT (three dot-separated parts whose first
   part is a JSON header with "alg") is verified as a JWT against the
   configured issuers; any other token is looked up in the static tokens
   file.
3. Without a bearer token, a verified TLS client certificate identifies the
   caller by its SAN: a SPIFFE URI SAN, else the first DNS SAN.
4. Anything else is UNAUTHENTICATED. No message ever contains the token.

Configuration files are parsed here too; every problem in one is an
AuthConfigError whose message names the file and what to fix.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from valv.core.addresses import is_loopback
from valv.core.calls import Principal
from valv.core.errors import Unauthenticated

METHOD_TOKEN = "token"  # noqa: S105 - a method name, not a password
METHOD_JWT = "jwt"
METHOD_MTLS = "mtls"

# Tolerated clock skew for a JWT's exp, nbf and iat.
JWT_LEEWAY_S = 30
# A bearer token longer than this is refused before any parsing.
MAX_TOKEN_BYTES = 8192


class AuthConfigError(ValueError):
    """An authentication setting or file is unusable; central refuses to start."""


# ---- principals -------------------------------------------------------------------------

_MEMBER_TYPES = ("user", "serviceAccount", "group")
# The part after "type:": printable, no whitespace, bounded.
_MEMBER_VALUE = re.compile(r"^[!-~]{1,512}$")


def member_problem(member: object, allowed: Sequence[str] = _MEMBER_TYPES) -> str | None:
    """Why ``member`` is not an IAM member of one of the ``allowed`` types, or None."""
    if not isinstance(member, str):
        return "a principal must be a string such as 'user:alice@example.com'"
    kind, sep, value = member.partition(":")
    if not sep or kind not in allowed:
        return (f"{_clip(member)} is not a principal: use "
                + ", ".join(f"'{k}:…'" for k in allowed))
    if not _MEMBER_VALUE.match(value):
        return (f"{_clip(member)} is not a principal: the part after '{kind}:' must be 1-512 "
                "printable characters without spaces")
    return None


def _clip(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


# ---- static tokens -------------------------------------------------------------------------

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


def hash_token(token: str) -> str:
    """The tokens-file form of ``token``: SHA-256 of its UTF-8 bytes, lower-case hex.

    The same as ``printf %s "$TOKEN" | sha256sum``.
    """
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class StaticTokens:
    """The tokens file: principal → SHA-256 of its token. No token is held in clear."""

    # SHA-256 digest → principal.
    #
    # Verification is a dict lookup keyed by the digest of the presented token,
    # not a constant-time scan. That is safe: the lookup's timing can at most
    # tell an attacker something about the digest of a stored token, and a
    # digest is not a credential: turning it back into a token that hashes to
    # it is a SHA-256 preimage search. (Tokens are meant to be random, e.g.
    # `openssl rand -base64 32`; a guessable token is weak whatever we do.) A
    # lookup also keeps the cost flat however many tokens the file holds.
    by_digest: Mapping[bytes, str]

    @classmethod
    def parse(cls, text: str, source: str) -> StaticTokens:
        try:
            entries = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKey as dup:
            raise AuthConfigError(
                f"{source}: {_clip(dup.key)} appears more than once") from None
        except (ValueError, RecursionError) as exc:
            raise AuthConfigError(f"{source}: not valid JSON ({_json_problem(exc)})") from None
        if not isinstance(entries, dict):
            raise AuthConfigError(
                f'{source}: must be a JSON object {{"user:alice": "<sha256 hex of her token>",'
                " …}")
        if not entries:
            raise AuthConfigError(f"{source}: defines no tokens")
        by_digest: dict[bytes, str] = {}
        for member, digest in entries.items():
            problem = member_problem(member)
            if problem:
                raise AuthConfigError(f"{source}: {problem}")
            if not isinstance(digest, str) or not _SHA256_HEX.match(digest):
                raise AuthConfigError(
                    f"{source}: the value for {_clip(member)} must be the SHA-256 of the token "
                    "as 64 hex digits (printf %s \"$TOKEN\" | sha256sum), never the token "
                    "itself")
            raw = bytes.fromhex(digest)
            if raw in by_digest:
                raise AuthConfigError(
                    f"{source}: {_clip(by_digest[raw])} and {_clip(member)} have the same "
                    "token; give every principal its own")
            by_digest[raw] = member
        return cls(by_digest)

    @classmethod
    def load(cls, path: Path) -> StaticTokens:
        return cls.parse(_read_config(path, "tokens file"), f"tokens file {path}")

    def verify(self, token: str) -> Principal:
        member = self.by_digest.get(hashlib.sha256(token.encode()).digest())
        if member is None:
            raise Unauthenticated("unknown token: it matches no entry of the tokens file")
        return Principal(member, METHOD_TOKEN)


# ---- JWTs ----------------------------------------------------------------------------------

# Asymmetric algorithms only. HS* would turn a configured *public* key into a
# shared secret (the classic key-confusion attack), and "none" is no signature.
_ALGORITHM_KEY_TYPES: dict[str, tuple[type[Any], ...]] = {
    **{alg: (rsa.RSAPublicKey,) for alg in ("RS256", "RS384", "RS512",
                                            "PS256", "PS384", "PS512")},
    **{alg: (ec.EllipticCurvePublicKey,) for alg in ("ES256", "ES384", "ES512")},
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
DEFAULT_JWT_ALGORITHMS = ("RS256", "ES256")
DEFAULT_PRINCIPAL_TEMPLATE = "serviceAccount:{sub}"
_TEMPLATE_FIELDS = frozenset({"sub", "iss", "namespace", "name"})
_ISSUER_FIELDS = frozenset({"issuer", "audiences", "jwks_file", "public_key_file",
                            "algorithms", "principal"})
# A Kubernetes service account's subject: system:serviceaccount:NAMESPACE:NAME.
_K8S_SUBJECT = re.compile(r"^system:serviceaccount:([a-z0-9]([-a-z0-9]*[a-z0-9])?):"
                          r"([a-z0-9]([-.a-z0-9]*[a-z0-9])?)$")
_SUBJECT = re.compile(r"^[!-~]{1,256}$")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    key: Any  # a cryptography public key
    key_id: str | None  # the JWK's "kid"
    algorithm: str | None  # the JWK's "alg", if it names one

    def fits(self, algorithm: str) -> bool:
        if self.algorithm is not None and self.algorithm != algorithm:
            return False
        return isinstance(self.key, _ALGORITHM_KEY_TYPES[algorithm])


@dataclass(frozen=True, slots=True)
class JwtIssuer:
    issuer: str
    audiences: tuple[str, ...]
    keys: tuple[VerificationKey, ...]
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    principal: str = DEFAULT_PRINCIPAL_TEMPLATE

    def principal_for(self, subject: str) -> str:
        values = {"sub": subject, "iss": self.issuer}
        k8s = _K8S_SUBJECT.match(subject)
        if k8s:
            values.update(namespace=k8s.group(1), name=k8s.group(3))
        try:
            member = self.principal.format_map(values)
        except KeyError:
            raise Unauthenticated(
                f"the JWT's subject is not a Kubernetes service account "
                f"(system:serviceaccount:NAMESPACE:NAME), but issuer {_clip(self.issuer)} maps "
                "principals with {namespace}/{name}") from None
        problem = member_problem(member, ("user", "serviceAccount"))
        if problem:
            raise Unauthenticated(f"the JWT's subject does not make a valid principal: {problem}")
        return member


class JwtVerifier:
    """Verifies JWTs from the configured issuers with PyJWT."""

    def __init__(self, issuers: Sequence[JwtIssuer]) -> None:
        self.issuers = {issuer.issuer: issuer for issuer in issuers}

    @classmethod
    def parse(cls, text: str, source: str, base_dir: Path) -> JwtVerifier:
        """The issuers file: a JSON list of issuer objects; key files relative to ``base_dir``."""
        try:
            entries = json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
        except _DuplicateKey as dup:
            raise AuthConfigError(
                f"{source}: field {_clip(dup.key)} appears twice in one object") from None
        except (ValueError, RecursionError) as exc:
            raise AuthConfigError(f"{source}: not valid JSON ({_json_problem(exc)})") from None
        if not isinstance(entries, list) or not entries:
            raise AuthConfigError(
                f'{source}: must be a non-empty JSON list of issuers, e.g. [{{"issuer": '
                '"https://kubernetes.default.svc", "audiences": ["valv"], "jwks_file": '
                '"jwks.json"}]')
        issuers: list[JwtIssuer] = []
        for index, entry in enumerate(entries):
            issuer = _parse_issuer(entry, f"{source}: issuer #{index + 1}", base_dir)
            if any(other.issuer == issuer.issuer for other in issuers):
                raise AuthConfigError(
                    f"{source}: issuer {_clip(issuer.issuer)} is listed twice")
            issuers.append(issuer)
        _check_separate_principals(issuers, source)
        return cls(issuers)

    @classmethod
    def load(cls, path: Path) -> JwtVerifier:
        return cls.parse(_read_config(path, "JWT issuers file"), f"JWT issuers file {path}",
                         path.parent)

    def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("the JWT is malformed") from None
        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise Unauthenticated("the JWT has no 'iss' (issuer) claim")
        issuer = self.issuers.get(iss)
        if issuer is None:
            raise Unauthenticated(
                f"unknown issuer {_clip(iss)}: the JWT's issuer is not in the JWT issuers file")
        algorithm = header.get("alg")
        if algorithm not in issuer.algorithms:
            raise Unauthenticated(
                f"the JWT's algorithm {_clip(str(algorithm))} is not allowed for issuer "
                f"{_clip(iss)} (allowed: {', '.join(issuer.algorithms)})")
        kid = header.get("kid")
        keys = [key for key in issuer.keys
                if key.fits(algorithm) and (kid is None or key.key_id in (None, kid))]
        if not keys:
            raise Unauthenticated(
                f"the JWT's key id {_clip(str(kid))} is not among issuer {_clip(iss)}'s keys"
                if kid is not None else
                f"issuer {_clip(iss)} has no key for the JWT's algorithm {algorithm}")
        for key in keys:
            try:
                verified = jwt.decode(
                    token, key=key.key, algorithms=[algorithm], audience=list(issuer.audiences),
                    issuer=issuer.issuer, leeway=JWT_LEEWAY_S,
                    options={"require": ["exp", "iss", "aud", "sub"]})
            except jwt.InvalidSignatureError:
                continue  # another key of the issuer may have signed it
            except jwt.PyJWTError as exc:
                raise Unauthenticated(_jwt_problem(exc, issuer)) from None
            break
        else:
            raise Unauthenticated(
                f"bad signature: the JWT is not signed by any key of issuer {_clip(iss)}")
        subject = verified.get("sub")
        if not isinstance(subject, str) or not _SUBJECT.match(subject):
            raise Unauthenticated(
                "the JWT's 'sub' claim must be 1-256 printable characters without spaces")
        return Principal(issuer.principal_for(subject), METHOD_JWT)


def _jwt_problem(exc: jwt.PyJWTError, issuer: JwtIssuer) -> str:
    """Why PyJWT rejected a token whose signature verified, in words, without the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the JWT has expired ('exp' is in the past)"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the JWT is not valid yet ('nbf' or 'iat' is in the future)"
    if isinstance(exc, jwt.InvalidAudienceError):
        return ("wrong audience: the JWT's 'aud' is none of "
                + ", ".join(repr(a) for a in issuer.audiences))
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the JWT has no {exc.claim!r} claim"
    if isinstance(exc, jwt.InvalidIssuerError):
        return f"the JWT's issuer is not {issuer.issuer!r}"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "the JWT's algorithm does not match the issuer's key"
    if isinstance(exc, jwt.InvalidKeyError):
        return "the JWT's algorithm does not fit the issuer's key"
    if isinstance(exc, jwt.DecodeError):
        return "the JWT is malformed"
    # PyJWT's own messages name claims and rules, never the token's text.
    return f"the JWT is invalid: {exc}"


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` is shaped like a JWS compact JWT: a.b.c with a JSON header naming alg."""
    if token.count(".") != 2:
        return False
    head = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    return isinstance(header, dict) and isinstance(header.get("alg"), str)


def _parse_issuer(entry: object, where: str, base_dir: Path) -> JwtIssuer:
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: must be a JSON object")
    unknown = sorted(set(entry) - _ISSUER_FIELDS)
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown field(s) {', '.join(map(_clip, unknown))}; the fields are "
            + ", ".join(sorted(_ISSUER_FIELDS)))
    issuer = entry.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise AuthConfigError(f"{where}: 'issuer' must be the tokens' 'iss' value (a string)")
    where = f"{where} ({_clip(issuer)})"
    audiences = entry.get("audiences")
    if (not isinstance(audiences, list) or not audiences
            or not all(isinstance(a, str) and a for a in audiences)):
        raise AuthConfigError(
            f"{where}: 'audiences' must be a non-empty list of strings (the 'aud' values this "
            "server accepts)")
    algorithms = entry.get("algorithms", list(DEFAULT_JWT_ALGORITHMS))
    if (not isinstance(algorithms, list) or not algorithms
            or not all(isinstance(a, str) and a in _ALGORITHM_KEY_TYPES for a in algorithms)):
        raise AuthConfigError(
            f"{where}: 'algorithms' must be a non-empty list drawn from "
            + ", ".join(_ALGORITHM_KEY_TYPES) + " (symmetric HS* and 'none' are refused)")
    template = entry.get("principal", DEFAULT_PRINCIPAL_TEMPLATE)
    _check_template(template, where)
    has_jwks, has_pem = "jwks_file" in entry, "public_key_file" in entry
    if has_jwks == has_pem:
        raise AuthConfigError(f"{where}: give exactly one of 'jwks_file' and 'public_key_file'")
    field_name = "jwks_file" if has_jwks else "public_key_file"
    file_name = entry[field_name]
    if not isinstance(file_name, str) or not file_name:
        raise AuthConfigError(f"{where}: {field_name!r} must be a file path")
    path = base_dir / file_name
    keys = (_load_jwks(path, where) if has_jwks else (_load_public_key(path, where),))
    for algorithm in algorithms:
        if any(key.fits(algorithm) for key in keys):
            break
    else:
        raise AuthConfigError(
            f"{where}: none of its keys in {path} can verify {', '.join(algorithms)}")
    return JwtIssuer(issuer=issuer, audiences=tuple(audiences), keys=keys,
                     algorithms=tuple(algorithms), principal=template)


def _template_ends(issuer: JwtIssuer) -> tuple[str, str, bool]:
    """The literal text before the first and after the last subject placeholder of the
    issuer's template ({iss} counts as literal: it is the issuer), and whether it has one."""
    pieces: list[str | None] = []  # literal text; None for a subject placeholder
    for literal, field_name, _spec, _conversion in string.Formatter().parse(issuer.principal):
        pieces.append(literal)
        if field_name == "iss":
            pieces.append(issuer.issuer)
        elif field_name is not None:
            pieces.append(None)
    if None not in pieces:
        whole = "".join(p for p in pieces if p is not None)
        return whole, whole, False
    first, last = pieces.index(None), len(pieces) - 1 - pieces[::-1].index(None)
    return ("".join(p for p in pieces[:first] if p is not None),
            "".join(p for p in pieces[last + 1:] if p is not None), True)


def _check_separate_principals(issuers: Sequence[JwtIssuer], source: str) -> None:
    """Refuse issuers whose templates could give two subjects the same principal.

    Two templates can only produce a common principal if the literal text
    before their first placeholder agrees (one is a prefix of the other) and
    the text after their last placeholder agrees too (one is a suffix of the
    other); otherwise every principal of one issuer differs from every
    principal of the other. The test is conservative: it may refuse templates
    that could in fact never meet, but never accepts two that can.
    """
    ends = [(issuer, *_template_ends(issuer)) for issuer in issuers]
    for index, (a, a_head, a_tail, a_open) in enumerate(ends):
        for b, b_head, b_tail, b_open in ends[index + 1:]:
            if not a_open and not b_open:
                apart = a_head != b_head
            else:
                apart = (not (a_head.startswith(b_head) or b_head.startswith(a_head))
                         or not (a_tail.endswith(b_tail) or b_tail.endswith(a_tail)))
            if not apart:
                raise AuthConfigError(
                    f"{source}: issuers {_clip(a.issuer)} and {_clip(b.issuer)} can map "
                    f"subjects to the same principal (principal templates "
                    f"{_clip(a.principal)} and {_clip(b.principal)}), so an identity of one "
                    "could act as an identity of the other. Give each issuer a 'principal' "
                    "template with its own literal suffix or prefix, e.g. "
                    "'serviceAccount:{sub}@cluster-a' and 'serviceAccount:{sub}@cluster-b'")


def _check_template(template: object, where: str) -> None:
    if not isinstance(template, str):
        raise AuthConfigError(f"{where}: 'principal' must be a string such as "
                              f"{DEFAULT_PRINCIPAL_TEMPLATE!r}")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AuthConfigError(f"{where}: 'principal' {_clip(template)}: {exc}") from None
    for _literal, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in _TEMPLATE_FIELDS or spec or conversion:
            raise AuthConfigError(
                f"{where}: 'principal' {_clip(template)} may only use the placeholders "
                "{sub}, {iss}, {namespace} and {name}")
    sample = template.format(sub="sub", iss="iss", namespace="ns", name="name")
    problem = member_problem(sample, ("user", "serviceAccount"))
    if problem:
        raise AuthConfigError(f"{where}: 'principal' {_clip(template)} does not make a "
                              "'user:…' or 'serviceAccount:…' principal")


def _load_public_key(path: Path, where: str) -> VerificationKey:
    data = _read_bytes(path, where)
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except ValueError:
        raise AuthConfigError(
            f"{where}: {path} is not a PEM public key or certificate") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise AuthConfigError(f"{where}: {path} holds a {type(key).__name__}; use an RSA, EC "
                              "or Ed25519 public key")
    return VerificationKey(key, None, None)


def _load_jwks(path: Path, where: str) -> tuple[VerificationKey, ...]:
    try:
        document = json.loads(_read_bytes(path, where))
    except (ValueError, RecursionError) as exc:
        raise AuthConfigError(f"{where}: {path} is not valid JSON ({_json_problem(exc)})"
                              ) from None
    jwks = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(jwks, list) or not jwks:
        raise AuthConfigError(f'{where}: {path} must be a JWKS: {{"keys": [...]}} with at least '
                              "one key")
    keys: list[VerificationKey] = []
    for index, jwk in enumerate(jwks):
        at = f"{where}: {path} key #{index + 1}"
        if not isinstance(jwk, dict):
            raise AuthConfigError(f"{at}: must be a JSON object")
        if jwk.get("kty") not in ("RSA", "EC", "OKP"):
            raise AuthConfigError(f"{at}: 'kty' must be RSA, EC or OKP (symmetric 'oct' keys "
                                  "are refused)")
        kid, alg = jwk.get("kid"), jwk.get("alg")
        if kid is not None and not isinstance(kid, str):
            raise AuthConfigError(f"{at}: 'kid' must be a string")
        if alg is not None and alg not in _ALGORITHM_KEY_TYPES:
            raise AuthConfigError(f"{at}: 'alg' {_clip(str(alg))} is not one of "
                                  + ", ".join(_ALGORITHM_KEY_TYPES))
        if "d" in jwk:
            raise AuthConfigError(f"{at}: is a private key; put only public keys in a JWKS")
        try:
            key = jwt.PyJWK(jwk).key
        except Exception:  # PyJWT and cryptography raise many kinds for a bad JWK
            raise AuthConfigError(f"{at}: not a usable public key") from None
        keys.append(VerificationKey(key, kid, alg))
    return tuple(keys)


# ---- client certificates --------------------------------------------------------------------


def principal_from_certificate(cert: Mapping[str, Any]) -> Principal:
    """The principal of a verified client certificate (ssl's getpeercert() form).

    - exactly one SPIFFE URI SAN ``spiffe://trust-domain/path`` →
      ``serviceAccount:spiffe://trust-domain/path``;
    - otherwise the first DNS SAN ``name`` → ``serviceAccount:name``;
    - no such SAN (a subject CN alone is not used) → UNAUTHENTICATED.
    """
    sans = cert.get("subjectAltName") or ()
    spiffe = [value for kind, value in sans if kind == "URI" and value.startswith("spiffe://")]
    if len(spiffe) > 1:
        raise Unauthenticated("the client certificate has more than one SPIFFE URI SAN")
    candidates = spiffe or [value for kind, value in sans if kind == "DNS"][:1]
    if not candidates:
        raise Unauthenticated("the client certificate has no SPIFFE URI SAN or DNS SAN to "
                              "identify the caller")
    member = f"serviceAccount:{candidates[0]}"
    if member_problem(member):
        raise Unauthenticated("the client certificate's SAN does not make a valid principal")
    return Principal(member, METHOD_MTLS)


# ---- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """What the transport tells about a caller."""

    host: str | None  # the peer's IP address; None for a unix socket
    tls: bool
    # The verified client certificate, in ssl's getpeercert() form; None or {} if none.
    client_cert: Mapping[str, Any] | None = None

    @property
    def bearer_allowed(self) -> bool:
        return self.tls or self.host is None or is_loopback(self.host)


class Authn:
    """The configured credential sources, and the rules that pick a principal."""

    def __init__(self, *, tokens: StaticTokens | None = None, jwts: JwtVerifier | None = None,
                 client_certs: bool = False) -> None:
        self.tokens = tokens
        self.jwts = jwts
        self.client_certs = client_certs

    @property
    def configured(self) -> bool:
        return self.tokens is not None or self.jwts is not None or self.client_certs

    def authenticate(self, authorization: Sequence[str], connection: Connection) -> Principal:
        """The caller's principal from its ``authorization`` metadata values and connection."""
        if len(authorization) > 1:
            raise Unauthenticated("more than one 'authorization' metadata entry; send one")
        if authorization:
            token = _bearer_token(authorization[0])
            if not connection.bearer_allowed:
                raise Unauthenticated(
                    f"bearer tokens are refused over plaintext from a non-loopback address "
                    f"({connection.host}); use TLS, a loopback address or the unix socket "
                    "(and consider the token exposed)")
            return self.verify_token(token)
        if self.client_certs and connection.client_cert:
            return principal_from_certificate(connection.client_cert)
        raise Unauthenticated("missing credentials: " + self._accepted(connection))

    def verify_token(self, token: str) -> Principal:
        if looks_like_jwt(token):
            if self.jwts is None:
                raise Unauthenticated("a JWT was presented, but this server has no JWT issuers "
                                      "configured")
            return self.jwts.verify(token)
        if self.tokens is None:
            raise Unauthenticated("a static token was presented, but this server has no "
                                  "tokens file configured")
        return self.tokens.verify(token)

    def _accepted(self, connection: Connection) -> str:
        accepted = []
        if self.tokens is not None or self.jwts is not None:
            accepted.append("'authorization: Bearer <token>' metadata")
        if self.client_certs:
            accepted.append("a TLS client certificate" if connection.tls
                            else "a TLS client certificate (over the TLS port)")
        return "send " + " or ".join(accepted)


def _bearer_token(value: str) -> str:
    scheme, space, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        # Name the scheme only when a space follows it ("Basic dXNl..."): a
        # value without one may be a bare token, and no part of it is shown.
        if space and scheme.isalpha() and len(scheme) <= 20:
            raise Unauthenticated(
                f"the 'authorization' metadata must be 'Bearer <token>' (got scheme {scheme!r})")
        raise Unauthenticated("the 'authorization' metadata must be 'Bearer <token>': it is not "
                              "a Bearer credential")
    token = token.strip()
    if not token:
        raise Unauthenticated("the 'authorization' metadata has an empty bearer token")
    if len(token.encode()) > MAX_TOKEN_BYTES:
        raise Unauthenticated(f"the bearer token is longer than {MAX_TOKEN_BYTES} bytes")
    return token


# ---- files ------------------------------------------------------------------------------------


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _json_problem(exc: BaseException) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else str(exc)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise AuthConfigError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def _read_config(path: Path, what: str) -> str:
    data = _read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthConfigError(f"{what} {path}: not UTF-8 text") from None
