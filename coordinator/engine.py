"""The round engine: a state machine over one active run, driven by silo events and a clock.

Round r of a run goes ENROLLING -> TRAINING -> (complete) and then r+1 opens; after the last
round the run goes EVALUATING -> completed. Silos that ask for work while a round enrolls are
its participants; enrollment ends when every expected silo asked (the allow-list, or every
registered silo) or, once min_silos asked, after enroll_window_s. Each participant gets a TRAIN
task with its public weight p_k over the round's participants. The round completes when every
participant's update arrived, or at the deadline if at least min_silos did; with fewer it is
opened again (attempt + 1), and updates of older attempts are refused.

With secure aggregation (the default) a participant's TRAIN task carries the attempt's SecAgg+
parameters and the round then runs the stages of coordinator/secure_round.py: the engine only
sees masked vectors, which SecAggServer adds, and the unmasked SUM of the survivors. Without it,
plain updates are added to a running sum as they arrive (`sum_payloads`) and not kept. Either way
the new global state is `algorithm.aggregate(sum, previous)`: nothing here needs an individual
update beyond adding it. Completing a round writes its checkpoint file first, then commits the round
in SQLite; a restart resumes at the last committed round and opens the next one again.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from pf2lora.common.algorithms.aggregate import client_weights, sum_payloads
from pf2lora.common.algorithms.base import Algorithm
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import (
    ConfigError,
    DataError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.names import is_label
from pf2lora.common.runspec import RunConfig, from_json, to_dict, to_json
from pf2lora.common.wire.manifest import TensorInfo, tensors_to_json
from pf2lora.common.wire.tasks import EvaluateTask, IdleTask, RunInfo, StopTask, Task, TrainTask
from pf2lora.coordinator.checkpoints import CheckpointStore, canonical
from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.coordinator.secure_round import Outcome, SecureRound
from pf2lora.coordinator.store import Store
from pf2lora.coordinator.views import Phase, UpdateReceipt

logger = logging.getLogger(__name__)

T = TypeVar("T")
InitialState = Callable[[Algorithm, ModelConfig, int], dict[str, Tensor]]
Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]

IDLE_RETRY_S = 1.0
MAX_METRICS = 256
MAX_METRIC_NAME = 128


def default_initial_state(algorithm: Algorithm, model: ModelConfig, seed: int) -> dict[str, Tensor]:
    from pf2lora.common.client_runtime import initial_global_state

    return initial_global_state(algorithm, model, seed)


@dataclass
class _Participant:
    silo_id: str
    client_index: int
    weight: float
    num_samples: int
    state: str = "assigned"  # assigned | fetched | reported


@dataclass
class _Run:
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
    participants: dict[str, _Participant] = field(default_factory=dict)
    deadline: float = math.inf
    deadline_unix_ms: int = 0
    running_sum: dict[str, Tensor] | None = None
    secure: SecureRound | None = None  # the attempt's secure aggregation (None: plain updates)
    stage_started_ms: int = 0  # wall clock when the current stage (enroll, train) began
    eval_targets: set[str] = field(default_factory=set)
    eval_reported: set[str] = field(default_factory=set)


def new_run_id(now: float) -> str:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"run-{stamp}-{secrets.token_hex(2)}"


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Scalar metrics as floats; InvalidArgument for too many, bad names or non-finite values."""
    if len(metrics) > MAX_METRICS:
        raise InvalidArgument(f"{len(metrics)} metrics: at most {MAX_METRICS} per report")
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_METRIC_NAME:
            raise InvalidArgument(f"metric name {name!r}: must be 1-{MAX_METRIC_NAME} characters")
        v = float(value)
        if not math.isfinite(v):
            raise InvalidArgument(f"metric {name!r} is {v}: must be finite")
        out[name] = v
    return out


