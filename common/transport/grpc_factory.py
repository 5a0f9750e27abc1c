"""The one place that creates gRPC servers, channels and TLS credentials, each option with its
reason.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pf2lora.common.errors import ConfigError

logger = logging.getLogger(__name__)

# Tensor streams (pf2lora.common.wire.streams) cut tensors into chunks instead of raising gRPC's
# message limits: 1 MiB keeps per-message memory small and pipelines well; 4 MiB is the most
# a chunk may carry (docs/security.md: 1-4 MiB chunks).
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 4 << 20
# Room for everything in a message besides chunk data: a chunk's framing is ~20 bytes, the
# stream header holds the manifest (~150 bytes per tensor, so ~400 tensors of a rank-16 7B
# adapter take ~60 KiB). The limit stays "default-ish": a 4 MiB chunk plus this overhead.
MESSAGE_OVERHEAD_BYTES = 256 << 10
MAX_MESSAGE_BYTES = MAX_CHUNK_SIZE + MESSAGE_OVERHEAD_BYTES

# Keepalive (docs/security.md): both sides must agree or long idle calls die with "too many pings".
CLIENT_KEEPALIVE_TIME_MS = 60_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 20_000
SERVER_MIN_PING_INTERVAL_MS = 30_000
# Server-side connection age: makes long-lived clients reconnect, so a rotated server
# certificate (rotating_server_credentials) and a re-resolved coordinator address reach them.
DEFAULT_MAX_CONNECTION_AGE_S = 3600.0
# After the age is reached, calls in flight get this long to finish before the connection closes.
MAX_CONNECTION_AGE_GRACE_S = 300.0

# File names of the mounted TLS Secret (docs/CONTRACTS.md:
# /etc/pf2lora/tls/{ca.crt,tls.crt,tls.key}).
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


ClientInterceptor: TypeAlias = (
    grpc.UnaryUnaryClientInterceptor
    | grpc.UnaryStreamClientInterceptor
    | grpc.StreamUnaryClientInterceptor
    | grpc.StreamStreamClientInterceptor
)


def _message_limit_options() -> list[tuple[str, int]]:
    return [
        # Every message is a chunk of at most MAX_CHUNK_SIZE or a small header; anything larger
        # is a bug or an attack and is refused before it is buffered.
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # The same bound on sending fails fast on our side with a clear local error instead of
        # a RESOURCE_EXHAUSTED from the peer after the bytes went out.
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


def server_options(max_connection_age_s: float | None = DEFAULT_MAX_CONNECTION_AGE_S) -> list:
    """The channel arguments every pf2lora server uses."""
    options: list[tuple[str, int | str]] = [
        *_message_limit_options(),
        # Accept client keepalive pings during idle periods (clients send one every 60 s, even
        # with no call open) instead of answering GOAWAY "too many pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        # The server pings too, so a silo that vanished (power loss, network partition) while
        # holding a stream open is noticed within ~80 s and its thread is freed.
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        # Without this, gRPC stops sending keepalive pings after 2 pings with no data frame.
        ("grpc.http2.max_pings_without_data", 0),
        # Two servers on one port must fail loudly, not silently share (Linux default is 1).
        ("grpc.so_reuseport", 0),
    ]
    if max_connection_age_s is not None:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(MAX_CONNECTION_AGE_GRACE_S * 1000)),
        ]
    return options


# Reconnection after the server went away (a coordinator restart): gRPC's own defaults (1 s,
# growing 1.6x up to 120 s) let silos come back tens of seconds late; these follow the silo's
# retry policy instead (silo.toml [coordinator] retry_initial_s, retry_max_s).
DEFAULT_RECONNECT_BACKOFF_S = (0.5, 5.0)


def channel_options(
    server_name_override: str | None = None,
    reconnect_backoff_s: tuple[float, float] = DEFAULT_RECONNECT_BACKOFF_S,
) -> list:
    """The channel arguments every pf2lora client channel uses."""
    initial_s, max_s = reconnect_backoff_s
    options: list[tuple[str, int | str]] = [
        *_message_limit_options(),
        ("grpc.initial_reconnect_backoff_ms", int(initial_s * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(min(initial_s, max_s) * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(max_s * 1000)),
        # docs/security.md keepalive: detect a dead coordinator within ~80 s and keep NAT/firewall
        # state alive on idle connections; permitted by the server's ping policy above.
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Without this, gRPC stops sending keepalive pings after 2 pings with no data frame.
        ("grpc.http2.max_pings_without_data", 0),
        # Each channel gets its own connections: a channel opened after a certificate rotation
        # (docs/security.md: silos rotate by opening a new channel) does a fresh TLS handshake
        # instead of reusing a subchannel of an older channel.
        ("grpc.use_local_subchannel_pool", 1),
        # Identifies our traffic in coordinator and proxy logs.
        ("grpc.primary_user_agent", "pf2lora"),
    ]
    if server_name_override is not None:
        # Check the server certificate against this DNS name instead of the target's host
        # (tests dial 127.0.0.1 and expect "localhost"; port-forwards dial another name).
        options.append(("grpc.ssl_target_name_override", server_name_override))
    return options


def create_server(
    max_workers: int,
    *,
    interceptors: Sequence[grpc.ServerInterceptor] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    max_connection_age_s: float | None = DEFAULT_MAX_CONNECTION_AGE_S,
) -> grpc.Server:
    """A synchronous gRPC server with pf2lora's options; add services, then add_port and start.

    Each streaming call holds one worker thread for its duration, so max_workers bounds the
    number of concurrent uploads/downloads; maximum_concurrent_rpcs (None = unbounded) makes
    extra calls fail fast with RESOURCE_EXHAUSTED instead of queueing. A ServerInterceptor
    sees no auth context: identity checks wrap the handler it returns (docs/security.md).
    """
    if max_workers < 1:
        raise ConfigError(f"max_workers={max_workers!r}: must be at least 1")
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pf2lora-grpc"),
        interceptors=list(interceptors or ()),
        options=server_options(max_connection_age_s),
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
        # No compression: tensor bytes (floats, masked uint32) barely compress and it costs CPU.
        compression=grpc.Compression.NoCompression,
    )


def add_port(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind address ("host:port", port 0 = any free one) and return the bound port.

    credentials None serves plaintext and logs a warning: only for tests and `--insecure`.
    """
    try:
        if credentials is None:
            logger.warning(
                "serving gRPC on %s WITHOUT TLS: peers are not authenticated and traffic is "
                "readable on the network",
                address,
            )
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpcio raises RuntimeError("Failed to bind to address ...")
        raise ConfigError(f"address={address!r}: cannot listen there ({exc})") from exc
    if port == 0:
        raise ConfigError(f"address={address!r}: cannot listen there (address in use?)")
    return port


