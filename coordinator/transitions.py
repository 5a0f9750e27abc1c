"""Phase changes of the active run: open, seal, complete, evaluate, finish, each recorded first.

Round r of a run goes ENROLLING -> TRAINING -> (complete) and then r+1 opens; after the last
round the run goes EVALUATING -> DONE. Every change is written to the store (a completed
round's checkpoint file before the commit that marks it complete) before it shows in memory.
The round engine (engine.py) calls these under its lock and drops a run that reached DONE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from pf2lora.common.algorithms.aggregate import client_weights
from pf2lora.common.errors import ConfigError, DataError, InvalidArgument
from pf2lora.common.privacy import accountant
from pf2lora.coordinator.active_run import ActiveRun, Participant
from pf2lora.coordinator.checkpoints import CheckpointStore, canonical
from pf2lora.coordinator.metrics import CoordinatorMetrics
from pf2lora.coordinator.secure_round import Outcome, SecureRound
from pf2lora.coordinator.store import RunState, Store
from pf2lora.coordinator.views import Phase

logger = logging.getLogger(__name__)

# How much longer than enroll_window_s the first round after a coordinator restart waits for
# the silos of the last committed round (reconnecting: silo retry_max_s is 5 s by default).
RESTART_GRACE_S = 10.0


class Transitions:
    """The write side of the round engine: every phase change of an ActiveRun."""

    def __init__(
        self,
        store: Store,
        checkpoints: CheckpointStore,
        metrics: CoordinatorMetrics,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
    ) -> None:
        self.store = store
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.clock = clock
        self.wall = wall

    def now_ms(self) -> int:
        return int(self.wall() * 1000)

    # -------------------------------------------------------------------- rounds
    def open_round(self, run: ActiveRun, round_: int) -> None:
        """Open round_ (again: a new attempt) for enrolment."""
        attempt = self.store.open_round(run.run_id, round_, self.now_ms())
        run.reset_for_round(round_, attempt, self.clock(), self.now_ms())
        logger.info("run %s: round %d open (attempt %d)", run.run_id, round_, run.attempt)
        self.metrics.round_opened(round_)

    def maybe_seal(
        self, run: ActiveRun, expected: set[str], client_index: Callable[[str], int]
    ) -> None:
        """End enrolment when every expected silo asked for work, or, once enough did, when
        the enrolment window has passed; the enrolled silos become the round's participants."""
        assert run.phase is Phase.ENROLLING
        if len(run.enrolled) < run.cfg.round_min_silos:
            return
        everyone = expected <= set(run.enrolled)
        waited = self.clock() - run.opened_at
        if not everyone and waited < run.cfg.enroll_window_s:
            return
        missing = run.awaited - set(run.enrolled)
        if missing and waited < run.cfg.enroll_window_s + RESTART_GRACE_S:
            return  # the round before the restart had them: give them time to reconnect
        run.awaited = set()
        silos = sorted(run.enrolled)
        weights = client_weights([run.enrolled[s] for s in silos], run.cfg.algorithm.weighting)
        run.participants = {
            s: Participant(s, client_index(s), w, run.enrolled[s])
            for s, w in zip(silos, weights, strict=True)
        }
        rows = [
            (p.silo_id, p.client_index, p.weight, p.num_samples) for p in run.participants.values()
        ]
        self.store.seal_round(run.run_id, run.round, run.attempt, rows)
        run.phase = Phase.TRAINING
        run.set_deadline(run.cfg.round_deadline_s, self.clock(), self.now_ms())
        self.record_stage(run, "enroll", silos)
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
                    now=self.clock(),
                    now_ms=self.now_ms(),
                )
            except (ConfigError, InvalidArgument) as exc:
                logger.error("round %d: cannot run secure aggregation: %s", run.round, exc)
                self.finish(run, "failed", f"secure aggregation of round {run.round}: {exc}")
                return
        logger.info("round %d: training with %s", run.round, ", ".join(silos))
        self.metrics.round_sealed(len(silos))

    def complete_round(self, run: ActiveRun) -> None:
        """Aggregate the round's sum, checkpoint and commit it, then open the next round (or
        begin the final evaluation)."""
        assert run.phase is Phase.TRAINING
        secure = run.secure
        if secure is not None:
            assert secure.sum is not None
            reported, summed = sorted(secure.survivors), secure.sum
            run.stage_started_ms = secure.timings[-1].ended_ms  # "aggregate" includes unmasking
            meta: dict[str, Any] = {
                "attempt": run.attempt,
                "participants": reported,
                **secure.meta(),
            }
        else:
            reported = run.reported()
            summed = run.running_sum if run.running_sum is not None else {}
            meta = {"attempt": run.attempt, "participants": reported}
            self.record_stage(run, "train", reported)
        try:
            new_state = canonical(run.algorithm.aggregate(summed, run.global_state))
        except DataError as exc:  # e.g. a DP sum of too few updates: never released
            logger.error("round %d attempt %d not released: %s", run.round, run.attempt, exc)
            self.reopen(run, 0)
            return
        dp = run.cfg.algorithm.dp
        if dp.enabled:  # what releasing this round spends (docs/security.md)
            meta["epsilon"] = accountant.epsilon(dp.noise_multiplier, run.round, dp.delta)
            meta["delta"] = dp.delta
        try:
            path, digest = self.checkpoints.write(run.run_id, run.round, new_state, meta)
        except OSError as exc:
            logger.error("round %d: cannot write its checkpoint: %s", run.round, exc)
            self.finish(
                run, "failed", f"checkpoint of round {run.round} could not be written: {exc}"
            )
            return
        # The file is durable before the commit that marks the round complete.
        self.record_stage(run, "aggregate", reported)
        self.store.complete_round(
            run.run_id, run.round, run.attempt, str(path), digest, self.now_ms()
        )
        run.global_state, run.global_digest = new_state, digest
        run.completed = run.round
        run.running_sum = None
        run.secure = None
        self.metrics.round_completed(
            self.clock() - run.opened_at, len(run.participants), len(reported)
        )
        logger.info(
            "run %s: round %d complete with %d update(s), global %s%s",
            run.run_id,
            run.round,
            len(reported),
            digest[:16],
            f", epsilon {meta['epsilon']:.3f} at delta {dp.delta:g}" if dp.enabled else "",
        )
        if dp.enabled:
            self.metrics.dp_epsilon.set(meta["epsilon"])
        if run.completed >= run.cfg.rounds or self._budget_spent(run):
            self.begin_evaluation(run, reported)
        else:
            self.open_round(run, run.round + 1)

    def _budget_spent(self, run: ActiveRun) -> bool:
        """True when releasing the next round would exceed dp.max_epsilon: training ends."""
        dp = run.cfg.algorithm.dp
        if not dp.enabled or dp.max_epsilon is None:
            return False
        after = accountant.epsilon(dp.noise_multiplier, run.completed + 1, dp.delta)
        if after <= dp.max_epsilon:
            return False
        logger.warning(
            "run %s: round %d would spend epsilon %.3f > dp.max_epsilon %g: training ends after "
            "round %d",
            run.run_id,
            run.completed + 1,
            after,
            dp.max_epsilon,
            run.completed,
        )
        return True

    def reopen(self, run: ActiveRun, missing: int) -> None:
        """The attempt failed (too few updates by the deadline, or secure aggregation failed)."""
        self.metrics.round_reopened(missing)
        self.open_round(run, run.round)

    def advance_secure(self, run: ActiveRun, deadline_passed: bool = False) -> None:
        """Let the attempt's secure aggregation move on; complete or re-open the round when it
        is done or has failed."""
        secure = run.secure
        assert secure is not None
        done = len(secure.timings)
        outcome = secure.advance(self.clock(), self.now_ms(), deadline_passed=deadline_passed)
        for t in secure.timings[done:]:
            self.store.record_stage(
                run.run_id, run.round, run.attempt, t.stage, t.started_ms, t.ended_ms, t.silos
            )
            self.metrics.observe_secagg_stage(t.stage, (t.ended_ms - t.started_ms) / 1000)
        if outcome is Outcome.DONE:
            self.complete_round(run)
        elif outcome is Outcome.FAILED:
            logger.warning("round %d: %s; opening it again", run.round, secure.failure)
            self.reopen(run, len(run.participants) - len(secure.survivors))
        else:
            left = max(0.0, secure.deadline - self.clock())
            run.deadline_unix_ms = self.now_ms() + int(left * 1000)

    def record_stage(self, run: ActiveRun, stage: str, silos: Sequence[str]) -> None:
        """Record that a stage of the current attempt ended now (it began at the last record)."""
        now_ms = self.now_ms()
        self.store.record_stage(
            run.run_id, run.round, run.attempt, stage, run.stage_started_ms, now_ms, silos
        )
        run.stage_started_ms = now_ms

    # ------------------------------------------------------------------ the clock
    def tick(self, run: ActiveRun, expected: set[str], client_index: Callable[[str], int]) -> None:
        """Time-driven transitions: the enrolment window and every deadline."""
        now = self.clock()
        if run.phase is Phase.ENROLLING:
            self.maybe_seal(run, expected, client_index)
        elif run.phase is Phase.TRAINING and run.secure is not None:
            if now >= run.secure.deadline:
                self.advance_secure(run, deadline_passed=True)
        elif run.phase is Phase.TRAINING and now >= run.deadline:
            reported = run.reported()
            missing = sorted(set(run.participants) - set(reported))
            if len(reported) >= run.cfg.min_silos:
                logger.warning("round %d: deadline passed, closing without %s", run.round, missing)
                self.complete_round(run)
            else:
                logger.warning(
                    "round %d: deadline passed with %d of min %d updates (missing %s); "
                    "opening it again",
                    run.round,
                    len(reported),
                    run.cfg.min_silos,
                    missing,
                )
                self.reopen(run, len(missing))
        elif run.phase is Phase.EVALUATING:
            if run.eval_targets <= run.eval_reported or now >= run.deadline:
                late = sorted(run.eval_targets - run.eval_reported)
                if late:
                    logger.warning("evaluation deadline passed without reports from %s", late)
                self.finish(run, "completed", "" if not late else f"no evaluation from {late}")

    # ------------------------------------------------------------------ the end
    def begin_evaluation(self, run: ActiveRun, targets: list[str] | None = None) -> None:
        """After the last round: `targets` (default: the last round's reporters) evaluate."""
        if targets is None:
            rows = self.store.participants(run.run_id, run.completed)
            last = max((r.attempt for r in rows), default=0)
            targets = [r.silo_id for r in rows if r.attempt == last and r.reported_ms is not None]
        run.phase = Phase.EVALUATING
        run.round = run.completed
        run.participants = {}
        run.eval_targets = set(targets)
        run.eval_reported = set()
        run.set_deadline(run.cfg.eval_deadline_s, self.clock(), self.now_ms())
        logger.info("run %s: final evaluation by %s", run.run_id, sorted(targets))

    def finish(self, run: ActiveRun, state: RunState, reason: str) -> None:
        """End the run (completed, stopped or failed): the engine then drops it."""
        self.store.finish_run(run.run_id, state, reason, self.now_ms())
        logger.info("run %s %s%s", run.run_id, state, f": {reason}" if reason else "")
        run.phase = Phase.DONE
        self.metrics.run_ended()
