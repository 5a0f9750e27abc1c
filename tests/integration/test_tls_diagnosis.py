"""TLS failures explain themselves: each broken set-up behind gRPC's "Socket closed" or
"CERTIFICATE_VERIFY_FAILED" is named, with the file or setting to fix, by the silo and the CLI.

A real gRPC server with the coordinator's TLS credentials listens on loopback; the certificates
are made here with the project's PKI (other CA, wrong name, expired, not yet valid, refused).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pf2lora.cli.main import main
from pf2lora.common.transport import grpc_factory, pki, tls_check
from pf2lora.silo.client import CoordinatorClient, Stopped
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from tests.helpers.inprocess import silo_config
from tests.helpers.tls import write_tls_dir

NOW = dt.datetime.now(dt.UTC)
PAST = {"not_before": NOW - dt.timedelta(days=3), "not_after": NOW - dt.timedelta(days=1)}
FUTURE = {"not_before": NOW + dt.timedelta(days=1), "not_after": NOW + dt.timedelta(days=3)}
FED_CA = pki.create_ca("acme")
OTHER_CA = pki.create_ca("other")


def serve(tmp_path: Path, server_cert: pki.IssuedCertificate) -> tuple[grpc.Server, int]:
    """The coordinator's TLS server path (rotating credentials from files, client auth)."""
    d = tmp_path / "coordinator"
    write_tls_dir(d, FED_CA.cert_pem(), server_cert.cert_pem(), server_cert.key_pem())
    server = grpc_factory.create_server(2)
    port = grpc_factory.add_port(server, "127.0.0.1:0", grpc_factory.rotating_server_credentials(d))
    server.start()
    return server, port


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[int]:
    server, port = serve(tmp_path, pki.issue_server_cert(FED_CA, ("localhost",)))
    yield port
    server.stop(0)


def client_dir(
    tmp_path: Path, trusted: pki.CertificateAuthority, cert: pki.IssuedCertificate
) -> Path:
    d = tmp_path / "client"
    write_tls_dir(d, trusted.cert_pem(), cert.cert_pem(), cert.key_pem())
    return d


def grpc_fails(port: int, d: Path, server_name: str | None) -> str:
    """The premise: gRPC itself says only UNAVAILABLE; its detail, for comparison."""
    creds = grpc_factory.channel_credentials(*grpc_factory.TlsFiles.in_dir(d).read())
    channel = grpc_factory.create_channel(
        f"127.0.0.1:{port}", creds, server_name_override=server_name
    )
    try:
        silo_pb2_grpc.SiloApiStub(channel).Join(silo_pb2.JoinRequest(silo_id="a"), timeout=5)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE
        return str(exc.details())
    finally:
        channel.close()
    raise AssertionError("the call went through")


