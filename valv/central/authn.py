"""Authentication for central's gRPC server: settings, TLS, and the Authenticator.

The credential rules live in valv.core.authn; this module reads what they
need from a grpclib stream (the ``authorization`` metadata, whether the
connection is TLS and its verified client certificate, the peer address),
builds the server's TLS context, and decides between dev mode and
authenticated mode at startup:

- No tokens file, no JWT issuers and no client CA: dev mode. Every caller is
  ``user:dev`` with full rights, so central binds loopback by default and
  refuses a non-loopback address unless ``--insecure`` says so (with a loud
  warning in the log).
- Otherwise every call must authenticate. With TLS on the TCP port the
  default address is 0.0.0.0:50051. Without TLS (bearer tokens only), the
  default is loopback and a non-loopback address is refused unless
  ``--tls-terminated-by-proxy`` says a proxy on this host terminates TLS in
  front of central: else remote callers' tokens would cross the network in
  clear (and then be refused).
- Authenticated mode also needs a configured root key source, or an explicit
  ``--dev-root-key`` (checked by the server, valv.central.server).
"""

from __future__ import annotations

import logging
import socket
import ssl
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valv.central.calls import Authenticator, DevAuthenticator, peer_address
from valv.core.addresses import is_loopback
from valv.core.authn import (
    AuthConfigError,
    Authn,
    Connection,
    JwtVerifier,
    StaticTokens,
)
from valv.core.calls import CallContext
from valv.core.errors import Unauthenticated

log = logging.getLogger("valv.central.authn")

DEV_MODE_ADDRESS = "127.0.0.1:50051"
AUTHENTICATED_ADDRESS = "0.0.0.0:50051"  # with auth and TLS on: the documented default


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Where central's credentials come from (see README, "Authentication")."""

    tokens_file: Path | None = None
    jwt_issuers_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Request client certificates and accept those this CA (bundle) signed.
    tls_client_ca_file: Path | None = None
    # Allow dev mode (no authentication) on a non-loopback address.
    insecure: bool = False
    # Authenticated, without TLS, on a non-loopback address: a proxy on this
    # host (e.g. a service-mesh sidecar) terminates TLS in front of central.
    tls_terminated_by_proxy: bool = False

    @property
    def configured(self) -> bool:
        """Whether any caller authentication is configured (else: dev mode)."""
        return (self.tokens_file is not None or self.jwt_issuers_file is not None
                or self.tls_client_ca_file is not None)

    @property
    def tls(self) -> bool:
        """Whether the TCP port serves TLS."""
        return self.tls_cert_file is not None

    @property
    def default_address(self) -> str:
        # Without TLS, remote callers would send their tokens in clear: loopback.
        return AUTHENTICATED_ADDRESS if self.configured and self.tls else DEV_MODE_ADDRESS


@dataclass(slots=True)
class Authentication:
    """What the server needs: the call guard's Authenticator and the TCP port's TLS context."""

    authenticator: Authenticator
    ssl_context: ssl.SSLContext | None
    mode: str  # "dev" or "authenticated", for the startup log


