"""The one gRPC factory on its own: its options, and every mistake in TLS material or addresses
refused up front with the file or value named (gRPC itself would only fail a handshake later)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pf2lora.common.errors import ConfigError
from pf2lora.common.transport import grpc_factory, pki_files
from tests.helpers.tls import make_pki


def test_options_carry_message_limits_and_the_server_name() -> None:
    server = dict(grpc_factory.server_options())
    channel = dict(grpc_factory.channel_options("coordinator.example"))
    for opts in (server, channel):
        assert opts["grpc.max_receive_message_length"] > grpc_factory.MAX_CHUNK_SIZE
    assert channel["grpc.ssl_target_name_override"] == "coordinator.example"
    assert "grpc.ssl_target_name_override" not in dict(grpc_factory.channel_options())


def test_tls_material_that_does_not_fit_is_refused() -> None:
    one, two = make_pki("one"), make_pki("two")
    ca, cert, key = one.ca_pem, one.client.cert_pem, one.client.key_pem
    grpc_factory.channel_credentials(ca, cert, key)  # a matching set is fine
    grpc_factory.server_credentials(ca, one.server.cert_pem, one.server.key_pem)
    with pytest.raises(ConfigError, match="private key does not match the certificate"):
        grpc_factory.channel_credentials(ca, cert, two.client.key_pem)
    with pytest.raises(ConfigError, match="certificate and key must be given together"):
        grpc_factory.channel_credentials(ca, cert, None)
    with pytest.raises(ConfigError, match="CA bundle is not PEM"):
        grpc_factory.server_credentials(b"junk", one.server.cert_pem, one.server.key_pem)
    with pytest.raises(ConfigError, match="not an unencrypted PEM key"):
        grpc_factory.server_credentials(ca, one.server.cert_pem, b"junk")


def test_tls_files_name_the_one_that_cannot_be_read(
    tmp_path: Path, pki_factory: Callable[..., Path]
) -> None:
    role = pki_files.silo_dir(pki_factory("files", ["silo-a"], []), "silo-a")
    ca, cert, key = grpc_factory.TlsFiles.in_dir(role).read()
    assert b"BEGIN CERTIFICATE" in ca and b"PRIVATE KEY" in key
    described = grpc_factory.describe_certificate(cert)
    assert described.startswith("subject ") and " serial " in described and "expires" in described
    (role / "tls.key").unlink()
    with pytest.raises(ConfigError, match=r"TLS file '.*tls\.key': cannot read it"):
        grpc_factory.TlsFiles.in_dir(role).read()


def test_servers_bind_where_asked_and_refuse_bad_addresses() -> None:
    server = grpc_factory.create_server(1)
    try:
        port = grpc_factory.add_port(server, "127.0.0.1:0", None)
        assert port > 0
        with pytest.raises(ConfigError, match="cannot listen there"):
            grpc_factory.add_port(server, f"127.0.0.1:{port}", None)  # taken
    finally:
        server.stop(grace=None)
    with pytest.raises(ConfigError, match="max_workers=0"):
        grpc_factory.create_server(0)
    channel = grpc_factory.create_channel("127.0.0.1:1", None)
    assert isinstance(channel, grpc.Channel)
    channel.close()


def test_reconnection_follows_the_retry_policy_not_grpcs_two_minutes() -> None:
    opts = dict(grpc_factory.channel_options())
    assert opts["grpc.max_reconnect_backoff_ms"] <= 5000  # gRPC's default is 120 s
    custom = dict(grpc_factory.channel_options(reconnect_backoff_s=(0.2, 2.0)))
    assert (
        custom["grpc.initial_reconnect_backoff_ms"],
        custom["grpc.max_reconnect_backoff_ms"],
    ) == (
        200,
        2000,
    )
