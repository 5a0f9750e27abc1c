"""The round engine: a state machine over one active run, driven by silo events and a clock.

Silos that ask for work while a round enrolls are its participants; enrollment ends when every
expected silo asked (the allow-list, or every registered silo) or, once min_silos asked, after
enroll_window_s. Each participant gets a TRAIN task with its public weight p_k over the round's
participants. The round completes when every participant's update arrived, or at the deadline
if at least min_silos did; with fewer it is opened again (attempt + 1), and updates of older
attempts are refused. The phase changes themselves (and what each writes to the store) are in
transitions.py; the active run's in-memory state is active_run.py's.

With secure aggregation (the default) a participant's TRAIN task carries the attempt's SecAgg+
parameters and the round then runs the stages of coordinator/secure_round.py: the engine only
sees masked vectors, which SecAggServer adds, and the unmasked SUM of the survivors. Without it,
plain updates are added to a running sum as they arrive (`sum_payloads`) and not kept. Either
way the new global state is `algorithm.aggregate(sum, previous)`: nothing here needs an
individual update beyond adding it. A restart resumes at the last committed round and opens
the next one again.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from pf2lora.common.algorithms.aggregate import sum_payloads
from pf2lora.common.algorithms.base import Algorithm
from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.learning.fingerprint import with_identity
from pf2lora.common.names import is_label
from pf2lora.common.runspec import RunConfig, from_json, to_dict, to_json
from pf2lora.common.wire.manifest import TensorInfo, tensors_to_json
from pf2lora.common.wire.tasks import IdleTask, MetricsKind, StopTask, Task
from pf2lora.coordinator.active_run import (
    IDLE_RETRY_S,
    ActiveRun,
    Spec,
    build_active_run,
    load_running_run,
    new_run_id,
)
from pf2lora.coordinator.checkpoints import CheckpointStore, canonical
from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.coordinator.secure_round import SecureRound
from pf2lora.coordinator.store import Store
from pf2lora.coordinator.transitions import Transitions
from pf2lora.coordinator.views import Phase, UpdateReceipt

logger = logging.getLogger(__name__)

T = TypeVar("T")
InitialState = Callable[[Algorithm, ModelConfig, int], dict[str, Tensor]]


def default_initial_state(algorithm: Algorithm, model: ModelConfig, seed: int) -> dict[str, Tensor]:
    from pf2lora.common.client_runtime import initial_global_state

    return initial_global_state(algorithm, model, seed)


def _unnamed(model: ModelConfig) -> ModelConfig:
    return model


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
        name_model: Callable[[ModelConfig], ModelConfig] | None = None,
    ) -> None:
        self.store = store
        # The run's model gets its id and fingerprint at run start; an injected initial_state
        # (tests, tools) stands in for the model, so by default there is nothing to fingerprint.
        if name_model is None:
            name_model = with_identity if initial_state is default_initial_state else _unnamed
        self._name_model = name_model
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
        self._run: ActiveRun | None = None
        self.transitions = Transitions(store, checkpoints, self.metrics, clock=clock, wall=wall)
        self.recover()

    # ------------------------------------------------------------------ helpers
    def _now_ms(self) -> int:
        return int(self._wall() * 1000)

    def _notify(self) -> None:
        """Wake long polls; drop the active run once a transition finished it."""
        if self._run is not None and self._run.phase is Phase.DONE:
            self._run = None
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
        silos = set(self.allowed) if self.allowed is not None else set(self._registered)
        return silos - set(self._run.refused) if self._run is not None else silos

    def expected_silos(self) -> set[str]:
        """The silos a round's enrolment waits for (the allow-list, or every registered one)."""
        with self._lock:
            return self._expected()

    def _active(self, run_id: str) -> ActiveRun:
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
            run = load_running_run(self.store, self.checkpoints, self._now_ms())
            if run is None:
                return
            self._run = run
            if run.completed < run.cfg.rounds:
                logger.warning(
                    "resuming run %s after round %d of %d: round %d starts again",
                    run.run_id,
                    run.completed,
                    run.cfg.rounds,
                    run.completed + 1,
                )
                self.transitions.open_round(run, run.completed + 1)
            else:
                logger.warning("resuming run %s in its final evaluation", run.run_id)
                self.transitions.begin_evaluation(run)
                done = self.store.metrics(run.run_id, kind="evaluate", round_=run.cfg.rounds)
                run.eval_reported = {silo for (_, silo, _) in done}
            self._notify()

    # -------------------------------------------------------------- silo events
    def join(self, silo_id: str, num_samples: int, version: str) -> str:
        """Register a silo (again); returns the active run id ('' if none)."""
        self._require_allowed(silo_id)
        if not 1 <= num_samples < 2**53:
            raise InvalidArgument(f"num_samples={num_samples}: a silo needs at least one example")
        with self._lock:
            run = self._run
            fixed = run.samples.get(silo_id) if run is not None else None
            if fixed is not None and fixed != num_samples:
                assert run is not None
                raise FailedPrecondition(
                    f"silo {silo_id!r} takes part in run {run.run_id} with {fixed} examples and "
                    f"now joins with {num_samples}: a silo's count (its weight) cannot change "
                    "inside a run; rejoin with the same data, or after the run"
                )
            self.store.upsert_silo(silo_id, num_samples, version[:64], self._now_ms())
            row = self.store.silo(silo_id)
            assert row is not None
            self._registered[silo_id] = row
            self._last_seen[silo_id] = self._now_ms()
            if run is not None and run.refused.pop(silo_id, None) is not None:
                logger.info("silo %s joined again: it may take part in run %s", silo_id, run.run_id)
            logger.info("silo %s joined (%d examples, version %s)", silo_id, num_samples, version)
            self._notify()
            return self._run.run_id if self._run else ""

    def silo_restarted(self, silo_id: str) -> None:
        """A new process of this silo joined: if the round's secure aggregation waits for its
        dead predecessor (keys advertised), stop waiting now instead of at the deadline."""
        with self._lock:
            run = self._run
            if run is None or run.secure is None or silo_id not in run.participants:
                return
            if run.secure.withdraw(silo_id):
                logger.warning(
                    "round %d attempt %d: silo %s restarted after advertising keys: the attempt "
                    "goes on without it (stage %s)",
                    run.round,
                    run.attempt,
                    silo_id,
                    run.secure.stage,
                )
                self.transitions.advance_secure(run)
                self._notify()

    def refuse_run(self, silo_id: str, run_id: str, reason: str) -> None:
        """The silo cannot take part in the run (its model differs, ...): record why, and stop
        waiting for it in this round (enrolment, its update or its secure-aggregation stages)
        and in the rounds after, until the silo joins again."""
        with self._lock:
            self._require_joined(silo_id)
            run = self._active(run_id)
            reason = " ".join(reason.split())[:1000] or "no reason given"
            if silo_id not in run.refused:
                logger.error("run %s: silo %s refused the run: %s", run_id, silo_id, reason)
            run.refused[silo_id] = (reason, self._now_ms())
            if run.phase is Phase.ENROLLING:
                run.enrolled.pop(silo_id, None)
                self.transitions.maybe_seal(run, self._expected(), self._client_index)
            elif run.phase is Phase.TRAINING and silo_id in run.participants:
                if run.participants[silo_id].state == "reported":
                    pass  # its update is in this round's sum already
                elif run.secure is not None:
                    if run.secure.decline(silo_id):
                        self.transitions.advance_secure(run)
                else:
                    del run.participants[silo_id]
                    if len(run.participants) < run.cfg.min_silos:
                        self.transitions.reopen(run, 1)
                    elif all(p.state == "reported" for p in run.participants.values()):
                        self.transitions.complete_round(run)
            elif run.phase is Phase.EVALUATING:
                run.eval_targets.discard(silo_id)
                self.transitions.tick(run, self._expected(), self._client_index)
            self._notify()

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
            if run is not None and run.phase is Phase.ENROLLING and silo_id not in run.enrolled:
                n = run.samples.setdefault(silo_id, self._registered[silo_id].num_samples)
                run.enrolled[silo_id] = n
                logger.info(
                    "round %d: silo %s enrolled (%d)", run.round, silo_id, len(run.enrolled)
                )
                self.transitions.maybe_seal(run, self._expected(), self._client_index)
                self._notify()
                run = self._run
            if run is None:
                return IdleTask(IDLE_RETRY_S, "no active run")
            return run.task_for(silo_id, self._client_index)

    def wait_task(
        self,
        silo_id: str,
        current_run_id: str,
        wait_s: float,
        alive: Callable[[], bool] = lambda: True,
    ) -> Task:
        """get_task, holding the call up to wait_s while the answer would be IDLE (long poll);
        it ends early once `alive()` says the caller went away."""
        end = self._clock() + max(0.0, wait_s)
        with self._cond:
            while True:
                task = self.get_task(silo_id, current_run_id)
                left = end - self._clock()
                if not isinstance(task, IdleTask) or left <= 0 or not alive():
                    return task
                self._cond.wait(timeout=min(left, 0.2))  # also how soon a gone caller ends

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
            rr = self.store.round_row(run_id, round_)
            assert rr is not None and rr.checkpoint_digest is not None
            state = self.checkpoints.read_cached(run_id, round_, rr.checkpoint_digest)
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

    def _check_update(self, silo_id: str, run_id: str, round_: int, attempt: int) -> ActiveRun:
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
            self._record_update(
                run_id, round_, attempt, silo_id, manifest_digest, "UPDATE", manifest
            )
            run.participants[silo_id].state = "reported"
            received = sum(p.state == "reported" for p in run.participants.values())
            total = len(run.participants)
            logger.info("round %d: update from %s (%d of %d)", round_, silo_id, received, total)
            if received == total:
                self.transitions.complete_round(run)
            self._notify()
            return UpdateReceipt(run_id, round_, manifest_digest, received, total)

    def _record_update(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        silo_id: str,
        digest: bytes,
        kind: str,
        manifest: Sequence[TensorInfo],
    ) -> None:
        """Record an accepted (plain or masked) update with its manifest; count it."""
        self.store.record_update(
            run_id,
            round_,
            attempt,
            silo_id,
            digest.hex(),
            self._now_ms(),
            tensors_to_json(kind, manifest),
        )
        self.metrics.update_accepted()

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
            secure = run.secure
            if (
                run.phase is not Phase.TRAINING
                or secure is None
                or (round_, attempt) != (run.round, run.attempt)
            ):
                plain = secure is None and run.phase is Phase.TRAINING
                raise FailedPrecondition(
                    f"secure-aggregation message for round {round_} attempt {attempt} refused: "
                    f"round {run.round} attempt {run.attempt} is {run.phase.value}"
                    + (" without secure aggregation" if plain else "")
                )
            if silo_id not in run.participants:
                raise FailedPrecondition(f"silo {silo_id!r} is not a participant of round {round_}")
            result = step(secure)
            if silo_id in secure.progress:
                run.participants[silo_id].state = secure.progress[silo_id]
            self.transitions.advance_secure(run)
            self._notify()
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
            self._record_update(
                run_id, round_, attempt, silo_id, manifest_digest, "MASKED_UPDATE", manifest
            )
            return counts

        return self.secure_step(silo_id, run_id, round_, attempt, step)

    def report_metrics(
        self, silo_id: str, run_id: str, round_: int, kind: MetricsKind, values: Mapping[str, float]
    ) -> None:
        """Store a silo's scalar metrics (checked by the servicer) of a round it took part in,
        or of the final evaluation."""
        with self._lock:
            self._require_joined(silo_id)
            row = self.store.run(run_id)
            if kind == "train":
                if not any(p.silo_id == silo_id for p in self.store.participants(run_id, round_)):
                    raise FailedPrecondition(f"silo {silo_id!r} took no part in round {round_}")
            else:
                final = from_json(RunConfig, row.config_json).rounds
                if round_ != row.completed_rounds or row.completed_rounds != final:
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

    # -------------------------------------------------------------------- clock
    def tick(self) -> None:
        """Advance time-driven transitions (enrollment window, deadlines); call periodically."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        if self._run is not None:
            self.transitions.tick(self._run, self._expected(), self._client_index)
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
        try:  # the run names its base model: silos with another model refuse it at once
            cfg = dataclasses.replace(cfg, model=self._name_model(cfg.model))
        except ConfigError as exc:
            raise InvalidArgument(f"model: {exc}") from None
        initial = canonical(self._initial_state(algorithm, cfg.model, cfg.seed))  # slow: no lock
        with self._lock:
            self._refuse_if_active()
            run_id = run_id or new_run_id(self._wall())
            path, digest = self.checkpoints.write(run_id, 0, initial, {"seed": cfg.seed})
            self.store.create_run(run_id, to_json(cfg), self._now_ms(), str(path), digest)
            run = build_active_run(run_id, cfg, algorithm, initial, digest, 0)
            self._run = run
            logger.info(
                "run %s started: %s, %d rounds, min %d silos; config %s",
                run_id,
                cfg.algorithm.name,
                cfg.rounds,
                cfg.min_silos,
                to_dict(cfg),
            )
            self.transitions.open_round(run, 1)
            self._notify()
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
            self.transitions.finish(run, "stopped", reason or "stopped by an operator")
            self._notify()

    # Read-side views live in status.py; they take the lock through this accessor.
    def snapshot(self) -> tuple[threading.RLock, ActiveRun | None, dict[str, int]]:
        return self._lock, self._run, dict(self._last_seen)

    def active_run_id(self) -> str:
        with self._lock:
            return self._run.run_id if self._run else ""