class Engine:
    """All coordinator state transitions, under one lock; blocking waits on its condition."""

    def __init__(
        self,
        store: Store,
        checkpoints: CheckpointStore,
        *,
        federation: str,
        allowed_silos: tuple[str, ...] | None,
        initial_state: InitialState = default_initial_state,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        metrics: CoordinatorMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics or CoordinatorMetrics()  # hooks below; served by server.py
        self.checkpoints = checkpoints
        self.federation = federation
        self.allowed = None if allowed_silos is None else tuple(sorted(allowed_silos))
        self._initial_state = initial_state
        self._clock = clock
        self._wall = wall
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._registered = {row.silo_id: row for row in store.silos()}
        self._last_seen: dict[str, int] = {}
        self._run: _Run | None = None
        self._cache: tuple[str, int, dict[str, Tensor], str] | None = None  # old checkpoints
        self.recover()

    # ------------------------------------------------------------------ helpers
    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _notify(self) -> None:
        self._cond.notify_all()

    def _require_allowed(self, silo_id: str) -> None:
        if self.allowed is not None and silo_id not in self.allowed:
            raise PermissionDenied(f"silo {silo_id!r} is not on the federation's allow-list")

    def _require_joined(self, silo_id: str) -> None:
        self._require_allowed(silo_id)
        if silo_id not in self._registered:
            raise FailedPrecondition(f"silo {silo_id!r} has not joined: call Join first")
        self._last_seen[silo_id] = self._now_ms()

    def _client_index(self, silo_id: str) -> int:
        if self.allowed is not None:
            return self.allowed.index(silo_id)
        return self._registered[silo_id].join_order

    def _expected(self) -> set[str]:
        return set(self.allowed) if self.allowed is not None else set(self._registered)

    def _active(self, run_id: str) -> _Run:
        run = self._run
        if run is None or run.run_id != run_id:
            try:
                row = self.store.run(run_id)
            except NotFound:
                raise FailedPrecondition(f"run {run_id!r} is unknown to this coordinator") from None
            raise FailedPrecondition(f"run {run_id!r} is {row.state}, not running")
        return run

    # ----------------------------------------------------------------- recovery
    def recover(self) -> None:
        """Resume the running run (if any) at its last committed round."""
        with self._lock:
            running = self.store.running_run_ids()
            for stale in running[:-1]:
                logger.error("run %s was left running beside a newer run; marking it failed", stale)
                self.store.finish_run(stale, "failed", "superseded by a newer run", self._now_ms())
            if not running:
                return
            run_id = running[-1]
            row = self.store.run(run_id)
            try:
                cfg = from_json(RunConfig, row.config_json, f"run {run_id} config")
                algorithm = make_algorithm(cfg.algorithm, cfg.model.adapters)
                self.checkpoints.remove_after(run_id, row.completed_rounds)
                rr = self.store.round_row(run_id, row.completed_rounds)
                if rr is None or rr.state != "complete" or rr.checkpoint_digest is None:
                    raise DataError(f"round {row.completed_rounds} is not recorded as complete")
                state = self.checkpoints.read(run_id, row.completed_rounds, rr.checkpoint_digest)
            except (ConfigError, DataError) as exc:
                logger.error("cannot resume run %s: %s", run_id, exc)
                self.store.finish_run(run_id, "failed", f"cannot resume: {exc}", self._now_ms())
                return
            run = self._make_run(
                run_id, cfg, algorithm, state, rr.checkpoint_digest, row.completed_rounds
            )
            self._run = run
            if run.completed < cfg.rounds:
                logger.warning(
                    "resuming run %s after round %d of %d: round %d starts again",
                    run_id,
                    run.completed,
                    cfg.rounds,
                    run.completed + 1,
                )
                self._open_round(run.completed + 1)
            else:
                logger.warning("resuming run %s in its final evaluation", run_id)
                self._begin_evaluation()
                done = self.store.metrics(run_id, kind="evaluate", round_=cfg.rounds)
                run.eval_reported = {silo for (_, silo, _) in done}

    def _make_run(
        self,
        run_id: str,
        cfg: RunConfig,
        algorithm: Algorithm,
        state: dict[str, Tensor],
        digest: str,
        completed: int,
    ) -> _Run:
        spec = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        info = RunInfo(
            run_id=run_id,
            algorithm_json=to_json(cfg.algorithm),
            model_json=to_json(cfg.model),
            seed=cfg.seed,
            rounds=cfg.rounds,
        )
        return _Run(
            run_id=run_id,
            cfg=cfg,
            info=info,
            algorithm=algorithm,
            global_state=canonical(state),
            global_digest=digest,
            payload_spec=dict(algorithm.payload_spec(spec)),
            completed=completed,
        )

    # -------------------------------------------------------------- silo events
    def join(self, silo_id: str, num_samples: int, version: str) -> str:
        """Register a silo (again); returns the active run id ('' if none)."""
        self._require_allowed(silo_id)
        if not 1 <= num_samples < 2**53:
            raise InvalidArgument(f"num_samples={num_samples}: a silo needs at least one example")
        with self._lock:
            self.store.upsert_silo(silo_id, num_samples, version[:64], self._now_ms())
            row = self.store.silo(silo_id)
            assert row is not None
            self._registered[silo_id] = row
            self._last_seen[silo_id] = self._now_ms()
            logger.info("silo %s joined (%d examples, version %s)", silo_id, num_samples, version)
            self._notify()
            return self._run.run_id if self._run else ""

    def get_task(self, silo_id: str, current_run_id: str = "") -> Task:
        """The silo's next task, without waiting."""
        with self._lock:
            self._require_joined(silo_id)
            self._tick()
            run = self._run
            if current_run_id and (run is None or run.run_id != current_run_id):
                try:
                    row = self.store.run(current_run_id)
                    return StopTask(current_run_id, row.state, row.reason)
                except NotFound:
                    return StopTask(current_run_id, "unknown", "this coordinator has no such run")
            if run is None:
                return IdleTask(IDLE_RETRY_S, "no active run")
            if run.phase is Phase.ENROLLING:
                if silo_id not in run.enrolled:
                    run.enrolled[silo_id] = self._registered[silo_id].num_samples
                    logger.info(
                        "round %d: silo %s enrolled (%d)", run.round, silo_id, len(run.enrolled)
                    )
                    self._maybe_seal()
                    self._notify()
            if run.phase is Phase.ENROLLING:
                return IdleTask(
                    IDLE_RETRY_S,
                    f"round {run.round} starts when silos have asked for work "
                    f"({len(run.enrolled)} so far, min {run.cfg.min_silos})",
                )
            if run.phase is Phase.TRAINING:
                p = run.participants.get(silo_id)
                if p is None:
                    return IdleTask(
                        IDLE_RETRY_S, f"round {run.round} is running without you; wait for the next"
                    )
                secure = run.secure
                if secure is not None and not secure.wants_training(silo_id):
                    stage_task = secure.task_for(silo_id)
                    if stage_task is not None:
                        return stage_task
                    return IdleTask(
                        IDLE_RETRY_S, f"round {run.round}: secure aggregation at {secure.stage}"
                    )
                if p.state == "reported":
                    return IdleTask(
                        IDLE_RETRY_S, f"round {run.round}: update received, waiting for others"
                    )
                return TrainTask(
                    run=run.info,
                    round=run.round,
                    attempt=run.attempt,
                    client_index=p.client_index,
                    weight=p.weight,
                    deadline_unix_ms=run.deadline_unix_ms,
                    global_digest=run.global_digest,
                    secure=None if secure is None else secure.params,
                )
            if run.phase is Phase.EVALUATING and silo_id not in run.eval_reported:
                return EvaluateTask(
                    run=run.info,
                    round=run.completed,
                    client_index=self._client_index(silo_id),
                    deadline_unix_ms=run.deadline_unix_ms,
                    global_digest=run.global_digest,
                )
            return IdleTask(IDLE_RETRY_S, "evaluation reported, waiting for the run to finish")

    def wait_task(self, silo_id: str, current_run_id: str, wait_s: float) -> Task:
        """get_task, holding the call up to wait_s while the answer would be IDLE (long poll)."""
        end = self._clock() + max(0.0, wait_s)
        with self._cond:
            while True:
                task = self.get_task(silo_id, current_run_id)
                left = end - self._clock()
                if not isinstance(task, IdleTask) or left <= 0:
                    return task
                self._cond.wait(timeout=min(left, 0.5))

    def global_state(self, silo_id: str, run_id: str, round_: int) -> tuple[dict[str, Tensor], str]:
        """The global state after `round_` of a run (0 = initial) and its hex digest."""
        with self._lock:
            self._require_joined(silo_id)
            run = self._run
            if run is not None and run.run_id == run_id:
                if round_ > run.completed:
                    raise FailedPrecondition(
                        f"round {round_} of run {run_id} is not complete (last complete: "
                        f"{run.completed})"
                    )
                if round_ == run.completed:
                    p = run.participants.get(silo_id)
                    if run.phase is Phase.TRAINING and p is not None and p.state == "assigned":
                        p.state = "fetched"
                        self._notify()
                    return run.global_state, run.global_digest
            row = self.store.run(run_id)
            if round_ > row.completed_rounds:
                raise FailedPrecondition(f"round {round_} of run {run_id} was never completed")
            if self._cache is not None and self._cache[:2] == (run_id, round_):
                return self._cache[2], self._cache[3]
            rr = self.store.round_row(run_id, round_)
            assert rr is not None and rr.checkpoint_digest is not None
            state = self.checkpoints.read(run_id, round_, rr.checkpoint_digest)
            self._cache = (run_id, round_, state, rr.checkpoint_digest)
            return state, rr.checkpoint_digest

    def expected_update(self, silo_id: str, run_id: str, round_: int, attempt: int) -> Spec:
        """Check that this silo may send an update now; returns the payload spec to hold it to."""
        with self._lock:
            self._require_joined(silo_id)
            run = self._check_update(silo_id, run_id, round_, attempt)
            if run.secure is not None:
                raise InvalidArgument(
                    f"round {round_} uses secure aggregation: send a MASKED_UPDATE stream, never a "
                    "plain update (is this silo's pf2lora version older than the coordinator's?)"
                )
            return run.payload_spec

    def _check_update(self, silo_id: str, run_id: str, round_: int, attempt: int) -> _Run:
        run = self._active(run_id)
        if round_ == run.round and attempt != run.attempt:
            raise FailedPrecondition(
                f"update for attempt {attempt} of round {round_} refused: the round was opened "
                f"again (attempt {run.attempt}); ask for a new task"
            )
        if run.phase is not Phase.TRAINING or round_ != run.round:
            current = f"round {run.round} is {run.phase.value}"
            raise FailedPrecondition(f"update for round {round_} refused: {current}")
        p = run.participants.get(silo_id)
        if p is None:
            raise FailedPrecondition(f"silo {silo_id!r} is not a participant of round {round_}")
        if p.state == "reported":
            raise FailedPrecondition(f"silo {silo_id!r} already sent its update for round {round_}")
        if self._clock() >= run.deadline:
            raise FailedPrecondition(f"round {round_}: the deadline has passed")
        return run

    def accept_update(
        self,
        silo_id: str,
        run_id: str,
        round_: int,
        attempt: int,
        tensors: Mapping[str, Tensor],
        manifest_digest: bytes,
        manifest: Sequence[TensorInfo] = (),
    ) -> UpdateReceipt:
        """Add a validated update to the round's running sum; the last one completes the round."""
        with self._lock:
            self._require_joined(silo_id)
            run = self._check_update(silo_id, run_id, round_, attempt)
            if run.secure is not None or set(tensors) != set(run.payload_spec):
                raise InvalidArgument("update tensors do not match the round's payload spec")
            parts = [tensors] if run.running_sum is None else [run.running_sum, tensors]
            run.running_sum = sum_payloads(parts)  # the individual update is not kept
            self.store.record_update(
                run_id,
                round_,
                attempt,
                silo_id,
                manifest_digest.hex(),
                self._now_ms(),
                tensors_to_json("UPDATE", manifest),
            )
            run.participants[silo_id].state = "reported"
            self.metrics.update_accepted()
            received = sum(p.state == "reported" for p in run.participants.values())
            total = len(run.participants)
            logger.info("round %d: update from %s (%d of %d)", round_, silo_id, received, total)
            if received == total:
                self._complete_round()
            self._notify()
            return UpdateReceipt(run_id, round_, manifest_digest, received, total)

    # ------------------------------------------------------- secure aggregation
    def secure_step(
        self, silo_id: str, run_id: str, round_: int, attempt: int, step: Callable[[SecureRound], T]
    ) -> T:
        """Run one secure-aggregation step of a participant (a SecureRound method) and advance
        the round: a stage closes once everyone it waits for answered, the round completes once
        the sum is unmasked. Checks run, round and attempt first; a refusal changes nothing."""
        with self._lock:
            self._require_joined(silo_id)
            run = self._active(run_id)
            if (
                run.phase is not Phase.TRAINING
                or run.secure is None
                or (round_, attempt) != (run.round, run.attempt)
            ):
                raise FailedPrecondition(
                    f"secure-aggregation message for round {round_} attempt {attempt} refused: "
                    "round "
                    f"{run.round} attempt {run.attempt} is {run.phase.value}"
                    + (
                        ""
                        if run.secure is not None or run.phase is not Phase.TRAINING
                        else " without secure aggregation"
                    )
                )
            if silo_id not in run.participants:
                raise FailedPrecondition(f"silo {silo_id!r} is not a participant of round {round_}")
            result = step(run.secure)
            if silo_id in run.secure.progress:
                run.participants[silo_id].state = run.secure.progress[silo_id]
            self._advance_secure(run)
            return result

    def accept_masked(
        self,
        silo_id: str,
        run_id: str,
        round_: int,
        attempt: int,
        vector: Any,
        manifest_digest: bytes,
        manifest: Sequence[TensorInfo],
    ) -> tuple[int, int]:
        """Add a masked uint32 vector to the attempt's sum (SecAggServer keeps nothing else)."""

        def step(secure: SecureRound) -> tuple[int, int]:
            counts = secure.receive_masked(silo_id, vector)
            self.store.record_update(
                run_id,
                round_,
                attempt,
                silo_id,
                manifest_digest.hex(),
                self._now_ms(),
                tensors_to_json("MASKED_UPDATE", manifest),
            )
            self.metrics.update_accepted()
            return counts

        return self.secure_step(silo_id, run_id, round_, attempt, step)

    def _advance_secure(self, run: _Run, deadline_passed: bool = False) -> None:
        secure = run.secure
        assert secure is not None
        done = len(secure.timings)
        outcome = secure.advance(self._clock(), self._now_ms(), deadline_passed=deadline_passed)
        for t in secure.timings[done:]:
            self.store.record_stage(
                run.run_id, run.round, run.attempt, t.stage, t.started_ms, t.ended_ms, t.silos
            )
            self.metrics.observe_secagg_stage(t.stage, (t.ended_ms - t.started_ms) / 1000)
        if outcome is Outcome.DONE:
            self._complete_round()
        elif outcome is Outcome.FAILED:
            missing = len(run.participants) - len(secure.survivors)
            logger.warning("round %d: %s; opening it again", run.round, secure.failure)
            self.metrics.round_reopened(missing)
            self._open_round(run.round)
        else:
            run.deadline_unix_ms = self._now_ms() + int(
                max(0.0, secure.deadline - self._clock()) * 1000
            )
        self._notify()

    def report_metrics(
        self, silo_id: str, run_id: str, round_: int, kind: str, metrics: Mapping[str, float]
    ) -> None:
        values = check_metrics(metrics)
        if kind not in ("train", "evaluate"):
            raise InvalidArgument(f"metrics kind {kind!r}: use train or evaluate")
        with self._lock:
            self._require_joined(silo_id)
            row = self.store.run(run_id)
            if kind == "train":
                if not any(p.silo_id == silo_id for p in self.store.participants(run_id, round_)):
                    raise FailedPrecondition(f"silo {silo_id!r} took no part in round {round_}")
            else:
                if round_ != row.completed_rounds or row.completed_rounds != self.rounds_of(
                    row.config_json
                ):
                    raise FailedPrecondition(
                        f"round {round_} of run {run_id} is not the final round"
                    )
                if row.state in ("stopped", "failed"):
                    raise FailedPrecondition(f"run {run_id} is {row.state}")
            self.store.put_metrics(run_id, round_, silo_id, kind, values)
            run = self._run
            if kind == "evaluate" and run is not None and run.run_id == run_id:
                run.eval_reported.add(silo_id)
                self._tick()
            self._notify()

    @staticmethod
    def rounds_of(config_json: str) -> int:
        return from_json(RunConfig, config_json).rounds

    # -------------------------------------------------------------------- clock
    def tick(self) -> None:
        """Advance time-driven transitions (enrollment window, deadlines); call periodically."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        run = self._run
        if run is None:
            return
        now = self._clock()
        if run.phase is Phase.ENROLLING:
            self._maybe_seal()
        elif run.phase is Phase.TRAINING and run.secure is not None:
            if now >= run.secure.deadline:
                self._advance_secure(run, deadline_passed=True)
        elif run.phase is Phase.TRAINING and now >= run.deadline:
            reported = [p.silo_id for p in run.participants.values() if p.state == "reported"]
            missing = sorted(set(run.participants) - set(reported))
            if len(reported) >= run.cfg.min_silos:
                logger.warning("round %d: deadline passed, closing without %s", run.round, missing)
                self._complete_round()
            else:
                logger.warning(
                    "round %d: deadline passed with %d of min %d updates (missing %s); opening it "
                    "again",
                    run.round,
                    len(reported),
                    run.cfg.min_silos,
                    missing,
                )
                self.metrics.round_reopened(len(missing))
                self._open_round(run.round)
        elif run.phase is Phase.EVALUATING:
            if run.eval_targets <= run.eval_reported or now >= run.deadline:
                late = sorted(run.eval_targets - run.eval_reported)
                if late:
                    logger.warning("evaluation deadline passed without reports from %s", late)
                self._finish("completed", "" if not late else f"no evaluation from {late}")

    # --------------------------------------------------------------- transitions
    def _open_round(self, round_: int) -> None:
        run = self._run
        assert run is not None
        run.attempt = self.store.open_round(run.run_id, round_, self._now_ms())
        run.round = round_
        run.phase = Phase.ENROLLING
        run.opened_at = self._clock()
        run.enrolled = {}
        run.participants = {}
        run.running_sum = None
        run.secure = None
        run.stage_started_ms = self._now_ms()
        run.deadline = math.inf
        run.deadline_unix_ms = 0
        logger.info("run %s: round %d open (attempt %d)", run.run_id, round_, run.attempt)
        self.metrics.round_opened(round_)
        self._notify()

    def _maybe_seal(self) -> None:
        run = self._run
        assert run is not None and run.phase is Phase.ENROLLING
        if len(run.enrolled) < run.cfg.round_min_silos:
            return
        everyone = self._expected() <= set(run.enrolled)
        if not everyone and self._clock() - run.opened_at < run.cfg.enroll_window_s:
            return
        silos = sorted(run.enrolled)
        weights = client_weights([run.enrolled[s] for s in silos], run.cfg.algorithm.weighting)
        run.participants = {
            s: _Participant(s, self._client_index(s), w, run.enrolled[s])
            for s, w in zip(silos, weights, strict=True)
        }
        self.store.seal_round(
            run.run_id,
            run.round,
            run.attempt,
            [
                (p.silo_id, p.client_index, p.weight, p.num_samples)
                for p in run.participants.values()
            ],
        )
        run.phase = Phase.TRAINING
        run.deadline = self._clock() + run.cfg.round_deadline_s
        run.deadline_unix_ms = self._now_ms() + int(run.cfg.round_deadline_s * 1000)
        self._record_stage(run, "enroll", silos)
        if run.cfg.secure_aggregation:
            try:
                run.secure = SecureRound(
                    run_id=run.run_id,
                    round_=run.round,
                    attempt=run.attempt,
                    roster=silos,
                    spec=run.payload_spec,
                    settings=run.cfg.secagg,
                    clip=run.cfg.secagg_clip,
                    keys_deadline=run.deadline,
                    min_survivors=run.cfg.round_min_silos,
                    now=self._clock(),
                    now_ms=self._now_ms(),
                )
            except (ConfigError, InvalidArgument) as exc:
                logger.error("round %d: cannot run secure aggregation: %s", run.round, exc)
                self._finish("failed", f"secure aggregation of round {run.round}: {exc}")
                return
        logger.info("round %d: training with %s", run.round, ", ".join(silos))
        self.metrics.round_sealed(len(silos))
        self._notify()

    def _complete_round(self) -> None:
        run = self._run
        assert run is not None and run.phase is Phase.TRAINING
        secure = run.secure
        if secure is not None:
            assert secure.sum is not None
            reported, summed = sorted(secure.survivors), secure.sum
            run.stage_started_ms = secure.timings[-1].ended_ms  # "aggregate" includes the unmasking
            meta: dict[str, Any] = {
                "attempt": run.attempt,
                "participants": reported,
                **secure.meta(),
            }
        else:
            reported = sorted(s for s, p in run.participants.items() if p.state == "reported")
            summed = run.running_sum if run.running_sum is not None else {}
            meta = {"attempt": run.attempt, "participants": reported}
            self._record_stage(run, "train", reported)
        new_state = canonical(run.algorithm.aggregate(summed, run.global_state))
        try:
            path, digest = self.checkpoints.write(run.run_id, run.round, new_state, meta)
        except OSError as exc:
            logger.error("round %d: cannot write its checkpoint: %s", run.round, exc)
            self._finish("failed", f"checkpoint of round {run.round} could not be written: {exc}")
            return
        # The file is durable before the commit that marks the round complete.
        self._record_stage(run, "aggregate", reported)
        self.store.complete_round(
            run.run_id, run.round, run.attempt, str(path), digest, self._now_ms()
        )
        run.global_state, run.global_digest = new_state, digest
        run.completed = run.round
        run.running_sum = None
        run.secure = None
        self.metrics.round_completed(
            self._clock() - run.opened_at, len(run.participants), len(reported)
        )
        logger.info(
            "run %s: round %d complete with %d update(s), global %s",
            run.run_id,
            run.round,
            len(reported),
            digest[:16],
        )
        if run.completed >= run.cfg.rounds:
            self._begin_evaluation(reported)
        else:
            self._open_round(run.round + 1)

    def _record_stage(self, run: _Run, stage: str, silos: Sequence[str]) -> None:
        """Record that a stage of the current attempt ended now (it began at the last record)."""
        now_ms = self._now_ms()
        self.store.record_stage(
            run.run_id, run.round, run.attempt, stage, run.stage_started_ms, now_ms, silos
        )
        run.stage_started_ms = now_ms

    def _begin_evaluation(self, targets: list[str] | None = None) -> None:
        run = self._run
        assert run is not None
        if targets is None:
            rows = self.store.participants(run.run_id, run.completed)
            last = max((r.attempt for r in rows), default=0)
            targets = [r.silo_id for r in rows if r.attempt == last and r.reported_ms is not None]
        run.phase = Phase.EVALUATING
        run.round = run.completed
        run.participants = {}
        run.eval_targets = set(targets)
        run.eval_reported = set()
        run.deadline = self._clock() + run.cfg.eval_deadline_s
        run.deadline_unix_ms = self._now_ms() + int(run.cfg.eval_deadline_s * 1000)
        logger.info("run %s: final evaluation by %s", run.run_id, sorted(targets))
        self._notify()

    def _finish(self, state: str, reason: str) -> None:
        run = self._run
        assert run is not None
        self.store.finish_run(run.run_id, state, reason, self._now_ms())
        logger.info("run %s %s%s", run.run_id, state, f": {reason}" if reason else "")
        self._run = None
        self.metrics.run_ended()
        self._notify()

    # ------------------------------------------------------------------ control
    def start_run(self, cfg: RunConfig, run_id: str = "") -> str:
        """Create a run: the initial shared state (from the run seed) is checkpointed as round 0."""
        if run_id and not is_label(run_id):
            raise InvalidArgument(f"run_id={run_id!r}: use a lower-case DNS label")
        if self.allowed is not None and cfg.min_silos > len(self.allowed):
            raise InvalidArgument(
                f"min_silos={cfg.min_silos} but only {len(self.allowed)} silos are allowed"
            )
        if cfg.secure_aggregation and self.allowed is not None:
            # N * clip * 2^F must fit in int32 for the largest possible round (library check).
            cfg.secagg.check_federation(len(self.allowed), cfg.secagg_clip)
        if not cfg.secure_aggregation:
            logger.warning(
                "secure_aggregation = false: the coordinator will see each silo's weighted update "
                "(silos refuse such runs unless [silo] require_secure_aggregation = false)"
            )
        algorithm = make_algorithm(cfg.algorithm, cfg.model.adapters)
        with self._lock:
            self._refuse_if_active()
        initial = canonical(self._initial_state(algorithm, cfg.model, cfg.seed))  # slow: no lock
        with self._lock:
            self._refuse_if_active()
            run_id = run_id or new_run_id(self._wall())
            path, digest = self.checkpoints.write(run_id, 0, initial, {"seed": cfg.seed})
            self.store.create_run(run_id, to_json(cfg), self._now_ms(), str(path), digest)
            self._run = self._make_run(run_id, cfg, algorithm, initial, digest, 0)
            logger.info(
                "run %s started: %s, %d rounds, min %d silos; config %s",
                run_id,
                cfg.algorithm.name,
                cfg.rounds,
                cfg.min_silos,
                to_dict(cfg),
            )
            self._open_round(1)
            return run_id

    def _refuse_if_active(self) -> None:
        if self._run is not None:
            raise FailedPrecondition(
                f"run {self._run.run_id} is active; stop it first (pf2lora run stop "
                f"{self._run.run_id})"
            )

    def stop_run(self, run_id: str, reason: str = "") -> None:
        with self._lock:
            run = self._run
            if run is None or run.run_id != run_id:
                row = self.store.run(run_id)  # NotFound for an unknown run
                raise FailedPrecondition(f"run {run_id} is {row.state} already")
            self._finish("stopped", reason or "stopped by an operator")

    # Read-side views live in status.py; they take the lock through this accessor.
    def snapshot(self) -> tuple[threading.RLock, _Run | None, dict[str, int]]:
        return self._lock, self._run, dict(self._last_seen)

    def active_run_id(self) -> str:
        with self._lock:
            return self._run.run_id if self._run else ""

    def registered(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._registered)
