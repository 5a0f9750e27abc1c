"""Tensor streams over real gRPC servers from grpc_factory: 200 MB round trip, refusals, mutual TLS,
rotation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from cryptography.x509 import DNSName, verification
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pf2lora.common.errors import ConfigError, InvalidArgument
from pf2lora.common.transport import grpc_factory
from pf2lora.common.wire import streams
from pf2lora.common.wire.manifest import manifest_digest, tensor_spec
from pf2lora.v1 import tensors_pb2 as pb
from tests.helpers import tls as tlsutil

SERVICE = "pf2lora.test.TensorEcho"
TIMEOUT_S = 60.0


class EchoService:
    """Keeps the last upload and streams it back; a stand-in for PushUpdate / FetchGlobal."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.info: streams.StreamInfo | None = None
        self.peer_sans: list[bytes] = []
        self._lock = threading.Lock()

    def upload(self, request_iterator: Iterator[pb.StreamMessage], context: grpc.ServicerContext):
        self.peer_sans = list(context.auth_context().get("x509_subject_alternative_name", []))
        try:
            info, tensors = streams.stream_to_tensors(request_iterator)
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        with self._lock:
            self.info, self.tensors = info, tensors
        return pb.StreamMessage(
            trailer=pb.StreamTrailer(
                manifest_digest=info.manifest_digest, total_bytes=info.total_bytes
            )
        )

    def download(self, request: pb.StreamMessage, context: grpc.ServicerContext):
        with self._lock:
            tensors = self.tensors
        yield from streams.tensors_to_stream(
            tensors,
            run_id=request.header.run_id,
            round=request.header.round,
            kind=streams.StreamKind.GLOBAL_MODEL,
            chunk_size=request.header.chunk_size or grpc_factory.DEFAULT_CHUNK_SIZE,
        )

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Upload": grpc.stream_unary_rpc_method_handler(
                    self.upload,
                    request_deserializer=pb.StreamMessage.FromString,
                    response_serializer=pb.StreamMessage.SerializeToString,
                ),
                "Download": grpc.unary_stream_rpc_method_handler(
                    self.download,
                    request_deserializer=pb.StreamMessage.FromString,
                    response_serializer=pb.StreamMessage.SerializeToString,
                ),
            },
        )


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.upload = channel.stream_unary(
            f"/{SERVICE}/Upload",
            request_serializer=pb.StreamMessage.SerializeToString,
            response_deserializer=pb.StreamMessage.FromString,
        )
        self.download = channel.unary_stream(
            f"/{SERVICE}/Download",
            request_serializer=pb.StreamMessage.SerializeToString,
            response_deserializer=pb.StreamMessage.FromString,
        )

    def push(self, tensors, **kw) -> pb.StreamMessage:
        stream = streams.tensors_to_stream(tensors, run_id="run-1", round=3, kind="UPDATE", **kw)
        return self.upload(stream, timeout=TIMEOUT_S)

    def fetch(self, chunk_size: int = 0) -> tuple[streams.StreamInfo, dict[str, torch.Tensor]]:
        request = pb.StreamMessage(
            header=pb.StreamHeader(run_id="run-1", round=4, chunk_size=chunk_size)
        )
        return streams.stream_to_tensors(self.download(request, timeout=TIMEOUT_S))


def _serve(credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, EchoService, int]:
    service = EchoService()
    server = grpc_factory.create_server(max_workers=4)
    server.add_generic_rpc_handlers((service.handler(),))
    port = grpc_factory.add_port(server, "127.0.0.1:0", credentials)
    server.start()
    return server, service, port


@pytest.fixture(scope="module")
def insecure_server():
    server, service, port = _serve(None)
    yield service, port
    server.stop(grace=None)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN-safe)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


# -- plaintext -------------------------------------------------------------------------------


def test_200mb_round_trip_bit_identical(insecure_server):
    service, port = insecure_server
    gen = torch.Generator().manual_seed(0)
    # 200 MB of fp32 in four tensors of 50 MB, plus small odd ones.
    big = {f"layer.{i}.lora_B.weight": torch.randn(3200, 4096, generator=gen) for i in range(4)}
    big["odd.bf16"] = torch.randn(7, 3, generator=gen).bfloat16()
    big["scalar"] = torch.tensor(1.5)
    big["empty"] = torch.empty(0, 8)
    total = sum(t.numel() * t.element_size() for t in big.values())
    assert total >= 200 * 1024 * 1024 // 1.05

    with grpc_factory.create_channel(f"127.0.0.1:{port}", None) as channel:
        client = Client(channel)
        started = time.perf_counter()
        ack = client.push(big, scalars={"num_samples": 128.0})
        up = time.perf_counter() - started
        assert ack.trailer.manifest_digest == manifest_digest(
            [tensor_spec(n, t) for n, t in big.items()]
        )
        assert service.info is not None and service.info.scalars == {"num_samples": 128.0}
        started = time.perf_counter()
        info, back = client.fetch()
        down = time.perf_counter() - started
    print(f"200 MB up {up:.2f} s, down {down:.2f} s")
    assert info.kind is streams.StreamKind.GLOBAL_MODEL and info.round == 4
    assert list(back) == list(big)
    for name, tensor in big.items():
        assert _same(tensor, back[name]), name