def create_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None,
    *,
    server_name_override: str | None = None,
    interceptors: Sequence[ClientInterceptor] | None = None,
    reconnect_backoff_s: tuple[float, float] = DEFAULT_RECONNECT_BACKOFF_S,
) -> grpc.Channel:
    """A client channel with pf2lora's options; credentials None is plaintext (logs a warning)."""
    options = channel_options(server_name_override, reconnect_backoff_s)
    if credentials is None:
        logger.warning(
            "connecting to %s WITHOUT TLS: the server is not authenticated and traffic is "
            "readable on the network",
            target,
        )
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, credentials, options=options)
    if interceptors:
        channel = grpc.intercept_channel(channel, *interceptors)
    return channel


def server_credentials(
    ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """Fixed TLS server credentials; clients must present a certificate issued by ca_pem."""
    _check_tls_material(ca_pem, cert_pem, key_pem, what="server credentials")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=require_client_auth
    )


def channel_credentials(
    ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """Client TLS credentials trusting only ca_pem, presenting cert_pem/key_pem (mutual TLS)."""
    if (cert_pem is None) != (key_pem is None):
        raise ConfigError("client certificate and key must be given together (or neither)")
    if cert_pem is not None and key_pem is not None:
        _check_tls_material(ca_pem, cert_pem, key_pem, what="client credentials")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA bundle, a certificate chain and its private key (PEM)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, tls_dir: str | Path) -> TlsFiles:
        """The mounted-Secret layout: tls_dir/{ca.crt,tls.crt,tls.key}."""
        d = Path(tls_dir)
        return cls(d / CA_FILE, d / CERT_FILE, d / KEY_FILE)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca_pem, cert_pem, key_pem); ConfigError naming the file if one cannot be read."""
        out = []
        for path in (self.ca, self.cert, self.key):
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"TLS file {str(path)!r}: cannot read it ({exc})") from exc
        return out[0], out[1], out[2]


def rotating_server_credentials(
    files: TlsFiles | str | Path, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    """TLS server credentials that re-read the files when they change.

    gRPC calls the fetcher before every new connection's handshake; it returns a new
    configuration only when the bytes on disk differ from the ones in use and form a valid
    certificate/key pair, so connections made after a rotation (Kubernetes updates a mounted
    Secret in place) get the new certificate and CA, and a half-written rotation keeps the old
    ones. Connections already open keep theirs (see DEFAULT_MAX_CONNECTION_AGE_S).
    """
    if not isinstance(files, TlsFiles):
        files = TlsFiles.in_dir(files)
    reloader = _CertificateReloader(files)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial_configuration(),
        reloader,
        require_client_authentication=require_client_auth,
    )


class _CertificateReloader:
    """Certificate-configuration fetcher for grpc.dynamic_ssl_server_credentials."""

    def __init__(self, files: TlsFiles) -> None:
        self._files = files
        self._lock = threading.Lock()  # gRPC may call the fetcher from several threads
        self._current: tuple[bytes, bytes, bytes] | None = None

    def initial_configuration(self) -> grpc.ServerCertificateConfiguration:
        material = self._files.read()
        _check_tls_material(*material, what=f"TLS files {self._files}")
        with self._lock:
            self._current = material
        logger.info("server certificate loaded: %s", describe_certificate(material[1]))
        return _certificate_configuration(material)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            material = self._files.read()
        except ConfigError as exc:
            logger.warning("keeping the current server certificate: %s", exc)
            return None
        with self._lock:
            if material == self._current:
                return None
            try:
                _check_tls_material(*material, what=f"TLS files {self._files}")
            except ConfigError as exc:
                logger.warning("keeping the current server certificate: %s", exc)
                return None
            self._current = material
        logger.info("server certificate reloaded: %s", describe_certificate(material[1]))
        return _certificate_configuration(material)


def _certificate_configuration(
    material: tuple[bytes, bytes, bytes],
) -> grpc.ServerCertificateConfiguration:
    ca_pem, cert_pem, key_pem = material
    return grpc.ssl_server_certificate_configuration(
        [(key_pem, cert_pem)], root_certificates=ca_pem
    )


def _check_tls_material(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, *, what: str) -> None:
    """ConfigError unless the PEMs parse and the key belongs to the (first) certificate.

    gRPC reports these mistakes only as failed handshakes later, far from the cause.
    """
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{what}: CA bundle is not PEM certificates ({exc})") from exc
    try:
        cert = x509.load_pem_x509_certificates(cert_pem)[0]
    except ValueError as exc:
        raise ConfigError(f"{what}: certificate is not PEM ({exc})") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what}: private key is not an unencrypted PEM key ({exc})") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise ConfigError(
            f"{what}: private key does not match the certificate ({describe_certificate(cert_pem)})"
        )


def describe_certificate(cert_pem: bytes) -> str:
    """Subject, serial and expiry of the first certificate of a PEM chain (for logs and errors)."""
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    return (
        f"subject {cert.subject.rfc4514_string()!r}, serial {cert.serial_number:x}, "
        f"expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M}Z"
    )


def create_health_server(
    address: str, *, max_workers: int = 2
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """A plaintext server carrying only grpc.health.v1, for Kubernetes probes (docs/security.md).

    Probes cannot present a client certificate, so health lives on its own port (default
    8081, docs/CONTRACTS.md) with nothing else on it. Returns (server, servicer, bound port),
    not started. The overall status ("") starts SERVING; set per-service statuses with
    servicer.set(name, health_pb2.HealthCheckResponse.SERVING / NOT_SERVING).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pf2lora-health"),
        # Health requests and replies are a few bytes.
        options=[("grpc.max_receive_message_length", 64 << 10), ("grpc.so_reuseport", 0)],
    )
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    # Plaintext on purpose (no warning): the health service exposes one status word.
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"address={address!r}: cannot listen there ({exc})") from exc
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, servicer, port


