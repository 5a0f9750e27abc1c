"""Read-side views of the coordinator's state for the control API: run status, silos, round
manifests.
"""

from __future__ import annotations

import logging
from statistics import fmean

from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.errors import FailedPrecondition, NotFound
from pf2lora.common.privacy import accountant
from pf2lora.common.runspec import RunConfig, from_json
from pf2lora.common.wire.manifest import payload_layout, tensor_spec, tensors_from_json
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.store import StageRow
from pf2lora.coordinator.views import (
    ManifestView,
    ParticipantView,
    Phase,
    RoundView,
    RunView,
    SiloMetricsView,
    SiloView,
    UpdateView,
)

logger = logging.getLogger(__name__)


def _secure_outcome(stages: list[StageRow]) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """(secure aggregation used, silos summed, silos dropped after sharing keys) of an attempt."""
    by = {s.stage: s.silos for s in stages}
    if "masked_input" not in by:
        return False, (), ()
    summed = by["masked_input"]
    return True, summed, tuple(s for s in by.get("share_keys", ()) if s not in summed)


def run_status(engine: Engine, run_id: str = "") -> RunView:
    """The status of a run (the latest when run_id is empty); NotFound if there is none."""
    store = engine.store
    lock, run, _ = engine.snapshot()
    with lock:
        if not run_id:
            run_id = store.latest_run_id() or ""
            if not run_id:
                raise NotFound("no run has been started yet (pf2lora run start ...)")
        row = store.run(run_id)
        active = run if run is not None and run.run_id == run_id else None
        train = store.metrics(run_id, kind="train")
        cfg = from_json(RunConfig, row.config_json)  # once per status call
        dp = cfg.algorithm.dp
        history: list[RoundView] = []
        for rr in store.rounds(run_id):
            if rr.round == 0 or rr.state != "complete":
                continue
            parts = store.participants(run_id, rr.round, rr.attempt)
            reported = tuple(p.silo_id for p in parts if p.reported_ms is not None)
            per_silo = [
                train[(rr.round, s, "train")] for s in reported if (rr.round, s, "train") in train
            ]
            names = sorted({k for m in per_silo for k in m})
            means = {k: fmean(m[k] for m in per_silo if k in m) for k in names}
            stages = store.stages(run_id, rr.round, rr.attempt)
            secure, _, dropped = _secure_outcome(stages)
            history.append(
                RoundView(
                    round=rr.round,
                    attempt=rr.attempt,
                    participants=tuple(p.silo_id for p in parts),
                    reported=reported,
                    opened_ms=rr.opened_ms,
                    completed_ms=rr.completed_ms,
                    checkpoint_digest=rr.checkpoint_digest,
                    mean_metrics=means,
                    stage_seconds={st.stage: (st.ended_ms - st.started_ms) / 1000 for st in stages},
                    secure_aggregation=secure,
                    dropped=dropped,
                    epsilon=accountant.epsilon(dp.noise_multiplier, rr.round, dp.delta)
                    if dp.enabled
                    else 0.0,
                )
            )
        evaluation = tuple(
            SiloMetricsView(silo, rnd, kind, values)
            for (rnd, silo, kind), values in store.metrics(run_id, kind="evaluate").items()
        )
        if active is not None:
            phase = active.phase
            participants = tuple(
                ParticipantView(p.silo_id, p.weight, p.state) for p in active.participants.values()
            )
            current, attempt = active.round, active.attempt
            enrolled = tuple(sorted(active.enrolled)) if phase is Phase.ENROLLING else ()
            deadline = active.deadline_unix_ms
            secagg_stage = active.secure.stage if active.secure is not None else ""
            waiting = active.waiting_for(engine.expected_silos())
            refused = tuple((s, why, ms) for s, (why, ms) in sorted(active.refused.items()))
        else:
            phase, participants, current, attempt, enrolled, deadline = Phase.DONE, (), 0, 0, (), 0
            secagg_stage, waiting, refused = "", (), ()
        return RunView(
            run_id=run_id,
            state=row.state,
            phase=phase,
            rounds=cfg.rounds,
            completed_rounds=row.completed_rounds,
            current_round=current,
            attempt=attempt,
            enrolled=enrolled,
            participants=participants,
            deadline_unix_ms=deadline,
            history=tuple(history),
            evaluation=evaluation,
            config_json=row.config_json,
            created_ms=row.created_ms,
            finished_ms=row.finished_ms,
            reason=row.reason,
            secagg_stage=secagg_stage,
            waiting_for=waiting,
            refused=refused,
        )


def list_silos(engine: Engine) -> list[SiloView]:
    """Every registered silo, plus allowed silos that never joined."""
    lock, _, last_seen = engine.snapshot()
    with lock:
        rows = {r.silo_id: r for r in engine.store.silos()}
    names = set(rows) | set(engine.allowed or ())
    out = []
    for silo_id in sorted(names):
        r = rows.get(silo_id)
        allowed = engine.allowed is None or silo_id in engine.allowed
        if r is None:
            out.append(SiloView(silo_id, allowed, False, 0, "", 0, 0))
        else:
            seen = max(r.last_seen_ms, last_seen.get(silo_id, 0))
            out.append(
                SiloView(
                    silo_id, allowed, True, r.num_samples, r.software_version, r.first_seen_ms, seen
                )
            )
    return out


def round_manifest(engine: Engine, run_id: str, round_: int) -> ManifestView:
    """What crossed the wire in a completed round, as the coordinator recorded it: the global
    state's manifest, the manifest of every accepted update of every attempt, and the payload
    spec's layout (with secure aggregation: what the masked vector flattens)."""
    store = engine.store
    rr = store.round_row(run_id, round_)
    if rr is None:
        store.run(run_id)  # NotFound for an unknown run
        raise NotFound(f"run {run_id} has no round {round_}")
    if rr.state != "complete" or rr.checkpoint_digest is None:
        raise FailedPrecondition(f"round {round_} of run {run_id} is not complete")
    tensors = engine.checkpoints.read(run_id, round_, rr.checkpoint_digest)
    views = [tensor_spec(name, t) for name, t in tensors.items()]
    updates = []
    for p in store.participants(run_id, round_):
        if p.reported_ms is None:
            continue
        kind, entries = tensors_from_json(p.update_manifest)
        updates.append(
            UpdateView(p.silo_id, p.attempt, p.manifest_digest or "", kind, tuple(entries))
        )
    cfg = from_json(RunConfig, store.run(run_id).config_json)
    algorithm = make_algorithm(cfg.algorithm, cfg.model.adapters)
    spec = algorithm.payload_spec({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    secure, summed, dropped = _secure_outcome(store.stages(run_id, round_, rr.attempt))
    return ManifestView(
        run_id,
        round_,
        tuple(views),
        rr.checkpoint_digest,
        tuple(updates),
        attempt=rr.attempt,
        secure_aggregation=secure,
        layout=payload_layout(spec),
        summed=summed,
        dropped=dropped,
    )
