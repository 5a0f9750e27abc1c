"""Plain task values exchanged between the coordinator's engine and the silo (no protobuf here).

The coordinator's silo servicer and the silo's client convert them to and from pf2lora.v1.Task.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunInfo:
    """What a silo needs to (re)build its local state for a run."""

    run_id: str
    algorithm_json: str
    model_json: str
    seed: int
    rounds: int


@dataclass(frozen=True)
class IdleTask:
    retry_after_s: float
    reason: str


@dataclass(frozen=True)
class TrainTask:
    run: RunInfo
    round: int
    attempt: int
    client_index: int
    weight: float
    deadline_unix_ms: int
    global_digest: str  # hex manifest digest of the global state of round - 1


@dataclass(frozen=True)
class EvaluateTask:
    run: RunInfo
    round: int
    client_index: int
    deadline_unix_ms: int
    global_digest: str


@dataclass(frozen=True)
class StopTask:
    run_id: str
    state: str
    reason: str


Task = IdleTask | TrainTask | EvaluateTask | StopTask
