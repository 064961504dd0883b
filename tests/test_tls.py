"""TLS and client certificates, through real central processes and Google's client.

Every test's CA is made here with ``cryptography``: a server certificate for
127.0.0.1 (IP SAN) and localhost (DNS SAN), and client certificates with a
SPIFFE URI SAN, a DNS SAN only, no SAN, or from an unknown CA.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from google.api_core import exceptions as gexc
from google.cloud import kms_v1
from google.cloud.kms_v1.services.key_management_service.transports import (
    KeyManagementServiceGrpcTransport,
)

from tests.helpers import CentralProcess
from tests.test_authn import (
    ALICE_TOKEN,
    assert_authenticated,
    assert_unauthenticated,
    authenticated_lines,
    bearer,
    last_principal,
    probe,
    root_key_env,
    run_valv,
    serving_line,
    write_tokens_file,
)

Client = kms_v1.KeyManagementServiceClient
SPIFFE_ID = "spiffe://cluster.local/ns/payments/sa/api"


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes


class CA:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.name = subject
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, sans: list[x509.GeneralName], *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM),
                      key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))


@dataclass
class Pki:
    ca: CA
    dir: Path
    server_cert: Path
    server_key: Path
    ca_file: Path
    spiffe: Issued
    dns_only: Issued
    no_san: Issued
    stranger: Issued  # valid SANs, but signed by a CA the server does not trust


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    work = tmp_path_factory.mktemp("pki")
    ca = CA("valv test CA")
    server = ca.issue("valv central", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                       x509.DNSName("localhost")], server=True)
    (work / "server.pem").write_bytes(server.cert_pem)
    (work / "server.key").write_bytes(server.key_pem)
    (work / "server.key").chmod(0o600)
    (work / "ca.pem").write_bytes(ca.pem)
    return Pki(
        ca=ca, dir=work, server_cert=work / "server.pem", server_key=work / "server.key",
        ca_file=work / "ca.pem",
        spiffe=ca.issue("api", [x509.UniformResourceIdentifier(SPIFFE_ID),
                                x509.DNSName("api.payments.svc")], server=False),
        dns_only=ca.issue("batch", [x509.DNSName("batch.jobs.svc"),
                                    x509.DNSName("batch.example.com")], server=False),
        no_san=ca.issue("nameless", [], server=False),
        stranger=CA("someone else's CA").issue(
            "intruder", [x509.UniformResourceIdentifier(SPIFFE_ID)], server=False))


def tls_client(central: CentralProcess, pki: Pki, identity: Issued | None = None) -> Client:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem,
        private_key=identity.key_pem if identity else None,
        certificate_chain=identity.cert_pem if identity else None)
    channel = grpc.secure_channel(central.addr, credentials)
    return Client(transport=KeyManagementServiceGrpcTransport(channel=channel))


@pytest.fixture(scope="module")
def mtls_central(tmp_path_factory: pytest.TempPathFactory, pki: Pki
                 ) -> Iterator[CentralProcess]:
    """TLS with client certificates, and static tokens too."""
    work = tmp_path_factory.mktemp("mtls")
    tokens = write_tokens_file(work / "tokens.json", {"user:alice@example.com": ALICE_TOKEN})
    process = CentralProcess(
        work / "central", "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key), "--tls-client-ca-file", str(pki.ca_file),
        "--tokens-file", str(tokens), "--log-level", "debug", env=root_key_env()).start()
    yield process
    process.stop()


def test_spiffe_client_certificate(mtls_central: CentralProcess, pki: Pki) -> None:
    assert_authenticated(probe(tls_client(mtls_central, pki, pki.spiffe)))
    assert last_principal(mtls_central) == (f"serviceAccount:{SPIFFE_ID}", "mtls")


def test_dns_san_client_certificate_uses_the_first_dns_name(mtls_central: CentralProcess,
                                                           pki: Pki) -> None:
    assert_authenticated(probe(tls_client(mtls_central, pki, pki.dns_only)))
    assert last_principal(mtls_central) == ("serviceAccount:batch.jobs.svc", "mtls")


def test_client_certificate_without_a_san_is_unauthenticated(mtls_central: CentralProcess,
                                                             pki: Pki) -> None:
    assert_unauthenticated(probe(tls_client(mtls_central, pki, pki.no_san)),
                           "no SPIFFE URI SAN or DNS SAN")


def test_no_client_certificate_and_no_token_is_unauthenticated(mtls_central: CentralProcess,
                                                               pki: Pki) -> None:
    message = assert_unauthenticated(probe(tls_client(mtls_central, pki)), "missing")
    assert "client certificate" in message and "Bearer" in message


def test_bearer_token_over_tls_without_a_client_certificate(mtls_central: CentralProcess,
                                                            pki: Pki) -> None:
    assert_authenticated(probe(tls_client(mtls_central, pki), bearer(ALICE_TOKEN)))
    assert last_principal(mtls_central) == ("user:alice@example.com", "token")


def test_token_as_channel_call_credentials(mtls_central: CentralProcess, pki: Pki) -> None:
    """The other way to send a token: gRPC call credentials on a TLS channel."""
    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=pki.ca.pem),
        grpc.access_token_call_credentials(ALICE_TOKEN))
    channel = grpc.secure_channel(mtls_central.addr, credentials)
    assert_authenticated(probe(Client(transport=KeyManagementServiceGrpcTransport(
        channel=channel))))
    assert last_principal(mtls_central) == ("user:alice@example.com", "token")


def test_bearer_token_wins_over_a_client_certificate(mtls_central: CentralProcess,
                                                     pki: Pki) -> None:
    assert_authenticated(probe(tls_client(mtls_central, pki, pki.spiffe), bearer(ALICE_TOKEN)))
    assert last_principal(mtls_central) == ("user:alice@example.com", "token")
    # A wrong token is not rescued by the certificate.
    assert_unauthenticated(probe(tls_client(mtls_central, pki, pki.spiffe), bearer("nope")),
                           "unknown token")


def test_client_certificate_from_an_unknown_ca_fails_the_handshake(
        mtls_central: CentralProcess, pki: Pki) -> None:
    before = len(authenticated_lines(mtls_central))
    error = probe(tls_client(mtls_central, pki, pki.stranger))
    assert isinstance(error, gexc.ServiceUnavailable), error
    assert len(authenticated_lines(mtls_central)) == before


def test_plaintext_client_cannot_talk_to_the_tls_port(mtls_central: CentralProcess) -> None:
    assert isinstance(probe(mtls_central.client(), bearer(ALICE_TOKEN)),
                      gexc.ServiceUnavailable)


def test_client_that_does_not_trust_the_server_fails(mtls_central: CentralProcess) -> None:
    other = CA("untrusted root")
    channel = grpc.secure_channel(mtls_central.addr,
                                  grpc.ssl_channel_credentials(root_certificates=other.pem))
    kms = Client(transport=KeyManagementServiceGrpcTransport(channel=channel))
    assert isinstance(probe(kms), gexc.ServiceUnavailable)


def test_authenticated_tls_central_may_listen_on_any_address(tmp_path: Path, pki: Pki) -> None:
    """With TLS, tokens never cross the network in clear: a non-loopback bind is fine."""
    tokens = write_tokens_file(tmp_path / "tokens.json", {"user:alice@example.com": ALICE_TOKEN})
    process = CentralProcess(tmp_path / "c", "--addr", "0.0.0.0:0",
                             "--tls-cert-file", str(pki.server_cert),
                             "--tls-key-file", str(pki.server_key),
                             "--tokens-file", str(tokens), env=root_key_env()).start()
    try:
        assert process.addr.startswith("0.0.0.0:")
        process.addr = "127.0.0.1:" + process.addr.rsplit(":", 1)[1]
        assert_authenticated(probe(tls_client(process, pki), bearer(ALICE_TOKEN)))
        serving = serving_line(process)
        assert serving["tls"] is True and serving["auth"] == "authenticated"
    finally:
        process.stop()


def test_tls_in_dev_mode_works_with_googles_client(tmp_path: Path, pki: Pki) -> None:
    """TLS alone is not authentication: dev mode, over TLS, on loopback."""
    process = CentralProcess(tmp_path / "c", "--tls-cert-file", str(pki.server_cert),
                             "--tls-key-file", str(pki.server_key)).start()
    try:
        kms = tls_client(process, pki)
        ring = kms.create_key_ring(request={"parent": "projects/tls/locations/global",
                                            "key_ring_id": "r", "key_ring": {}},
                                   retry=None, timeout=10)
        assert ring.name == "projects/tls/locations/global/keyRings/r"
        serving = serving_line(process)
        assert serving["tls"] is True and serving["auth"] == "dev"
    finally:
        process.stop()


@pytest.mark.parametrize(("problem", "expect"), [
    ("missing-key", "not found"),
    ("mismatched-key", "cannot use TLS certificate"),
    ("garbage-ca", "cannot use TLS client CA file"),
    ("ca-without-cert", "needs TLS"),
    ("cert-without-key", "both --tls-cert-file and --tls-key-file"),
])
def test_bad_tls_settings_exit_2(tmp_path: Path, pki: Pki, problem: str, expect: str) -> None:
    other_key = CA("x").issue("x", [], server=True).key_pem
    (tmp_path / "other.key").write_bytes(other_key)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    args = {
        "missing-key": ["--tls-cert-file", str(pki.server_cert),
                        "--tls-key-file", str(tmp_path / "absent.key")],
        "mismatched-key": ["--tls-cert-file", str(pki.server_cert),
                           "--tls-key-file", str(tmp_path / "other.key")],
        "garbage-ca": ["--tls-cert-file", str(pki.server_cert),
                       "--tls-key-file", str(pki.server_key),
                       "--tls-client-ca-file", str(tmp_path / "garbage.pem")],
        "ca-without-cert": ["--tls-client-ca-file", str(pki.ca_file)],
        "cert-without-key": ["--tls-cert-file", str(pki.server_cert)],
    }[problem]
    result = run_valv("central", "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                      *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expect in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
