"""Plain task values exchanged between the coordinator's engine and the silo (no protobuf here).

The coordinator's silo servicer and the silo's client convert them to and from pf2lora.v1.Task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pf2lora.common.secagg.messages import (
    EncryptedShare,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
)

MetricsKind = Literal["train", "evaluate"]  # what a silo's scalar metrics report on


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
class SecureAggregation:
    """A round attempt's secure-aggregation parameters (every party derives the same RoundPlan)."""

    instance_id: str  # "RUN_ID/aATTEMPT": the library's run_id, so attempts never share keys
    roster: tuple[str, ...]  # the round's participants, sorted
    clip: float
    frac_bits: int
    threshold: int
    neighbours: int | None  # None: every silo is every other's neighbour
    vector_length: int
    layout_digest: str  # VectorLayout.digest() of the payload spec


@dataclass(frozen=True)
class TrainTask:
    run: RunInfo
    round: int
    attempt: int
    client_index: int
    weight: float
    deadline_unix_ms: int
    global_digest: str  # hex manifest digest of the global state of round - 1
    secure: SecureAggregation | None = None  # None: send the plain payload (PushUpdate UPDATE)


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


# Secure-aggregation stages of a TRAIN task's round attempt: what the coordinator relays.


@dataclass(frozen=True)
class ShareKeysTask:
    run_id: str
    round: int
    attempt: int
    keys: tuple[SignedKeys, ...]  # the neighbours' signed keys (and the silo's own)


@dataclass(frozen=True)
class MaskedInputTask:
    run_id: str
    round: int
    attempt: int
    shares: tuple[EncryptedShare, ...]  # addressed to this silo


@dataclass(frozen=True)
class ConsistencyCheckTask:
    run_id: str
    round: int
    attempt: int
    proposal: UnmaskProposal


@dataclass(frozen=True)
class UnmaskTask:
    run_id: str
    round: int
    attempt: int
    request: UnmaskRequest


StageTask = ShareKeysTask | MaskedInputTask | ConsistencyCheckTask | UnmaskTask
Task = IdleTask | TrainTask | EvaluateTask | StopTask | StageTask
