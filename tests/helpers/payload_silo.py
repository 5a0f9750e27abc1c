"""A silo without a model: the real client and secure-round driver sending a fixed payload, and
the threads that run several of them at once against an in-process coordinator."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import torch

from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.wire.tasks import IdleTask, TrainTask
from pf2lora.silo.client import CoordinatorClient
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.secure_round import SecureRoundDriver
from pf2lora.silo.state import SiloState
from pf2lora.silo.wire_record import WireRecord


class PayloadSilo:
    """Sends `value` in every tensor of `template`, weighted by its task's weight."""

    def __init__(
        self, cfg: SiloConfig, samples: int, value: float, template: Mapping[str, torch.Tensor]
    ) -> None:
        self.silo, self.samples, self.value = cfg.silo.id, samples, value
        self.template = dict(template)
        self.cfg = cfg
        self.stop = threading.Event()
        self.client = CoordinatorClient(self.cfg, self.stop)
        self.state = SiloState(self.cfg.silo.state_dir)
        self.wire = WireRecord(self.state.root / "runs", self.silo)
        self.driver = SecureRoundDriver(self.cfg, self.client, self.state, self.wire, self.stop)
        self.outcome: Any = None
        self.error: BaseException | None = None

    def train_task(self, run_id: str, timeout: float = 30.0) -> TrainTask:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            task = self.client.get_task(run_id)
            if isinstance(task, TrainTask):
                return task
            assert isinstance(task, IdleTask), task
        raise AssertionError(f"{self.silo}: no TRAIN task")

    def payload(self, task: TrainTask) -> dict[str, torch.Tensor]:
        return weighted_payload(
            {k: torch.full_like(v, self.value) for k, v in self.template.items()}, task.weight
        )

    def take_part(self, run_id: str) -> None:
        try:
            task = self.train_task(run_id)
            self.outcome = self.driver.run(task, self.payload(task))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.client.close()


def run_all(silos: list[PayloadSilo], run_id: str, timeout: float = 60.0) -> None:
    """Every silo takes part in the round at once (threads); all must finish in time."""
    threads = [threading.Thread(target=s.take_part, args=(run_id,)) for s in silos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads)


def train_tasks(silos: list[PayloadSilo], run_id: str) -> dict[str, TrainTask]:
    """Every silo asks for work at once (enrollment waits for all allowed silos)."""
    tasks: dict[str, TrainTask] = {}
    threads = [
        threading.Thread(target=lambda s=s: tasks.__setitem__(s.silo, s.train_task(run_id)))
        for s in silos
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    return tasks


def expected_mean(silos: list[PayloadSilo]) -> float:
    """The sample-weighted mean of the silos' values (what the round must aggregate to)."""
    total = sum(s.samples for s in silos)
    return sum(s.samples / total * s.value for s in silos) / sum(s.samples / total for s in silos)