CLIENT_CASES = {
    # name: (trusted CA, client certificate, server name, cause, words the message must hold)
    "other-ca": (OTHER_CA, lambda: pki.issue_silo_cert(FED_CA, "a"), "localhost", "other-ca",
                 ["ca.crt", "not issued by the CA", "acme"]),
    "name-mismatch": (FED_CA, lambda: pki.issue_silo_cert(FED_CA, "a"), None, "name-mismatch",
                      ["'127.0.0.1'", 'server_name = "localhost"', "--server-name"]),
    "client-expired": (FED_CA, lambda: pki.issue_silo_cert(FED_CA, "a", **PAST), "localhost",
                       "client-expired", ["tls.crt", "expired", "issue-silo"]),
    "client-not-yet-valid": (FED_CA, lambda: pki.issue_silo_cert(FED_CA, "a", **FUTURE),
                             "localhost", "client-not-yet-valid", ["tls.crt", "clock"]),
    "client-other-ca": (FED_CA, lambda: pki.issue_silo_cert(OTHER_CA, "a"), "localhost",
                        "client-refused", ["tls.crt", "refused", "other", "not by the CA"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CLIENT_CASES))
def test_each_broken_setup_is_named_with_what_to_fix(
    case: str, coordinator: int, tmp_path: Path
) -> None:
    trusted, make_cert, server_name, cause, words = CLIENT_CASES[case]
    d = client_dir(tmp_path, trusted, make_cert())
    grpc_fails(coordinator, d, server_name)
    found = tls_check.diagnose(
        f"127.0.0.1:{coordinator}", grpc_factory.TlsFiles.in_dir(d), server_name
    )
    assert found.cause == cause, found.message
    for w in words:
        assert w in found.message, (w, found.message)
    assert tls_check.TROUBLESHOOTING in found.message
    if cause != "name-mismatch":  # a setting to change rather than a file
        assert str(d) in found.message


@pytest.mark.parametrize(
    ("validity", "cause"), [(PAST, "server-expired"), (FUTURE, "server-not-yet-valid")]
)
def test_a_coordinator_certificate_out_of_its_validity_is_named(
    validity: dict, cause: str, tmp_path: Path
) -> None:
    server, port = serve(tmp_path, pki.issue_server_cert(FED_CA, ("localhost",), **validity))
    try:
        d = client_dir(tmp_path, FED_CA, pki.issue_silo_cert(FED_CA, "a"))
        grpc_fails(port, d, "localhost")
        found = tls_check.diagnose(
            f"127.0.0.1:{port}", grpc_factory.TlsFiles.in_dir(d), "localhost"
        )
        assert found.cause == cause, found.message
        assert "clock" in found.message
        assert "CN=localhost" in found.message  # which certificate: the one the server showed
    finally:
        server.stop(0)


def test_a_working_setup_and_an_empty_port_are_told_apart(coordinator: int, tmp_path: Path) -> None:
    d = client_dir(tmp_path, FED_CA, pki.issue_silo_cert(FED_CA, "a"))
    files = grpc_factory.TlsFiles.in_dir(d)
    assert tls_check.diagnose(f"127.0.0.1:{coordinator}", files, "localhost").ok
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # a port that was free a moment ago: nobody listens there
    assert tls_check.diagnose(f"127.0.0.1:{port}", files, "localhost").cause == "unreachable"


def test_a_plaintext_server_is_named(tmp_path: Path) -> None:
    server = grpc_factory.create_server(1)
    port = grpc_factory.add_port(server, "127.0.0.1:0", None)
    server.start()
    try:
        d = client_dir(tmp_path, FED_CA, pki.issue_silo_cert(FED_CA, "a"))
        found = tls_check.diagnose(f"127.0.0.1:{port}", grpc_factory.TlsFiles.in_dir(d))
        assert found.cause == "not-tls" and "--insecure" in found.message
    finally:
        server.stop(0)


def test_the_silo_logs_the_cause_once_while_it_retries(
    coordinator: int, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = client_dir(tmp_path, OTHER_CA, pki.issue_silo_cert(FED_CA, "a"))
    cfg = silo_config(tmp_path / "state", "a", "acme", coordinator, tls_dir=d)
    stop = threading.Event()
    client = CoordinatorClient(cfg, stop)
    joining = threading.Thread(target=lambda: pytest.raises(Stopped, client.join, 10, "test"))
    with caplog.at_level(logging.WARNING, logger="pf2lora.silo.client"):
        joining.start()
        for _ in range(200):
            if sum(r.levelno == logging.ERROR for r in caplog.records) and len(caplog.records) > 4:
                break
            stop.wait(0.05)
        stop.set()
        joining.join(timeout=10)
    client.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(errors) == 1 and len(retries) >= 3  # said once, not on every retry
    assert "not issued by the CA in" in errors[0] and str(d / "ca.crt") in errors[0]


def test_the_cli_says_what_to_fix(
    coordinator: int, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    admin = pki.issue_admin_cert(FED_CA, "ops")
    d = client_dir(tmp_path, FED_CA, admin)
    rc = main(["run", "status", "--coordinator", f"127.0.0.1:{coordinator}", "--tls-dir", str(d)])
    err = capsys.readouterr().err
    assert rc != 0 and "server_name" in err and "--server-name" in err and "localhost" in err
