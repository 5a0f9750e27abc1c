"""The coordinator's Prometheus metrics on a registry of its own, the hooks that update them, and
the /metrics server.

Each `CoordinatorMetrics` owns a fresh `CollectorRegistry` (never prometheus-client's global
one), so several coordinators in one test process do not collide. The engine and the silo
servicer call the small hook methods below from their existing code paths; `serve()` starts
the HTTP endpoint at `[server] metrics_listen` (docs/operations.md describes every metric).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pf2lora.common.transport.metrics_http import MetricsServer, start_metrics_server

logger = logging.getLogger(__name__)

# The SecAgg+ stages of a round (coordinator/secure_round.py STAGES), pre-created as label
# values so that a dashboard sees 0 rather than no series before the first secure round.
SECAGG_STAGES: tuple[str, ...] = (
    "advertise_keys",
    "share_keys",
    "masked_input",
    "consistency_check",
    "unmask",
)
# A round lasts from a second (tiny test models) to hours (large models, slow silos).
ROUND_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# A secure-aggregation stage is a relay of keys or shares (milliseconds) up to a wait for the
# slowest silo's masked input (as long as its local training).
STAGE_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 600, 1800, 3600)


class _Sized(Protocol):
    def ByteSize(self) -> int: ...  # noqa: N802 - protobuf's name


M = TypeVar("M", bound=_Sized)


class CoordinatorMetrics:
    """The coordinator's metrics and the hooks that move them (all thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("pf2lora_coordinator", "federation name and software version", registry=r)
        self.rounds_completed = Counter(
            "pf2lora_coordinator_rounds_completed",
            "rounds committed (checkpoint written)",
            registry=r,
        )
        self.rounds_reopened = Counter(
            "pf2lora_coordinator_rounds_reopened",
            "rounds opened again: fewer than min_silos updates at the deadline",
            registry=r,
        )
        self.round_duration = Histogram(
            "pf2lora_coordinator_round_duration_seconds",
            "from the opening of a round's successful attempt to its commit",
            buckets=ROUND_BUCKETS_S,
            registry=r,
        )
        self.participants = Gauge(
            "pf2lora_coordinator_round_participants",
            "participants of the latest round, fixed when its enrollment closed",
            registry=r,
        )
        self.dropouts = Counter(
            "pf2lora_coordinator_dropouts",
            "participants whose update had not arrived when their round closed or re-opened",
            registry=r,
        )
        self.updates_accepted = Counter(
            "pf2lora_coordinator_updates_accepted", "updates added to a round's sum", registry=r
        )
        self.undecodable_requests = Counter(
            "pf2lora_coordinator_undecodable_requests",
            "requests gRPC could not deserialize (refused INTERNAL; logged at a bounded rate)",
            registry=r,
        )
        self.current_round = Gauge(
            "pf2lora_coordinator_current_round",
            "round the active run is in (0: no active run)",
            registry=r,
        )
        self.run_active = Gauge(
            "pf2lora_coordinator_run_active", "1 while a run is active, else 0", registry=r
        )
        self.dp_epsilon = Gauge(
            "pf2lora_coordinator_dp_epsilon",
            "epsilon spent by the active run's released rounds at its dp.delta (0 without DP)",
            registry=r,
        )
        self.bytes_received = Counter(
            "pf2lora_coordinator_received_bytes",
            "bytes of tensor-stream messages received from silos (PushUpdate)",
            registry=r,
        )
        self.bytes_sent = Counter(
            "pf2lora_coordinator_sent_bytes",
            "bytes of tensor-stream messages sent to silos (FetchGlobal)",
            registry=r,
        )
        self.secagg_stage_duration = Histogram(
            "pf2lora_coordinator_secagg_stage_duration_seconds",
            "duration of each secure-aggregation stage of a round",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        for stage in SECAGG_STAGES:
            self.secagg_stage_duration.labels(stage=stage)

    # ------------------------------------------------------------------ engine hooks
    def set_info(self, federation: str, version: str) -> None:
        self.info.info({"federation": federation, "version": version})

    def round_opened(self, round_: int) -> None:
        self.run_active.set(1)
        self.current_round.set(round_)

    def round_sealed(self, participants: int) -> None:
        self.participants.set(participants)

    def update_accepted(self) -> None:
        self.updates_accepted.inc()

    def round_completed(self, seconds: float, participants: int, reported: int) -> None:
        self.rounds_completed.inc()
        self.round_duration.observe(max(0.0, seconds))
        self.dropouts.inc(max(0, participants - reported))

    def round_reopened(self, missing: int) -> None:
        self.rounds_reopened.inc()
        self.dropouts.inc(max(0, missing))

    def run_ended(self) -> None:
        self.run_active.set(0)
        self.dp_epsilon.set(0)
        self.current_round.set(0)

    def observe_secagg_stage(self, stage: str, seconds: float) -> None:
        """Record one secure-aggregation stage of a round (stage: one of SECAGG_STAGES)."""
        self.secagg_stage_duration.labels(stage=stage).observe(max(0.0, seconds))

    @contextlib.contextmanager
    def secagg_stage(self, stage: str) -> Iterator[None]:
        """`with metrics.secagg_stage("share_keys"): ...` times the block as that stage."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe_secagg_stage(stage, time.perf_counter() - t0)

    # ---------------------------------------------------------------- servicer hooks
    def count_received(self, messages: Iterable[M]) -> Iterator[M]:
        """Pass a request stream through, adding each message's size to the received bytes."""
        for msg in messages:
            self.bytes_received.inc(msg.ByteSize())
            yield msg

    def count_sent(self, messages: Iterable[M]) -> Iterator[M]:
        """Pass a response stream through, adding each message's size to the sent bytes."""
        for msg in messages:
            self.bytes_sent.inc(msg.ByteSize())
            yield msg

    # ------------------------------------------------------------------------ server
    def serve(self, listen: str) -> MetricsServer:
        return start_metrics_server(listen, self.registry)
