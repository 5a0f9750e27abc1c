"""A coordinator in the test's own process: the round engine on a fake clock, or the whole
coordinator (real gRPC servers on loopback) with the configs and channels of silos that dial it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import grpc
from torch import Tensor

from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.runspec import RunConfig
from pf2lora.common.transport import grpc_factory
from pf2lora.common.transport.daemon_config import TlsSection
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.config import (
    CoordinatorConfig,
    FederationSection,
    ServerSection,
    StorageSection,
)
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.coordinator.store import Store
from pf2lora.silo.config import CoordinatorSection, SiloConfig, SiloSection
from tests.helpers.tls import tls_section


class Clock:
    """A settable clock for the engine's monotonic and wall time (starts at 1000 s)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def fake_engine(
    root: Path,
    clock: Clock,
    initial_state: Callable[[Any, Any, int], dict[str, Tensor]],
    *,
    allowed: tuple[str, ...] | None = ("a", "b", "c"),
    metrics: CoordinatorMetrics | None = None,
) -> Engine:
    """The round engine with its SQLite store and checkpoints under root, on `clock`."""
    return Engine(
        Store(root / "state.db"),
        CheckpointStore(root),
        federation="test",
        allowed_silos=allowed,
        initial_state=initial_state,
        clock=clock,
        wall=clock,
        metrics=metrics,
    )


def constant_state(state: Mapping[str, Tensor]) -> Callable[[Any, Any, int], dict[str, Tensor]]:
    """An initial-state function that needs no model: copies of `state`."""
    return lambda algorithm, model, seed: {k: v.clone() for k, v in state.items()}


def coordinator_config(
    state_dir: Path,
    federation: str,
    allowed: tuple[str, ...],
    *,
    tls_dir: Path | None = None,
    health: bool = False,
    long_poll_s: float = 0.5,
) -> CoordinatorConfig:
    """A coordinator on loopback ports chosen by the OS; mutual TLS with the certificate in
    tls_dir, plaintext (--insecure) without one."""
    return CoordinatorConfig(
        federation=FederationSection(name=federation, allowed_silos=allowed),
        server=ServerSection(
            silo_api_listen="127.0.0.1:0",
            control_api_listen="127.0.0.1:0",
            health_listen="127.0.0.1:0" if health else "",
            metrics_listen="",
            long_poll_s=long_poll_s,
            insecure=tls_dir is None,
        ),
        tls=tls_section(tls_dir) if tls_dir is not None else TlsSection(),
        storage=StorageSection(state_dir=str(state_dir)),
    )


def silo_config(
    state_dir: Path,
    silo_id: str,
    federation: str,
    port: int,
    *,
    tls_dir: Path | None = None,
    **coordinator: Any,
) -> SiloConfig:
    """A silo that dials 127.0.0.1:port (server name localhost), quick to retry."""
    options: dict[str, Any] = {"long_poll_s": 0.5, "retry_initial_s": 0.1, "retry_max_s": 0.5}
    options.update(coordinator)
    return SiloConfig(
        silo=SiloSection(id=silo_id, federation=federation, state_dir=str(state_dir)),
        coordinator=CoordinatorSection(
            address=f"127.0.0.1:{port}",
            server_name="localhost",
            insecure=tls_dir is None,
            **options,
        ),
        tls=tls_section(tls_dir) if tls_dir is not None else TlsSection(),
    )


def channel(port: int, role_dir: Path) -> grpc.Channel:
    """A mutual-TLS channel to 127.0.0.1:port presenting the certificate in role_dir."""
    ca, cert, key = grpc_factory.TlsFiles.in_dir(role_dir).read()
    creds = grpc_factory.channel_credentials(ca, cert, key)
    return grpc_factory.create_channel(f"127.0.0.1:{port}", creds, server_name_override="localhost")


def plain_run_config(**overrides: Any) -> RunConfig:
    """A run for an engine without a model: plain updates, 2 rounds, 2 of the silos, seed 0."""
    base: dict[str, Any] = dict(
        rounds=2,
        min_silos=2,
        round_deadline_s=60.0,
        enroll_window_s=5.0,
        seed=0,
        secure_aggregation=False,
    )
    base.update(overrides)
    return RunConfig(model=ModelConfig(path="unused"), **base)


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The gRPC status a call ends with (OK if it returns)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK
