"""The plaintext HTTP `/metrics` endpoint both daemons serve from their own prometheus-client
registry.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from pf2lora.common.errors import ConfigError
from pf2lora.common.transport.daemon_config import is_address

logger = logging.getLogger(__name__)


@dataclass
class MetricsServer:
    """A running /metrics server; `port` is the bound port (useful with port 0)."""

    httpd: WSGIServer
    thread: threading.Thread
    port: int

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (HOST may be empty for all IPv4 addresses, or [IPv6]) -> (host, port)."""
    if not is_address(listen):
        raise ConfigError(f'metrics_listen={listen!r}: use HOST:PORT, or "" for off')
    host, port = listen.rsplit(":", 1)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def start_metrics_server(listen: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve `registry` as Prometheus text on http://LISTEN/metrics (any path answers) in a
    daemon thread. Plaintext like the health port: it carries counters and timings, no tensor
    and no identity material; the manifests admit only in-cluster scrapers to it."""
    host, port = split_listen(listen)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics_listen={listen!r}: cannot listen there ({exc})") from exc
    bound = int(httpd.server_port)
    logger.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(httpd, thread, bound)
