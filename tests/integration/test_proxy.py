"""A silo behind an HTTP proxy: which proxy settings the silo's channel
(grpc_factory.create_channel) honours,
checked with a real CONNECT proxy in front of a mutual-TLS server (what docs/operations.md
states)."""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pf2lora.common.transport import grpc_factory
from tests.helpers.federation import pump
from tests.helpers.tls import make_pki

PROXY_VARS = (
    "grpc_proxy",
    "https_proxy",
    "http_proxy",
    "no_grpc_proxy",
    "no_proxy",
    "GRPC_PROXY",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_GRPC_PROXY",
    "NO_PROXY",
)


@dataclass
class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that records each request head; `refuse` answers 403."""

    refuse: bool = False
    heads: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        self.heads.append(head.decode())
        method, target, _ = head.decode().split("\r\n", 1)[0].split(" ")
        if self.refuse or method != "CONNECT":
            client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            client.close()
            return
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """A mutual-TLS server (cert for localhost) with the health service; (port, ca, cert, key) of a
    silo.
    """
    pki = make_pki()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    creds = grpc_factory.server_credentials(pki.ca_pem, pki.server.cert_pem, pki.server.key_pem)
    port = grpc_factory.add_port(server, "127.0.0.1:0", creds)
    server.start()
    yield port, pki.ca_pem, pki.client.cert_pem, pki.client.key_pem
    server.stop(0)


@pytest.fixture()
def proxy() -> Iterator[ConnectProxy]:
    p = ConnectProxy()
    yield p
    p.close()


def call(tls_server: tuple[int, bytes, bytes, bytes]) -> grpc.StatusCode:
    """One call as a silo dials: its channel factory, mutual TLS, the name in the certificate."""
    port, ca, cert, key = tls_server
    channel = grpc_factory.create_channel(
        f"localhost:{port}", grpc_factory.channel_credentials(ca, cert, key)
    )
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        channel.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("var", ["https_proxy", "http_proxy", "grpc_proxy"])
def test_lower_case_proxy_variables_tunnel_mutual_tls(
    var: str,
    tls_server: tuple[int, bytes, bytes, bytes],
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    assert call(tls_server) == grpc.StatusCode.OK
    # One tunnel to the NAME the silo dialled: the proxy resolves it, TLS runs end to end inside.
    assert [h.split("\r\n")[0] for h in proxy.heads] == [
        f"CONNECT localhost:{tls_server[0]} HTTP/1.1"
    ]


def test_proxy_credentials_are_sent_as_basic_auth(
    tls_server: tuple[int, bytes, bytes, bytes],
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", f"http://silo-a:s3cret@127.0.0.1:{proxy.port}")
    assert call(tls_server) == grpc.StatusCode.OK
    token = base64.b64encode(b"silo-a:s3cret").decode()
    assert f"Proxy-Authorization: Basic {token}" in proxy.heads[0]


@pytest.mark.parametrize(
    "env",
    [
        {"HTTPS_PROXY": "http://127.0.0.1:{port}"},  # upper case: ignored by gRPC
        {"https_proxy": "127.0.0.1:{port}"},  # no http:// scheme: ignored
        {"https_proxy": "https://127.0.0.1:{port}"},  # TLS to the proxy: not supported, ignored
        {"https_proxy": "http://127.0.0.1:{port}", "no_proxy": "localhost"},
        {"https_proxy": "http://127.0.0.1:{port}", "no_grpc_proxy": "localhost"},
    ],
    ids=["HTTPS_PROXY", "no-scheme", "https-scheme", "no_proxy", "no_grpc_proxy"],
)
def test_settings_that_bypass_the_proxy(
    env: dict[str, str],
    tls_server: tuple[int, bytes, bytes, bytes],
    proxy: ConnectProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(port=proxy.port))
    assert call(tls_server) == grpc.StatusCode.OK  # connected directly (loopback allows it)
    assert proxy.heads == []


def test_a_proxy_that_refuses_the_tunnel_is_unavailable(
    tls_server: tuple[int, bytes, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    refusing = ConnectProxy(refuse=True)
    try:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{refusing.port}")
        assert call(tls_server) == grpc.StatusCode.UNAVAILABLE  # the silo retries with backoff
        assert refusing.heads and refusing.heads[0].startswith("CONNECT localhost:")
    finally:
        refusing.close()


def test_grpc_proxy_wins_over_https_proxy_over_http_proxy(
    tls_server: tuple[int, bytes, bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    proxies = {var: ConnectProxy() for var in ("grpc_proxy", "https_proxy", "http_proxy")}
    try:
        for var, p in proxies.items():
            monkeypatch.setenv(var, f"http://127.0.0.1:{p.port}")
        assert call(tls_server) == grpc.StatusCode.OK
        monkeypatch.delenv("grpc_proxy")
        assert call(tls_server) == grpc.StatusCode.OK
        assert [len(p.heads) for p in proxies.values()] == [1, 1, 0]
    finally:
        for p in proxies.values():
            p.close()
