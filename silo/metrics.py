"""A silo's Prometheus metrics on a registry of its own, the hooks the daemon calls, and the
/metrics server.

Each `SiloMetrics` owns a fresh `CollectorRegistry` (never prometheus-client's global one), so
several silos in one test process do not collide. Only scalars the silo reports to the
coordinator anyway (loss, accuracy, timings) are exported; nothing private.
TensorBoard scalars are not provided (docs/operations.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from pf2lora.common.transport.metrics_http import MetricsServer, start_metrics_server

logger = logging.getLogger(__name__)

# Local training of one round: a second (tiny test models) to hours (large models on a CPU).
TRAIN_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
TRANSFER_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


GENERATION_GAUGES = {
    "answer_loss": "held-out cross-entropy of the answer tokens",
    "perplexity": "held-out perplexity of the answer tokens",
    "exact_match": "share of greedy answers equal to the reference (normalised)",
    "rouge_l": "mean ROUGE-L F-measure of greedy answers against the references",
}


class SiloMetrics:
    """The silo's metrics and the hooks that move them (all thread-safe)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Info("pf2lora_silo", "silo id, federation and software version", registry=r)
        self.train_seconds = Histogram(
            "pf2lora_silo_train_seconds",
            "local part of a round: load the private state, train, save the state",
            buckets=TRAIN_BUCKETS_S,
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "pf2lora_silo_transfer_seconds",
            "tensor transfers of a round: fetch (global state) and push (update)",
            ["direction"],
            buckets=TRANSFER_BUCKETS_S,
            registry=r,
        )
        for direction in ("fetch", "push"):
            self.transfer_seconds.labels(direction=direction)
        self.train_loss = Gauge(
            "pf2lora_silo_train_loss", "training loss of the latest round (upper level)", registry=r
        )
        self.rounds_participated = Counter(
            "pf2lora_silo_rounds_participated",
            "rounds whose update the coordinator accepted",
            registry=r,
        )
        self.last_round = Gauge(
            "pf2lora_silo_last_round", "the latest round whose update was accepted", registry=r
        )
        self.personal_accuracy = Gauge(
            "pf2lora_silo_personal_accuracy",
            "held-out accuracy of the personalised model (shared + private adapter), final "
            "evaluation",
            registry=r,
        )
        self.shared_accuracy = Gauge(
            "pf2lora_silo_shared_accuracy",
            "held-out accuracy with the shared adapter only, final evaluation",
            registry=r,
        )
        # Decoder runs on instruction data (final evaluation), per level: personal | shared.
        self.generation = {
            name: Gauge(
                f"pf2lora_silo_{name}",
                f"{what}, final evaluation (causal-lm runs)",
                ["level"],
                registry=r,
            )
            for name, what in GENERATION_GAUGES.items()
        }
        self.evaluations = Counter(
            "pf2lora_silo_evaluations", "final evaluations reported", registry=r
        )

    def set_info(self, silo_id: str, federation: str, version: str) -> None:
        self.info.info({"silo": silo_id, "federation": federation, "version": version})

    def round_done(
        self,
        round_: int,
        *,
        fetch_s: float,
        local_s: float,
        push_s: float,
        metrics: Mapping[str, float],
    ) -> None:
        """A round's update was accepted: timings and its training loss."""
        self.train_seconds.observe(max(0.0, local_s))
        self.transfer_seconds.labels(direction="fetch").observe(max(0.0, fetch_s))
        self.transfer_seconds.labels(direction="push").observe(max(0.0, push_s))
        if "train_loss" in metrics:
            self.train_loss.set(float(metrics["train_loss"]))
        self.rounds_participated.inc()
        self.last_round.set(round_)

    def evaluated(self, metrics: Mapping[str, float]) -> None:
        """The final evaluation's scalars (classification runs report *_accuracy)."""
        if "personal_accuracy" in metrics:
            self.personal_accuracy.set(float(metrics["personal_accuracy"]))
        if "shared_accuracy" in metrics:
            self.shared_accuracy.set(float(metrics["shared_accuracy"]))
        for name, gauge in self.generation.items():
            for level in ("personal", "shared"):
                if f"{level}_{name}" in metrics:
                    gauge.labels(level=level).set(float(metrics[f"{level}_{name}"]))
        self.evaluations.inc()

    def serve(self, listen: str) -> MetricsServer:
        return start_metrics_server(listen, self.registry)