def test_4mib_chunks_fit_the_message_limit(insecure_server):
    _, port = insecure_server
    tensors = {"w": torch.randn(3 * 1024 * 1024)}  # 12 MiB: three full 4 MiB chunks
    with grpc_factory.create_channel(f"127.0.0.1:{port}", None) as channel:
        client = Client(channel)
        client.push(tensors, chunk_size=grpc_factory.MAX_CHUNK_SIZE)
        _, back = client.fetch(chunk_size=grpc_factory.MAX_CHUNK_SIZE)
    assert _same(tensors["w"], back["w"])


def test_default_chunks_pass_grpc_untouched_defaults(insecure_server):
    """1 MiB chunks need no raised limit: a bare channel with gRPC's 4 MiB default works."""
    _, port = insecure_server
    tensors = {"w": torch.randn(2 * 1024 * 1024)}
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = Client(channel)
        client.push(tensors)
        _, back = client.fetch()
    assert _same(tensors["w"], back["w"])


def _corrupt_chunk(messages: list[pb.StreamMessage]) -> list[pb.StreamMessage]:
    chunk = next(m for m in messages if m.WhichOneof("body") == "chunk")
    data = bytearray(chunk.chunk.data)
    data[10] ^= 0x01
    chunk.chunk.data = bytes(data)
    return messages


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (_corrupt_chunk, "SHA-256"),
        (lambda ms: ms[:-1], "truncated"),
        (lambda ms: ms[1:], "must start with a header"),
    ],
    ids=["flipped-bit", "no-trailer", "no-header"],
)
def test_bad_stream_refused_with_invalid_argument(insecure_server, mutate, needle):
    _, port = insecure_server
    tensors = {"adapter.lora_A": torch.randn(64, 1024)}
    messages = mutate(list(streams.tensors_to_stream(tensors, run_id="r", round=1, kind="UPDATE")))
    with grpc_factory.create_channel(f"127.0.0.1:{port}", None) as channel:
        with pytest.raises(grpc.RpcError) as err:
            Client(channel).upload(iter(messages), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_oversized_message_refused_by_limit(insecure_server):
    """A message above MAX_MESSAGE_BYTES never reaches the handler."""
    _, port = insecure_server
    huge = pb.StreamMessage(chunk=pb.TensorChunk(data=b"\0" * (grpc_factory.MAX_MESSAGE_BYTES + 1)))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # no send limit on our side
        with pytest.raises(grpc.RpcError) as err:
            Client(channel).upload(iter([huge]), timeout=TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_port_in_use_is_a_config_error(insecure_server):
    _, port = insecure_server
    server = grpc_factory.create_server(max_workers=1)
    with pytest.raises(ConfigError, match="cannot listen"):
        grpc_factory.add_port(server, f"127.0.0.1:{port}", None)


def test_health_server_is_separate_and_plaintext():
    server, servicer, port = grpc_factory.create_health_server("127.0.0.1:0")
    server.start()
    try:
        servicer.set("pf2lora.v1.Silo", health_pb2.HealthCheckResponse.NOT_SERVING)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            silo = stub.Check(health_pb2.HealthCheckRequest(service="pf2lora.v1.Silo"), timeout=5)
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
            assert silo.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # Nothing else is served there.
            with pytest.raises(grpc.RpcError) as err:
                Client(channel).upload(iter([]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)


# -- mutual TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki():
    return tlsutil.make_pki()


def test_test_certificates_pass_rfc5280_verification(pki):
    store = verification.Store([pki.ca.cert])
    server_verifier = (
        verification.PolicyBuilder().store(store).build_server_verifier(DNSName("localhost"))
    )
    server_verifier.verify(pki.server.cert, [])
    verified = (
        verification.PolicyBuilder()
        .store(store)
        .build_client_verifier()
        .verify(pki.client.cert, [])
    )
    assert [u.value for u in verified.subjects] == ["spiffe://test/silo/silo-a"]


@pytest.fixture(scope="module")
def tls_server(pki):
    creds = grpc_factory.server_credentials(pki.ca_pem, pki.server.cert_pem, pki.server.key_pem)
    server, service, port = _serve(creds)
    yield service, port
    server.stop(grace=None)


def test_mutual_tls_round_trip_and_peer_identity(pki, tls_server):
    service, port = tls_server
    creds = grpc_factory.channel_credentials(pki.ca_pem, pki.client.cert_pem, pki.client.key_pem)
    tensors = {
        "a": torch.randn(1000, 1000),
        "m": torch.arange(1 << 20, dtype=torch.int64).to(torch.uint32),
    }
    with grpc_factory.create_channel(
        f"127.0.0.1:{port}", creds, server_name_override="localhost"
    ) as channel:
        client = Client(channel)
        client.push(tensors)
        _, back = client.fetch()
    assert service.peer_sans == [b"spiffe://test/silo/silo-a"]
    assert all(_same(tensors[k], back[k]) for k in tensors)


def test_mutual_tls_by_dns_name(pki, tls_server):
    _, port = tls_server
    creds = grpc_factory.channel_credentials(pki.ca_pem, pki.client.cert_pem, pki.client.key_pem)
    with grpc_factory.create_channel(f"localhost:{port}", creds) as channel:
        Client(channel).push({"x": torch.ones(3)})


def _refused(channel_target: str, creds: grpc.ChannelCredentials, **kw) -> grpc.StatusCode:
    with grpc_factory.create_channel(channel_target, creds, **kw) as channel:
        with pytest.raises(grpc.RpcError) as err:
            Client(channel).push({"x": torch.ones(3)})
    return err.value.code()


def test_client_without_certificate_is_refused(pki, tls_server):
    _, port = tls_server
    creds = grpc_factory.channel_credentials(pki.ca_pem)
    code = _refused(f"127.0.0.1:{port}", creds, server_name_override="localhost")
    assert code == grpc.StatusCode.UNAVAILABLE


def test_client_from_another_ca_is_refused(tls_server):
    _, port = tls_server
    other = tlsutil.make_pki(federation="other")
    # Trusts the right server CA? No: its own CA, and presents a cert the server does not trust.
    creds = grpc_factory.channel_credentials(
        other.ca_pem, other.client.cert_pem, other.client.key_pem
    )
    code = _refused(f"127.0.0.1:{port}", creds, server_name_override="localhost")
    assert code == grpc.StatusCode.UNAVAILABLE


def test_mismatched_key_is_a_config_error(pki):
    with pytest.raises(ConfigError, match="does not match"):
        grpc_factory.server_credentials(pki.ca_pem, pki.server.cert_pem, pki.client.key_pem)
    with pytest.raises(ConfigError, match="together"):
        grpc_factory.channel_credentials(pki.ca_pem, pki.client.cert_pem, None)


def test_rotating_server_credentials_serve_new_cert_to_new_connections(tmp_path):
    first = tlsutil.make_pki(federation="one")
    second = tlsutil.make_pki(federation="two")
    tls_dir = tmp_path / "tls"
    tlsutil.write_tls_dir(tls_dir, first.ca_pem, first.server.cert_pem, first.server.key_pem)
    server, _, port = _serve(grpc_factory.rotating_server_credentials(tls_dir))
    target = f"127.0.0.1:{port}"

    def creds(p):
        return grpc_factory.channel_credentials(p.ca_pem, p.client.cert_pem, p.client.key_pem)

    try:
        old_channel = grpc_factory.create_channel(
            target, creds(first), server_name_override="localhost"
        )
        Client(old_channel).push({"x": torch.ones(3)})

        # A half-done rotation (new certificate, old key) is ignored: still the first cert.
        (tls_dir / "tls.crt").write_bytes(second.server.cert_pem)
        with grpc_factory.create_channel(
            target, creds(first), server_name_override="localhost"
        ) as ch:
            Client(ch).push({"x": torch.ones(3)})

        # The full rotation: new connections see only the new CA's certificate ...
        tlsutil.write_tls_dir(tls_dir, second.ca_pem, second.server.cert_pem, second.server.key_pem)
        with grpc_factory.create_channel(
            target, creds(second), server_name_override="localhost"
        ) as ch:
            Client(ch).push({"x": torch.ones(3)})
        assert _refused(target, creds(first), server_name_override="localhost") == (
            grpc.StatusCode.UNAVAILABLE
        )
        # ... while a connection opened before the rotation keeps working.
        Client(old_channel).push({"x": torch.ones(3)})
        old_channel.close()
    finally:
        server.stop(grace=None)


def test_rotating_credentials_need_valid_files_at_start(tmp_path, pki):
    tlsutil.write_tls_dir(tmp_path, pki.ca_pem, pki.server.cert_pem, pki.client.key_pem)
    with pytest.raises(ConfigError, match="does not match"):
        grpc_factory.rotating_server_credentials(tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        grpc_factory.rotating_server_credentials(tmp_path / "missing")
