"""Plain values the round engine hands out besides tasks (receipts, status views); servicers turn
them into protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from pf2lora.common.secagg.layout import VectorLayout
from pf2lora.common.wire.manifest import TensorInfo

# A participant's progress through its round attempt: assigned -> fetched -> reported for plain
# updates; with secure aggregation keys_sent, shares_sent, reported (masked input), signed and
# unmasked follow the stages (coordinator/secure_round.py).
ParticipantState = Literal[
    "assigned", "fetched", "keys_sent", "shares_sent", "reported", "signed", "unmasked"
]


class Phase(enum.StrEnum):
    """Where the active run is (RunPhase on the wire)."""

    ENROLLING = "enrolling"  # waiting for silos to ask for work in the current round
    TRAINING = "training"  # participants fixed, waiting for their updates
    EVALUATING = "evaluating"  # all rounds done, silos evaluate the final global state
    DONE = "done"


@dataclass(frozen=True)
class UpdateReceipt:
    run_id: str
    round: int
    manifest_digest: bytes
    received: int
    participants: int


@dataclass(frozen=True)
class ParticipantView:
    silo_id: str
    weight: float
    state: ParticipantState


@dataclass(frozen=True)
class RoundView:
    round: int
    attempt: int
    participants: tuple[str, ...]
    reported: tuple[str, ...]
    opened_ms: int
    completed_ms: int | None
    checkpoint_digest: str | None
    mean_metrics: dict[str, float] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # of the final attempt
    secure_aggregation: bool = False
    dropped: tuple[str, ...] = ()  # shared keys, sent no masked input: not in the sum
    epsilon: float = 0.0  # DP: spent once this round was released (0 without DP)


@dataclass(frozen=True)
class SiloMetricsView:
    silo_id: str
    round: int
    kind: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class RunView:
    run_id: str
    state: str  # running | completed | stopped | failed
    phase: Phase
    rounds: int
    completed_rounds: int
    current_round: int
    attempt: int
    enrolled: tuple[str, ...]
    participants: tuple[ParticipantView, ...]
    deadline_unix_ms: int
    history: tuple[RoundView, ...]
    evaluation: tuple[SiloMetricsView, ...]
    config_json: str
    created_ms: int
    finished_ms: int | None
    reason: str
    secagg_stage: str = ""  # the secure-aggregation stage of the round in progress
    waiting_for: tuple[str, ...] = ()  # silos the round in progress waits for
    refused: tuple[tuple[str, str, int], ...] = ()  # (silo, reason, unix ms) of refusals


@dataclass(frozen=True)
class SiloView:
    silo_id: str
    allowed: bool
    joined: bool
    num_samples: int
    software_version: str
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True)
class UpdateView:
    """An accepted update as the coordinator recorded it (any attempt of the round)."""

    silo_id: str
    attempt: int
    digest: str  # manifest digest, hex
    kind: str  # UPDATE | MASKED_UPDATE ("" if recorded before schema 2)
    tensors: tuple[dict, ...]  # wire_manifest.tensor_info_to_dict entries


@dataclass(frozen=True)
class ManifestView:
    run_id: str
    round: int
    tensors: tuple[TensorInfo, ...]
    digest: str
    updates: tuple[UpdateView, ...]
    attempt: int = 0  # the attempt that completed the round
    secure_aggregation: bool = False
    layout: VectorLayout | None = None  # the payload spec, flattened in sorted-name order
    summed: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
