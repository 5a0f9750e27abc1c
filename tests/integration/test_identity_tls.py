"""Identities over real mutual TLS: who gets through the handshake, and who may call what."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.transport import grpc_factory, pki, pki_files
from pf2lora.common.transport.identity import (
    Identity,
    PermissionInterceptor,
    admin_only_interceptor,
    identity_from_cert,
    parse_spiffe_uri,
    peer_identity,
    require_admin,
    require_silo,
)

FED = "acme"
ALLOWED = frozenset({"hospital-a", "hospital-b"})  # hospital-c holds a valid cert, not admitted
SERVICE = "pf2lora.test.Probe"
TIMEOUT_S = 10


# --- the servers under test: raw-bytes methods, requests carry the claimed silo id
# -----------------


def _silo(request: bytes, context: grpc.ServicerContext) -> bytes:
    ident = require_silo(context, FED, request.decode(), ALLOWED)
    return ident.uri.encode()


def _silo_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    # A generator: the check runs while streaming, and the interceptor must still map it.
    ident = require_silo(context, FED, request.decode(), ALLOWED)
    for i in range(3):
        yield f"{ident.name}:{i}".encode()


def _admin(request: bytes, context: grpc.ServicerContext) -> bytes:
    return require_admin(context, FED).uri.encode()


def _other_federation(request: bytes, context: grpc.ServicerContext) -> bytes:
    return require_silo(context, "other", request.decode(), None).uri.encode()


def _whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
    return peer_identity(context, FED).uri.encode()


def _insecure_silo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return require_silo(context, FED, request.decode(), ALLOWED, insecure=True).uri.encode()


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Silo": grpc.unary_unary_rpc_method_handler(_silo),
            "SiloStream": grpc.unary_stream_rpc_method_handler(_silo_stream),
            "Admin": grpc.unary_unary_rpc_method_handler(_admin),
            "OtherFederation": grpc.unary_unary_rpc_method_handler(_other_federation),
            "WhoAmI": grpc.unary_unary_rpc_method_handler(_whoami),
            "InsecureSilo": grpc.unary_unary_rpc_method_handler(_insecure_silo),
        },
    )


@dataclass(frozen=True)
class Federation:
    dir: Path
    ca: pki.CertificateAuthority
    silo_port: int  # the silo API: PermissionInterceptor maps PermissionDenied
    control_port: int  # the control API: admin certificates only, on every method
    insecure_port: int  # plaintext, for the --insecure path


@pytest.fixture(scope="module")
def fed(pki_factory: Callable[..., Path]) -> Iterator[Federation]:
    d = pki_factory(FED, ["hospital-a", "hospital-b", "hospital-c"])
    ca = pki_files.load_ca(d)
    creds = grpc_factory.server_credentials(
        *pki_files.load_tls_material(pki_files.coordinator_dir(d))
    )
    servers = []
    ports = []
    for interceptors, tls in (
        ([PermissionInterceptor()], True),
        ([admin_only_interceptor(FED)], True),
        ([PermissionInterceptor()], False),
    ):
        server = grpc_factory.create_server(4, interceptors=interceptors)
        server.add_generic_rpc_handlers([_handlers()])
        ports.append(grpc_factory.add_port(server, "127.0.0.1:0", creds if tls else None))
        server.start()
        servers.append(server)
    yield Federation(d, ca, *ports)
    for server in servers:
        server.stop(grace=None)


def _call(
    port: int,
    method: str,
    request: bytes,
    *,
    ca_pem: bytes | None,
    client: pki.IssuedCertificate | None = None,
    server_name: str = "localhost",
) -> bytes | list[bytes]:
    """One call on a fresh channel; ca_pem None dials plaintext."""
    if ca_pem is None:
        creds = None
    elif client is None:
        creds = grpc_factory.channel_credentials(ca_pem)
    else:
        creds = grpc_factory.channel_credentials(ca_pem, client.cert_pem(), client.key_pem())
    channel = grpc_factory.create_channel(
        f"127.0.0.1:{port}", creds, server_name_override=server_name
    )
    try:
        if method == "SiloStream":
            stub = channel.unary_stream(f"/{SERVICE}/{method}")
            return list(stub(request, timeout=TIMEOUT_S))
        return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=TIMEOUT_S)
    finally:
        channel.close()


def _role(fed: Federation, role_dir: str) -> pki.IssuedCertificate:
    return _role_in(fed.dir, role_dir)


def _role_in(directory: Path, role_dir: str) -> pki.IssuedCertificate:
    m = pki_files.load_tls_material(directory / role_dir)
    key = load_pem_private_key(m.key, None)
    return pki.IssuedCertificate(x509.load_pem_x509_certificate(m.cert), key)  # type: ignore[arg-type]


def _code(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as exc:
        fn(*args, **kwargs)
    return exc.value.code(), exc.value.details() or ""


# --- the handshake: only certificates of this federation's CA, still valid, get through ----------


def test_silo_certificate_is_accepted_and_its_identity_read(fed: Federation) -> None:
    a = _role(fed, "silos/hospital-a")
    ca = fed.ca.cert_pem()
    assert _call(fed.silo_port, "Silo", b"hospital-a", ca_pem=ca, client=a) == (
        b"spiffe://acme/silo/hospital-a"
    )
    assert _call(fed.silo_port, "WhoAmI", b"", ca_pem=ca, client=a) == (
        b"spiffe://acme/silo/hospital-a"
    )
    assert _call(fed.silo_port, "SiloStream", b"hospital-a", ca_pem=ca, client=a) == [
        b"hospital-a:0",
        b"hospital-a:1",
        b"hospital-a:2",
    ]


def test_connection_without_client_certificate_is_refused(fed: Federation) -> None:
    code, _ = _code(_call, fed.silo_port, "Silo", b"hospital-a", ca_pem=fed.ca.cert_pem())
    assert code == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(fed: Federation) -> None:
    # Same federation name and silo id, another CA: the name proves nothing without the key.
    stranger = pki.issue_silo_cert(pki.create_ca(FED), "hospital-a")
    code, _ = _code(
        _call, fed.silo_port, "Silo", b"hospital-a", ca_pem=fed.ca.cert_pem(), client=stranger
    )
    assert code == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(fed: Federation) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue_silo_cert(
        fed.ca,
        "hospital-a",
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    code, _ = _code(
        _call, fed.silo_port, "Silo", b"hospital-a", ca_pem=fed.ca.cert_pem(), client=expired
    )
    assert code == grpc.StatusCode.UNAVAILABLE


def test_silo_refuses_a_server_without_the_dialed_name(fed: Federation) -> None:
    a = _role(fed, "silos/hospital-a")
    code, _ = _code(
        _call,
        fed.silo_port,
        "Silo",
        b"hospital-a",
        ca_pem=fed.ca.cert_pem(),
        client=a,
        server_name="coordinator.evil.example",
    )
    assert code == grpc.StatusCode.UNAVAILABLE


# --- authorization inside the handlers -----------------------------------------------------------


def test_silo_claiming_another_silo_is_denied(fed: Federation) -> None:
    a = _role(fed, "silos/hospital-a")
    ca = fed.ca.cert_pem()
    code, details = _code(_call, fed.silo_port, "Silo", b"hospital-b", ca_pem=ca, client=a)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "hospital-b" in details and "spiffe://acme/silo/hospital-a" in details
    code, _ = _code(_call, fed.silo_port, "SiloStream", b"hospital-b", ca_pem=ca, client=a)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_silo_certificate_on_admin_methods_is_denied(fed: Federation) -> None:
    a = _role(fed, "silos/hospital-a")
    ca = fed.ca.cert_pem()
    code, details = _code(_call, fed.silo_port, "Admin", b"", ca_pem=ca, client=a)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin required" in details
    for method in ("WhoAmI", "Silo"):  # the control server refuses silos on every method
        code, _ = _code(_call, fed.control_port, method, b"hospital-a", ca_pem=ca, client=a)
        assert code == grpc.StatusCode.PERMISSION_DENIED


def test_silo_not_on_the_allow_list_is_denied(fed: Federation) -> None:
    c = _role(fed, "silos/hospital-c")
    ca = fed.ca.cert_pem()
    assert _call(fed.silo_port, "WhoAmI", b"", ca_pem=ca, client=c) == (
        b"spiffe://acme/silo/hospital-c"
    )  # a valid certificate of this federation ...
    code, details = _code(_call, fed.silo_port, "Silo", b"hospital-c", ca_pem=ca, client=c)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "allow-list" in details  # ... not admitted


def test_admin_certificate_is_accepted_on_admin_methods_only(fed: Federation) -> None:
    ops = _role(fed, "admins/ops")
    ca = fed.ca.cert_pem()
    assert _call(fed.silo_port, "Admin", b"", ca_pem=ca, client=ops) == b"spiffe://acme/admin/ops"
    assert _call(fed.control_port, "WhoAmI", b"", ca_pem=ca, client=ops) == (
        b"spiffe://acme/admin/ops"
    )
    code, details = _code(_call, fed.silo_port, "Silo", b"ops", ca_pem=ca, client=ops)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "not a silo" in details


def test_identity_of_another_federation_is_denied(fed: Federation) -> None:
    a = _role(fed, "silos/hospital-a")
    code, details = _code(
        _call, fed.silo_port, "OtherFederation", b"hospital-a", ca_pem=fed.ca.cert_pem(), client=a
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'other'" in details


def test_certificate_with_two_identities_is_denied(fed: Federation) -> None:
    # Our CA never issues one; if a CA did, the identity would be ambiguous.
    uris = ["spiffe://acme/silo/hospital-a", "spiffe://acme/silo/hospital-b"]
    two = pki._issue_leaf(
        fed.ca,
        ["two"],
        [x509.UniformResourceIdentifier(u) for u in uris],
        ExtendedKeyUsageOID.CLIENT_AUTH,
        1,
        None,
        None,
    )
    with pytest.raises(InvalidArgument, match="2 SPIFFE URIs"):
        identity_from_cert(two.cert)
    code, details = _code(
        _call, fed.silo_port, "Silo", b"hospital-a", ca_pem=fed.ca.cert_pem(), client=two
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "expected one" in details


def test_identity_in_the_common_name_is_ignored(fed: Federation) -> None:
    # gRPC's peer_identities() reports the CN of a certificate without a SAN; it is not an identity.
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spiffe://acme/admin/ops")])
        )
        .issuer_name(fed.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(fed.ca.key, hashes.SHA256())
    )
    cn_only = pki.IssuedCertificate(cert, key)
    ca = fed.ca.cert_pem()
    code, details = _code(_call, fed.silo_port, "Admin", b"", ca_pem=ca, client=cn_only)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no subjectAltName" in details


def test_insecure_mode_trusts_the_claim_only_where_asked(fed: Federation) -> None:
    # --insecure: no TLS, the claimed id is the identity; the allow-list still applies.
    assert _call(fed.insecure_port, "InsecureSilo", b"hospital-b", ca_pem=None) == (
        b"spiffe://acme/silo/hospital-b"
    )
    code, _ = _code(_call, fed.insecure_port, "InsecureSilo", b"hospital-c", ca_pem=None)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _code(_call, fed.insecure_port, "InsecureSilo", b"Not/AnId", ca_pem=None)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # Without insecure=True, a plaintext caller has no identity at all.
    code, details = _code(_call, fed.insecure_port, "Silo", b"hospital-a", ca_pem=None)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "mutual TLS required" in details


def test_rotated_server_certificate_reaches_new_connections(
    pki_factory: Callable[..., Path],
) -> None:
    # pf2lora certs rotate-server writes the coordinator directory in place; the coordinator's
    # rotating credentials serve the new certificate on new connections, with the same CA.
    d = pki_factory(FED, ["hospital-a"], [])
    ca = pki_files.load_ca(d)
    server = grpc_factory.create_server(2, interceptors=[PermissionInterceptor()])
    server.add_generic_rpc_handlers([_handlers()])
    creds = grpc_factory.rotating_server_credentials(pki_files.coordinator_dir(d))
    port = grpc_factory.add_port(server, "127.0.0.1:0", creds)
    server.start()
    try:
        a = _role_in(d, "silos/hospital-a")
        kw = {"ca_pem": ca.cert_pem(), "client": a}
        assert _call(port, "WhoAmI", b"", **kw) == b"spiffe://acme/silo/hospital-a"
        code, _ = _code(_call, port, "WhoAmI", b"", server_name="coord.acme.svc", **kw)
        assert code == grpc.StatusCode.UNAVAILABLE  # not a name of the current certificate
        rotated = pki.issue_server_cert(ca, ["coord.acme.svc"])
        pki_files.write_role(pki_files.coordinator_dir(d), rotated, ca.cert, force=True)
        assert _call(port, "WhoAmI", b"", server_name="coord.acme.svc", **kw) == (
            b"spiffe://acme/silo/hospital-a"
        )
    finally:
        server.stop(grace=None)


# --- parsing -------------------------------------------------------------------------------------


def test_parse_spiffe_uri_round_trip() -> None:
    ident = parse_spiffe_uri("spiffe://acme/silo/hospital-a")
    assert ident == Identity("acme", "silo", "hospital-a")
    assert ident.uri == str(ident) == "spiffe://acme/silo/hospital-a"
    assert parse_spiffe_uri("spiffe://a/admin/ops").role == "admin"
    with pytest.raises(AttributeError):
        ident.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://acme/silo/",
        "spiffe://acme/silo",
        "spiffe://acme/silo/a/b",
        "spiffe://acme/silo/a/",
        "spiffe://acme//silo/a",
        "SPIFFE://acme/silo/a",
        "spiffe://Acme/silo/a",
        "spiffe://acme/Silo/a",
        "spiffe://acme/silo/A",
        "spiffe://acme:443/silo/a",
        "spiffe://user@acme/silo/a",
        "spiffe://acme/silo/a?x=1",
        "spiffe://acme/silo/a#frag",
        "spiffe://acme/silo/%61",
        "spiffe://acme/silo/a\n",
        " spiffe://acme/silo/a",
        "spiffe://acme/coordinator/x",
        "spiffe://acme.example.org/silo/a",
        "spiffe://acme/silo/-a",
        "spiffe://acme/silo/" + "a" * 64,
        "https://acme/silo/a",
    ],
)
def test_parse_spiffe_uri_is_strict(uri: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_spiffe_uri(uri)


@pytest.mark.parametrize(
    ("federation", "role", "name"),
    [("Acme", "silo", "a"), ("acme", "root", "a"), ("acme", "silo", ""), ("acme", "admin", "a_b")],
)
def test_identity_is_validated(federation: str, role: str, name: str) -> None:
    with pytest.raises(ConfigError):
        Identity(federation, role, name)  # type: ignore[arg-type]


def test_server_certificate_has_no_identity(fed: Federation) -> None:
    server = x509.load_pem_x509_certificate((fed.dir / "coordinator/tls.crt").read_bytes())
    with pytest.raises(InvalidArgument, match="no SPIFFE URI"):
        identity_from_cert(server)


def _leaf(fed: Federation, key: Any, sans: list[x509.GeneralName]) -> pki.IssuedCertificate:
    """A client certificate of this federation's CA with any key and any SANs."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe")]))
        .issuer_name(fed.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(fed.ca.key, hashes.SHA256())
    )
    return pki.IssuedCertificate(cert, key)