def setup_authentication(settings: AuthSettings, host: str) -> Authentication:
    """Load and check the settings for a server on ``host``; AuthConfigError if unusable."""
    if settings.tls_client_ca_file is not None and settings.tls_cert_file is None:
        raise AuthConfigError("--tls-client-ca-file needs TLS: set --tls-cert-file and "
                              "--tls-key-file too")
    context = server_ssl_context(settings) if settings.tls_cert_file is not None else None
    if not settings.configured:
        if not is_loopback(host):
            if not settings.insecure:
                raise AuthConfigError(
                    f"refusing to serve {host} in dev mode: no authentication is configured, "
                    "so every caller would be user:dev with full rights. Configure "
                    "--tokens-file, --jwt-issuers-file or --tls-client-ca-file, bind a "
                    "loopback address, or pass --insecure (VALV_INSECURE=1) if you mean it")
            log.warning(
                "INSECURE: DEV MODE ON A NON-LOOPBACK ADDRESS %s. No authentication is "
                "configured: anyone who can reach this address is user:dev with full rights "
                "over every key.", host, extra={"fields": {"addr_host": host, "insecure": True}})
        return Authentication(DevAuthenticator(), context, "dev")
    if context is None and not is_loopback(host):
        if not settings.tls_terminated_by_proxy:
            raise AuthConfigError(
                f"refusing to serve {host} without TLS: callers elsewhere on the network would "
                "send their bearer tokens in clear (central refuses them, but only after they "
                "crossed the network). Set --tls-cert-file and --tls-key-file, bind a loopback "
                "address, or pass --tls-terminated-by-proxy (VALV_TLS_TERMINATED_BY_PROXY=1) "
                "if a proxy on this host terminates TLS in front of central")
        log.warning(
            "authenticated mode without TLS on the non-loopback address %s "
            "(--tls-terminated-by-proxy): only a proxy on this host that terminates TLS should "
            "reach this port; bearer tokens from non-loopback peers are refused", host,
            extra={"fields": {"addr_host": host, "tls_terminated_by_proxy": True}})
    authn = Authn(
        tokens=StaticTokens.load(settings.tokens_file) if settings.tokens_file else None,
        jwts=JwtVerifier.load(settings.jwt_issuers_file) if settings.jwt_issuers_file else None,
        client_certs=settings.tls_client_ca_file is not None)
    return Authentication(GrpcAuthenticator(authn), context, "authenticated")


def server_ssl_context(settings: AuthSettings) -> ssl.SSLContext:
    """TLS for the TCP port: TLS 1.2+, ALPN h2, client certificates if a client CA is set.

    Client certificates are requested but optional (CERT_OPTIONAL): one that
    is presented must chain to the client CA or the handshake fails, while a
    caller without one can still authenticate with a bearer token (and gets
    UNAUTHENTICATED, not a bare handshake failure, if it has neither).
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise AuthConfigError("TLS needs both --tls-cert-file and --tls-key-file")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except FileNotFoundError as exc:
        raise AuthConfigError(f"TLS certificate or key file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise AuthConfigError(
            f"cannot use TLS certificate {settings.tls_cert_file} with key "
            f"{settings.tls_key_file}: {_ssl_problem(exc)} (both must be PEM, the key must "
            "match the certificate and be unencrypted)") from None
    if settings.tls_client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.tls_client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise AuthConfigError(
                f"cannot use TLS client CA file {settings.tls_client_ca_file}: "
                f"{_ssl_problem(exc)} (it must hold PEM CA certificates)") from None
        context.verify_mode = ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def _ssl_problem(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def connection_of(stream: Any) -> Connection:
    """The facts about a grpclib stream's connection that authentication needs."""
    # grpclib's Peer offers addr() and cert(), but cert() cannot tell a plain
    # connection from a TLS one without a client certificate: read the
    # transport, as Peer itself does. (Covered by the TLS tests.)
    transport = stream.peer._transport
    ssl_object = transport.get_extra_info("ssl_object")
    sock = transport.get_extra_info("socket")
    peername = transport.get_extra_info("peername")
    host: str | None
    if sock is not None and sock.family == socket.AF_UNIX:
        host = None
    elif isinstance(peername, tuple) and peername:
        host = str(peername[0])
    else:
        host = ""  # unknown: treated as neither loopback nor a unix socket
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    return Connection(host=host, tls=ssl_object is not None, client_cert=cert or None)


class GrpcAuthenticator:
    """The call guard's Authenticator when authentication is configured."""

    def __init__(self, authn: Authn) -> None:
        self.authn = authn

    async def authenticate(self, rpc: str, stream: Any) -> CallContext:
        peer = peer_address(stream)
        authorization = [value for value in stream.metadata.getall("authorization", [])
                         if isinstance(value, str)]
        try:
            principal = self.authn.authenticate(authorization, connection_of(stream))
        except Unauthenticated as exc:
            # The message never holds the token; it is what the caller is told too.
            log.info("authentication failed", extra={"fields": {
                "rpc": rpc, "peer": peer, "reason": exc.message}})
            raise
        log.debug("authenticated", extra={"fields": {
            "rpc": rpc, "peer": peer, "principal": principal.member,
            "method": principal.method}})
        return CallContext(rpc=rpc, principal=principal, peer=peer,
                           request_id=uuid.uuid4().hex)
