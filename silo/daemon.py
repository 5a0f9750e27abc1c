"""The silo daemon: Join, then a loop of GetTask -> TRAIN / EVALUATE / STOP, dialling out only.

Per TRAIN task for round r: fetch the global state of round r-1 (checked against the task's
digest), load the newest private state of a round < r, train, save the state of round r, send
`runtime.run_round(...).payload` (built from the shared state only: the private adapter never
leaves) masked by secure aggregation (silo/secure_round.py; plain only in a run that turned it
off, and only if [silo] require_secure_aggregation = false), report scalar metrics. Per EVALUATE
task: evaluate the personalised and shared-only
models on the local held-out files and report the scalars.

Under torchrun this daemon is rank 0 of the silo's processes: it tells the other ranks
(silo/ranks.py) to build each run's model, to take the private state it loaded, and to train each
round with it on their shards of every batch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
import torch

from pf2lora.common.errors import DataError
from pf2lora.common.learning.batching import resolve_device
from pf2lora.common.learning.distributed import SINGLE, Group
from pf2lora.common.learning.fingerprint import ModelMismatch
from pf2lora.common.learning.trainer import Diverged
from pf2lora.common.transport import grpc_factory
from pf2lora.common.version import software_version
from pf2lora.common.wire.tasks import EvaluateTask, IdleTask, RunInfo, StopTask, Task, TrainTask
from pf2lora.silo.client import CoordinatorClient, Stopped
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.metrics import SiloMetrics
from pf2lora.silo.ranks import Leader, RankFailed
from pf2lora.silo.runtime import RunContext, build_context, count_train_examples
from pf2lora.silo.secure_round import REFUSALS, SecureRoundDriver, Superseded
from pf2lora.silo.state import SiloState, StateDamaged
from pf2lora.silo.wire_record import WireRecord

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_PERMISSION_DENIED = 3
EXIT_INVALID_ARGUMENT = 4
EXIT_STATE_DAMAGED = 5  # this silo's own state is missing or damaged: an operator decides
EXIT_RANK_FAILED = 6  # training failed with several processes: restart them all (torchrun)
# The only value a silo with report_metrics = false sends: its final evaluation is done.
WITHHELD = "metrics_withheld"
ERROR_PAUSE_S = 5.0  # after an unexpected error, before asking for work again


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return exc.code()  # type: ignore[attr-defined,no-any-return]


def _details(exc: grpc.RpcError) -> str:
    return str(exc.details())  # type: ignore[attr-defined]


class Fatal(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# What the final evaluation's log line shows (classification: accuracy; decoder: the rest).
REPORTED_METRICS = ("accuracy", "answer_loss", "exact_match", "rouge_l")


class SiloDaemon:
    def __init__(
        self,
        cfg: SiloConfig,
        *,
        stop: threading.Event | None = None,
        interceptors: tuple[grpc_factory.ClientInterceptor, ...] = (),
        start_over: bool = False,
        group: Group = SINGLE,
    ) -> None:
        cfg.require_transport()
        cfg.require_data()
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.interceptors = interceptors
        self.start_over = start_over  # set damaged private state aside instead of stopping
        self.group = group
        self.leader = Leader(group) if group.world > 1 else None  # the other ranks' commands
        self.state = SiloState(cfg.silo.state_dir, cfg.silo.keep_rounds)
        self.ctx: RunContext | None = None
        self.current_run = self.state.current_run()
        self.wire = WireRecord(self.state.root / "runs", cfg.silo.id)  # what crossed the wire
        self._pending: Task | None = None  # a task received while a secure round was waiting
        self._sat_out: set[tuple[str, int, int]] = set()  # (run, round, attempt) refused
        self.metrics = SiloMetrics()  # served at [server] metrics_listen while run() runs
        self.metrics.set_info(cfg.silo.id, cfg.silo.federation, software_version())

    # -------------------------------------------------------------------- loop
    def run(self) -> int:
        cfg = self.cfg
        if cfg.silo.threads:
            torch.set_num_threads(cfg.silo.threads)
        logger.info(
            "silo.device=%s: training on %s", cfg.silo.device, resolve_device(cfg.silo.device)
        )
        num_samples = count_train_examples(cfg.data)
        health = None
        if cfg.server.health_listen:
            health, _, port = grpc_factory.create_health_server(cfg.server.health_listen)
            health.start()
            logger.info("health service on port %d", port)
        metrics_server = (
            self.metrics.serve(cfg.server.metrics_listen) if cfg.server.metrics_listen else None
        )
        self.client = CoordinatorClient(cfg, self.stop, interceptors=self.interceptors)
        self.secure = SecureRoundDriver(cfg, self.client, self.state, self.wire, self.stop)
        if not cfg.tls.configured:
            logger.warning(
                "no [tls] certificate and key: this silo cannot sign secure-aggregation keys "
                "and will sit out every secure round"
            )
        try:
            self._join(num_samples)
            while not self.stop.is_set():
                try:
                    if self._step(num_samples):
                        return EXIT_OK
                except grpc.RpcError as exc:
                    self._on_rpc_error(exc, "GetTask", num_samples)
            return EXIT_OK
        except Stopped:
            return EXIT_OK
        except Fatal as exc:
            logger.error("%s", exc)
            return exc.code
        except RankFailed as exc:
            self.leader = None  # nobody left to tell
            logger.error(
                "%s; nothing of the current round was sent: start the silo again (all its "
                "processes), it resumes from its last saved round",
                exc,
            )
            return EXIT_RANK_FAILED
        finally:
            self.client.close()
            self._stop_followers()
            if health is not None:
                health.stop(0)
            if metrics_server is not None:
                metrics_server.stop()
            logger.info("silo %s stopped", cfg.silo.id)

    def _stop_followers(self) -> None:
        if self.leader is None:
            return
        try:
            self.leader.stop()
        except RankFailed as exc:  # a rank is gone already: torchrun stops the rest
            logger.warning("could not tell the other ranks to stop: %s", exc)
        self.leader = None

    def _join(self, num_samples: int) -> None:
        while True:
            try:
                info = self.client.join(num_samples, software_version())
                break
            except grpc.RpcError as exc:
                self._fatal_if_refused(exc, "Join")
                logger.warning(
                    "Join failed: %s: %s; again in %.0f s",
                    _code(exc).name,
                    _details(exc),
                    ERROR_PAUSE_S,
                )
                if self.stop.wait(ERROR_PAUSE_S):
                    raise Stopped("stopped before joining") from None
        logger.info(
            "silo %s joined federation %s with %d examples (active run: %s)",
            self.cfg.silo.id,
            info.federation,
            num_samples,
            info.active_run_id or "none",
        )

    def _fatal_if_refused(self, exc: grpc.RpcError, what: str) -> None:
        if _code(exc) == grpc.StatusCode.PERMISSION_DENIED:
            raise Fatal(
                EXIT_PERMISSION_DENIED,
                f"{what}: the coordinator refused silo {self.cfg.silo.id!r}: {_details(exc)} "
                "(check [silo] id/federation, the certificate and the coordinator's allowed_silos)",
            )
        if _code(exc) == grpc.StatusCode.INVALID_ARGUMENT:
            raise Fatal(
                EXIT_INVALID_ARGUMENT,
                f"{what}: the coordinator rejected a request as malformed: {_details(exc)} "
                "(is this silo's pf2lora version compatible with the coordinator's?)",
            )

    def _on_rpc_error(self, exc: grpc.RpcError, what: str, num_samples: int) -> None:
        self._fatal_if_refused(exc, what)
        if _code(exc) == grpc.StatusCode.FAILED_PRECONDITION and "Join" in _details(exc):
            logger.warning("%s: %s; joining again", what, _details(exc))
            self._join(num_samples)
            return
        logger.warning(
            "%s failed: %s: %s; asking again in %.0f s",
            what,
            _code(exc).name,
            _details(exc),
            ERROR_PAUSE_S,
        )
        self.stop.wait(ERROR_PAUSE_S)

    def _step(self, num_samples: int) -> bool:
        """One task; True when the daemon should exit."""
        t0 = time.monotonic()
        self.client.reload_tls_if_changed()  # a rotated certificate, between tasks
        task, self._pending = self._pending or self.client.get_task(self.current_run), None
        if isinstance(task, IdleTask):
            logger.debug("idle: %s", task.reason)
            self.stop.wait(max(0.0, task.retry_after_s - (time.monotonic() - t0)))
        elif isinstance(task, TrainTask):
            self._guarded(
                f"round {task.round}", lambda: self._train(task), num_samples, task.run.run_id
            )
        elif isinstance(task, EvaluateTask):
            self._guarded("evaluation", lambda: self._evaluate(task), num_samples, task.run.run_id)
        elif isinstance(task, StopTask):
            logger.info(
                "run %s ended: %s%s",
                task.run_id,
                task.state,
                f" ({task.reason})" if task.reason else "",
            )
            self.state.clear_current_run()
            self.current_run = ""
            self.ctx = None
            return self.cfg.silo.exit_after_run
        return False

    def _guarded(self, what: str, fn: Any, num_samples: int, run_id: str) -> None:
        try:
            fn()
        except Superseded as exc:  # the coordinator moved on while a secure round waited
            logger.warning("%s: %s; taking that task", what, exc)
            self._pending = exc.task
        except (ModelMismatch, Diverged) as exc:  # before REFUSALS: ModelMismatch is one too
            self._refuse_run(run_id, exc)
        except REFUSALS as exc:  # a secure round this silo does not (or no longer) take part in
            logger.error("%s: sitting this attempt out: %s", what, exc)
            self.stop.wait(ERROR_PAUSE_S)
        except grpc.RpcError as exc:
            if _code(exc) == grpc.StatusCode.FAILED_PRECONDITION:
                # The round moved on (deadline, re-opened, coordinator restarted): not an error.
                logger.warning("%s: the coordinator refused it: %s", what, _details(exc))
                return
            self._on_rpc_error(exc, what, num_samples)
        except DataError as exc:
            logger.error("%s failed: %s; asking for work again in %.0f s", what, exc, ERROR_PAUSE_S)
            self.stop.wait(ERROR_PAUSE_S)

    def _refuse_run(self, run_id: str, exc: Exception) -> None:
        """This silo cannot take part in the run: say so to the coordinator, which stops
        waiting for it, shows the reason in `run status` and gives it no more of the run's
        tasks (until this silo joins again)."""
        logger.error("run %s refused: %s", run_id, exc)
        self.client.refuse_run(run_id, str(exc))
        self.ctx = None

    # ------------------------------------------------------------------- tasks
    def _context(self, run: RunInfo, client_index: int) -> RunContext:
        ctx = self.ctx
        if ctx is not None and ctx.run.run_id == run.run_id and ctx.client_index == client_index:
            return ctx
        self.ctx = None
        ctx = build_context(run, client_index, self.cfg, self.group)
        if self.leader is not None:  # only once rank 0 accepted the run: the others follow
            self.leader.context(run, client_index)
        self.state.write_run_record(
            run.run_id,
            {
                "run_id": run.run_id,
                "algorithm_json": run.algorithm_json,
                "model_json": run.model_json,
                "run_seed": run.seed,
                "rounds": run.rounds,
                "client_index": client_index,
                "seed": ctx.seed,
                "silo_id": self.cfg.silo.id,
            },
        )
        self.ctx = ctx
        self.current_run = run.run_id
        return ctx

    def _prepare(self, ctx: RunContext, round_: int) -> int:
        try:
            loaded = self.state.prepare(ctx.runtime.client, ctx.run.run_id, round_)
        except StateDamaged as exc:
            if not self.start_over:
                raise Fatal(EXIT_STATE_DAMAGED, str(exc)) from None
            logger.warning("%s", exc)
            self.state.start_over(ctx.run.run_id)
            self.start_over = False  # once: a second damage in this process stops it
            loaded = self.state.prepare(ctx.runtime.client, ctx.run.run_id, round_)
        if not ctx.loaded_from_disk:
            ctx.loaded_from_disk = True
            self.state.write_resume_record(ctx.run.run_id, loaded, ctx.runtime.client)
        if self.leader is not None:  # every rank trains from the state rank 0 loaded
            self.leader.sync(ctx)
        return loaded

    def _refuse(self, task: TrainTask) -> bool:
        """True (after waiting, logging once) for a TRAIN task this silo does not take part in."""
        key = (task.run.run_id, task.round, task.attempt)
        why = ""
        if task.secure is None and self.cfg.silo.require_secure_aggregation:
            why = (
                "the run does not use secure aggregation: the coordinator would see this silo's "
                "update (set [silo] require_secure_aggregation = false to take part)"
            )
        elif task.secure is not None and self.state.keys_advertised(*key):
            why = "this silo advertised keys for this attempt before it restarted: sitting it out"
        if not why:
            return False
        if key not in self._sat_out:
            self._sat_out.add(key)
            logger.error("round %d attempt %d refused: %s", task.round, task.attempt, why)
        left_s = task.deadline_unix_ms / 1000 - time.time()
        self.stop.wait(min(max(ERROR_PAUSE_S, left_s), 60.0))
        return True

    def _train(self, task: TrainTask) -> None:
        run_id, rnd = task.run.run_id, task.round
        if self._refuse(task):
            return
        ctx = self._context(task.run, task.client_index)
        t0 = time.perf_counter()
        global_state = self.client.fetch_global(run_id, rnd - 1, task.global_digest)
        self.wire.fetched(run_id, rnd - 1, task.global_digest)
        self.state.save_global(run_id, rnd - 1, global_state)
        t1 = time.perf_counter()
        base = self._prepare(ctx, rnd)
        logger.info(
            "round %d (attempt %d): training from the state after round %d, weight %.4f",
            rnd,
            task.attempt,
            base,
            task.weight,
        )
        result = self._run_round(ctx, global_state, task.weight)
        self.state.save_after(ctx.runtime.client, run_id, rnd)
        t2 = time.perf_counter()
        metrics = dict(result.metrics)
        if task.secure is not None:  # masked: the coordinator only ever adds it to the others
            outcome = self.secure.run(task, result.payload)
            receipt = outcome.receipt
            metrics.update({f"secagg_{k}_seconds": v for k, v in outcome.seconds.items()})
        else:
            receipt = self.client.push_update(run_id, rnd, task.attempt, result.payload)
            if receipt.sent is not None:
                self.wire.sent_update(
                    run_id, rnd, task.attempt, receipt.sent, receipt.manifest_digest
                )
        t3 = time.perf_counter()
        logger.info(
            "round %d: %supdate accepted, digest %s",
            rnd,
            "masked " if task.secure is not None else "",
            receipt.manifest_digest.hex()[:16],
        )
        metrics.update(
            weight=task.weight, fetch_seconds=t1 - t0, local_seconds=t2 - t1, push_seconds=t3 - t2
        )
        self.metrics.round_done(
            rnd, fetch_s=t1 - t0, local_s=t2 - t1, push_s=t3 - t2, metrics=metrics
        )
        if self._may_report(ctx):
            self.client.report_metrics(run_id, rnd, "train", metrics)

    def _run_round(self, ctx: RunContext, global_state: Any, weight: float) -> Any:
        if self.leader is None:
            return ctx.runtime.run_round(global_state, weight)
        self.leader.round(global_state, weight)
        try:
            return ctx.runtime.run_round(global_state, weight)
        except Diverged:  # every rank saw the same losses and stopped at the same step
            raise
        except Exception as exc:  # a rank died or failed: the ranks are out of step
            raise RankFailed(f"training with {self.group.world} processes failed ({exc})") from exc

    def _may_report(self, ctx: RunContext) -> bool:
        """Per-silo scalars leave only if this silo allows it and, in a DP run, the run does
        ([algorithm.dp] report_metrics; they are not covered by the guarantee)."""
        dp = ctx.algorithm.cfg.dp
        return self.cfg.silo.report_metrics and (not dp.enabled or dp.report_metrics)

    def _evaluate(self, task: EvaluateTask) -> None:
        run_id = task.run.run_id
        ctx = self._context(task.run, task.client_index)
        global_state = self.client.fetch_global(run_id, task.round, task.global_digest)
        self.wire.fetched(run_id, task.round, task.global_digest)
        self.state.save_global(run_id, task.round, global_state)
        self._prepare(ctx, task.round + 1)
        metrics = ctx.runtime.evaluate(global_state)
        self.metrics.evaluated(metrics)
        logger.info(
            "run %s: final evaluation %s",
            run_id,
            {k: round(v, 4) for k, v in metrics.items() if k.endswith(REPORTED_METRICS)},
        )
        reported = metrics if self._may_report(ctx) else {WITHHELD: 1.0}
        self.client.report_metrics(run_id, task.round, "evaluate", reported)