def test_only_a_uri_san_is_an_identity(fed: Federation) -> None:
    """A dNSName that spells a SPIFFE id is not one (gRPC's SAN property mixes SAN types)."""
    dns = _leaf(
        fed, ec.generate_private_key(ec.SECP256R1()), [x509.DNSName("spiffe://acme/admin/ops")]
    )
    code, details = _code(_call, fed.silo_port, "Admin", b"", ca_pem=fed.ca.cert_pem(), client=dns)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "no SPIFFE URI" in details


def test_a_uri_with_a_nul_is_refused_not_cut(fed: Federation) -> None:
    nul = _leaf(
        fed,
        ec.generate_private_key(ec.SECP256R1()),
        [x509.UniformResourceIdentifier("spiffe://acme/admin/ops\x00.attacker")],
    )
    code, _ = _code(_call, fed.silo_port, "Admin", b"", ca_pem=fed.ca.cert_pem(), client=nul)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_a_weak_client_key_is_refused(fed: Federation) -> None:
    weak = _leaf(
        fed,
        rsa.generate_private_key(public_exponent=65537, key_size=1024),
        [x509.UniformResourceIdentifier("spiffe://acme/silo/hospital-a")],
    )
    code, details = _code(
        _call, fed.silo_port, "Silo", b"hospital-a", ca_pem=fed.ca.cert_pem(), client=weak
    )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "1024 bits" in details
    small_curve = _leaf(
        fed,
        ec.generate_private_key(ec.SECP224R1()),
        [x509.UniformResourceIdentifier("spiffe://acme/silo/hospital-a")],
    )
    from pf2lora.common.transport.identity import check_key_strength

    with pytest.raises(InvalidArgument, match="P-256 or stronger"):
        check_key_strength(small_curve.cert, "probe")