class UndecodableRequests(logging.Filter):
    """Bounds what undecodable requests cost the log: gRPC logs a traceback for each message it
    cannot deserialize (a fuzzer sends thousands). This filter on gRPC's own logger counts them
    (`on_count`), drops the tracebacks, and lets one line through per `every_s` seconds with the
    number seen since the last."""

    MESSAGE = "Exception deserializing message!"

    def __init__(self, on_count: Callable[[], None] | None = None, every_s: float = 60.0) -> None:
        super().__init__()
        self.on_count = on_count
        self.every_s = every_s
        self.seen = 0
        self._since = 0
        self._last = -math.inf
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.MESSAGE:
            return True
        if self.on_count is not None:
            self.on_count()
        with self._lock:
            self.seen += 1
            self._since += 1
            now = time.monotonic()
            if now - self._last < self.every_s:
                return False
            record.msg = "%d undecodable request(s) refused (INTERNAL) since the last report"
            record.args = (self._since,)
            record.exc_info, record.exc_text, record.levelno = None, None, logging.WARNING
            record.levelname = "WARNING"
            self._since, self._last = 0, now
            return True


def bound_undecodable_logs(on_count: Callable[[], None] | None = None) -> UndecodableRequests:
    """Install an UndecodableRequests filter on gRPC's logger (once per process)."""
    target = logging.getLogger("grpc._common")
    for f in target.filters:
        if isinstance(f, UndecodableRequests):
            target.removeFilter(f)
    flt = UndecodableRequests(on_count)
    target.addFilter(flt)
    return flt
