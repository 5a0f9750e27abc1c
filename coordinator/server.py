"""The coordinator daemon: silo API, control API and health servers around one round engine.

`pf2lora coordinator serve --config coordinator.toml` runs `serve()`. SIGTERM or SIGINT stop it
gracefully (calls in flight get a few seconds); a kill -9 loses nothing committed: the next
start resumes the run at its last completed round (engine.recover).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2

from pf2lora.common.state_io import atomic_write_bytes
from pf2lora.common.transport import grpc_factory
from pf2lora.common.transport.identity import admin_only_interceptor
from pf2lora.common.transport.metrics_http import MetricsServer
from pf2lora.common.version import software_version
from pf2lora.coordinator.config import CoordinatorConfig
from pf2lora.coordinator.control_servicer import ControlServicer
from pf2lora.coordinator.engine import Engine, InitialState, default_initial_state
from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.coordinator.silo_servicer import SiloServicer
from pf2lora.coordinator.state_dir import open_state_dir
from pf2lora.v1 import control_pb2_grpc, silo_pb2_grpc

logger = logging.getLogger(__name__)

TICK_S = 0.2  # how often deadlines and enrollment windows are checked
STOP_GRACE_S = 5.0
SILO_SERVICE = "pf2lora.v1.SiloApi"
CONTROL_SERVICE = "pf2lora.v1.ControlApi"


class Coordinator:
    """Everything the daemon runs; start() binds the ports, stop() shuts down in order."""

    def __init__(
        self, cfg: CoordinatorConfig, *, initial_state: InitialState = default_initial_state
    ):
        self.cfg = cfg
        self.store, checkpoints = open_state_dir(cfg.storage.state_dir)
        self.metrics = CoordinatorMetrics()
        self.metrics.set_info(cfg.federation.name, software_version())
        self.engine = Engine(
            self.store,
            checkpoints,
            federation=cfg.federation.name,
            allowed_silos=cfg.federation.allowed_silos,
            initial_state=initial_state,
            metrics=self.metrics,
        )
        self._stopped = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="pf2lora-tick", daemon=True)
        self.silo_server: grpc.Server | None = None
        self.control_server: grpc.Server | None = None
        self.health_server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self.metrics_server: MetricsServer | None = None
        self.ports: dict[str, int] = {}

    def _credentials(self) -> grpc.ServerCredentials | None:
        if self.cfg.server.insecure:
            return None  # grpc_factory.add_port logs the plaintext warning
        return grpc_factory.rotating_server_credentials(
            self.cfg.tls.files(), require_client_auth=True
        )

    def start(self) -> None:
        s = self.cfg.server
        grpc_factory.bound_undecodable_logs(self.metrics.undecodable_requests.inc)
        insecure = s.insecure
        self.silo_server = grpc_factory.create_server(s.max_workers)
        silo_pb2_grpc.add_SiloApiServicer_to_server(
            SiloServicer(
                self.engine,
                insecure=insecure,
                long_poll_s=s.long_poll_s,
                version=software_version(),
            ),
            self.silo_server,
        )
        self.ports["silo_api"] = grpc_factory.add_port(
            self.silo_server, s.silo_api_listen, self._credentials()
        )
        self.control_server = grpc_factory.create_server(
            8, interceptors=[admin_only_interceptor(self.cfg.federation.name, insecure=insecure)]
        )
        control_pb2_grpc.add_ControlApiServicer_to_server(
            ControlServicer(self.engine), self.control_server
        )
        self.ports["control_api"] = grpc_factory.add_port(
            self.control_server, s.control_api_listen, self._credentials()
        )
        if s.metrics_listen:
            self.metrics_server = self.metrics.serve(s.metrics_listen)
            self.ports["metrics"] = self.metrics_server.port
        if s.health_listen:
            self.health_server, servicer, port = grpc_factory.create_health_server(s.health_listen)
            self._health = servicer
            self.ports["health"] = port
            for service in (SILO_SERVICE, CONTROL_SERVICE):
                servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
            self.health_server.start()
        self.silo_server.start()
        self.control_server.start()
        self._ticker.start()
        logger.info(
            "coordinator of federation %r serving: silo API %s, control API %s%s",
            self.cfg.federation.name,
            self.ports["silo_api"],
            self.ports["control_api"],
            " (INSECURE: plaintext, identities not checked)" if insecure else " (mutual TLS)",
        )

    def _tick_loop(self) -> None:
        while not self._stopped.wait(TICK_S):
            try:
                self.engine.tick()
            except Exception:  # noqa: BLE001 - keep ticking; the error is logged
                logger.exception("engine tick failed")

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        logger.info("coordinator stopping (grace %.0f s)", grace)
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        events = [
            srv.stop(grace) for srv in (self.silo_server, self.control_server) if srv is not None
        ]
        for ev in events:
            ev.wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        if self._ticker.is_alive():
            self._ticker.join(timeout=5)
        self.store.close()
        logger.info("coordinator stopped")

    def wait(self) -> None:
        self._stopped.wait()


def serve(cfg: CoordinatorConfig, *, port_file: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    coordinator = Coordinator(cfg)
    coordinator.start()
    if port_file is not None:
        atomic_write_bytes(port_file, json.dumps(coordinator.ports).encode())
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not done.wait(1.0):
        pass
    coordinator.stop()
    return 0
