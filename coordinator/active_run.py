"""The in-memory state of the one active run: phase, round, participants, deadlines, running sum.

Everything durable is in the store and the checkpoints; an ActiveRun is rebuilt from them on
restart (`load_running_run`). Plain data and small helpers only: the round engine decides,
coordinator/transitions.py changes the phase.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pf2lora.common.algorithms.base import Algorithm
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.runspec import RunConfig, from_json, to_json
from pf2lora.common.wire.tasks import EvaluateTask, IdleTask, RunInfo, Task, TrainTask
from pf2lora.coordinator.checkpoints import CheckpointStore, canonical
from pf2lora.coordinator.secure_round import SecureRound
from pf2lora.coordinator.store import Store
from pf2lora.coordinator.views import ParticipantState, Phase

logger = logging.getLogger(__name__)

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
IDLE_RETRY_S = 1.0  # how soon a silo with nothing to do asks again
REFUSED_RETRY_S = 30.0  # a silo that refused the run asks again this rarely


@dataclass
class Participant:
    silo_id: str
    client_index: int
    weight: float
    num_samples: int
    state: ParticipantState = "assigned"


@dataclass
class ActiveRun:
    """In-memory state of the active run (everything durable is in the store)."""

    run_id: str
    cfg: RunConfig
    info: RunInfo
    algorithm: Algorithm
    global_state: dict[str, Tensor]
    global_digest: str
    payload_spec: Spec
    completed: int
    phase: Phase = Phase.ENROLLING
    round: int = 0
    attempt: int = 0
    opened_at: float = 0.0
    enrolled: dict[str, int] = field(default_factory=dict)
    participants: dict[str, Participant] = field(default_factory=dict)
    deadline: float = math.inf
    deadline_unix_ms: int = 0
    running_sum: dict[str, Tensor] | None = None
    secure: SecureRound | None = None  # the attempt's secure aggregation (None: plain updates)
    stage_started_ms: int = 0  # wall clock when the current stage (enroll, train) began
    eval_targets: set[str] = field(default_factory=set)
    eval_reported: set[str] = field(default_factory=set)
    # Each silo's sample count for the whole run, fixed when it first enrolls: its weight p_k
    # cannot change inside a run (a second process, or other data, would change it silently).
    samples: dict[str, int] = field(default_factory=dict)
    # After a coordinator restart: the silos the last committed round had, which the re-opened
    # round's enrolment waits for a little longer (they are reconnecting).
    awaited: set[str] = field(default_factory=set)
    # Silos that refused this run (RefuseRun: their model differs, ...): silo -> (reason, when).
    # Rounds neither enrol nor wait for them; a new session of the silo clears its entry.
    refused: dict[str, tuple[str, int]] = field(default_factory=dict)

    def reset_for_round(self, round_: int, attempt: int, now: float, now_ms: int) -> None:
        """Attempt `attempt` of round `round_` enrolls from scratch: nothing of an earlier
        attempt (enrolment, participants, sums, secure state, deadline) carries over."""
        self.round = round_
        self.attempt = attempt
        self.phase = Phase.ENROLLING
        self.opened_at = now
        self.enrolled = {}
        self.participants = {}
        self.running_sum = None
        self.secure = None
        self.stage_started_ms = now_ms
        self.deadline = math.inf
        self.deadline_unix_ms = 0

    def task_for(self, silo_id: str, client_index: Callable[[str], int]) -> Task:
        """What `silo_id` should do now (in this phase, round and attempt)."""
        if silo_id in self.refused:
            return IdleTask(
                REFUSED_RETRY_S,
                f"you refused run {self.run_id}: {self.refused[silo_id][0]} "
                "(restart this silo to take part again)",
            )
        if self.phase is Phase.ENROLLING:
            return IdleTask(
                IDLE_RETRY_S,
                f"round {self.round} starts when silos have asked for work "
                f"({len(self.enrolled)} so far, min {self.cfg.min_silos})",
            )
        if self.phase is Phase.TRAINING:
            p = self.participants.get(silo_id)
            if p is None:
                return IdleTask(
                    IDLE_RETRY_S, f"round {self.round} is running without you; wait for the next"
                )
            secure = self.secure
            if secure is not None and not secure.wants_training(silo_id):
                stage_task = secure.task_for(silo_id)
                if stage_task is not None:
                    return stage_task
                return IdleTask(
                    IDLE_RETRY_S, f"round {self.round}: secure aggregation at {secure.stage}"
                )
            if p.state == "reported":
                return IdleTask(
                    IDLE_RETRY_S, f"round {self.round}: update received, waiting for others"
                )
            return TrainTask(
                run=self.info,
                round=self.round,
                attempt=self.attempt,
                client_index=p.client_index,
                weight=p.weight,
                deadline_unix_ms=self.deadline_unix_ms,
                global_digest=self.global_digest,
                secure=None if secure is None else secure.params,
            )
        if self.phase is Phase.EVALUATING and silo_id not in self.eval_reported:
            return EvaluateTask(
                run=self.info,
                round=self.completed,
                client_index=client_index(silo_id),
                deadline_unix_ms=self.deadline_unix_ms,
                global_digest=self.global_digest,
            )
        return IdleTask(IDLE_RETRY_S, "evaluation reported, waiting for the run to finish")

    def waiting_for(self, expected: set[str]) -> tuple[str, ...]:
        """Who the current phase (or secure-aggregation stage) still waits for."""
        if self.phase is Phase.ENROLLING:
            wanted = (expected | self.awaited) - set(self.refused)
            return tuple(sorted(wanted - set(self.enrolled)))
        if self.phase is Phase.TRAINING and self.secure is not None:
            return tuple(sorted(self.secure.expected - self.secure.done))
        if self.phase is Phase.TRAINING:
            return tuple(sorted(s for s, p in self.participants.items() if p.state != "reported"))
        if self.phase is Phase.EVALUATING:
            return tuple(sorted(self.eval_targets - self.eval_reported))
        return ()

    def set_deadline(self, seconds: float, now: float, now_ms: int) -> None:
        self.deadline = now + seconds
        self.deadline_unix_ms = now_ms + int(seconds * 1000)

    def reported(self) -> list[str]:
        """Participants whose (plain) update arrived, sorted."""
        return sorted(s for s, p in self.participants.items() if p.state == "reported")


def new_run_id(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{secrets.token_hex(2)}"


def build_active_run(
    run_id: str,
    cfg: RunConfig,
    algorithm: Algorithm,
    state: dict[str, Tensor],
    digest: str,
    completed: int,
) -> ActiveRun:
    """The active run with its global state after round `completed` (not yet in a round)."""
    spec = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    info = RunInfo(
        run_id=run_id,
        algorithm_json=to_json(cfg.algorithm),
        model_json=to_json(cfg.model),
        seed=cfg.seed,
        rounds=cfg.rounds,
    )
    return ActiveRun(
        run_id=run_id,
        cfg=cfg,
        info=info,
        algorithm=algorithm,
        global_state=canonical(state),
        global_digest=digest,
        payload_spec=dict(algorithm.payload_spec(spec)),
        completed=completed,
    )


def load_running_run(store: Store, checkpoints: CheckpointStore, now_ms: int) -> ActiveRun | None:
    """The run the store marks running, at its last committed round, or None.

    Older runs left running beside it, and a run whose config or last checkpoint cannot be read,
    are marked failed in the store (with the reason) instead.
    """
    running = store.running_run_ids()
    for stale in running[:-1]:
        logger.error("run %s was left running beside a newer run; marking it failed", stale)
        store.finish_run(stale, "failed", "superseded by a newer run", now_ms)
    if not running:
        return None
    run_id = running[-1]
    row = store.run(run_id)
    try:
        cfg = from_json(RunConfig, row.config_json, f"run {run_id} config")
        algorithm = make_algorithm(cfg.algorithm, cfg.model.adapters)
        checkpoints.remove_after(run_id, row.completed_rounds)
        rr = store.round_row(run_id, row.completed_rounds)
        if rr is None or rr.state != "complete" or rr.checkpoint_digest is None:
            raise DataError(f"round {row.completed_rounds} is not recorded as complete")
        state = checkpoints.read(run_id, row.completed_rounds, rr.checkpoint_digest)
    except (ConfigError, DataError) as exc:
        logger.error("cannot resume run %s: %s", run_id, exc)
        store.finish_run(run_id, "failed", f"cannot resume: {exc}", now_ms)
        return None
    run = build_active_run(
        run_id, cfg, algorithm, state, rr.checkpoint_digest, row.completed_rounds
    )
    for r in range(1, row.completed_rounds + 1):  # the counts the run's rounds were weighted by
        for p in store.participants(run_id, r):
            run.samples.setdefault(p.silo_id, p.num_samples)
    last = store.participants(run_id, row.completed_rounds)
    run.awaited = {p.silo_id for p in last if p.reported_ms is not None}
    return run
