"""ControlApi servicer: operator calls (start/stop/status of runs, silos, manifests) onto the
engine.

Admin identity is checked for every method by the interceptor installed on the control
server (identity.admin_only_interceptor); this class only converts and delegates.
"""

from __future__ import annotations

import logging

import grpc
import torch

from pf2lora.common.runspec import RunConfig, from_json
from pf2lora.common.wire.manifest import dtype_to_proto, spec_to_proto
from pf2lora.coordinator import status
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.grpc_errors import map_errors
from pf2lora.coordinator.views import Phase, RunView
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb

logger = logging.getLogger(__name__)

_STATES = {
    "running": cpb.RUN_STATE_RUNNING,
    "completed": cpb.RUN_STATE_COMPLETED,
    "stopped": cpb.RUN_STATE_STOPPED,
    "failed": cpb.RUN_STATE_FAILED,
}
_PHASES = {
    Phase.ENROLLING: cpb.RUN_PHASE_ENROLLING,
    Phase.TRAINING: cpb.RUN_PHASE_TRAINING,
    Phase.EVALUATING: cpb.RUN_PHASE_EVALUATING,
    Phase.DONE: cpb.RUN_PHASE_DONE,
}


def run_view_to_proto(v: RunView) -> cpb.RunStatus:
    return cpb.RunStatus(
        run_id=v.run_id,
        state=_STATES.get(v.state, cpb.RUN_STATE_UNSPECIFIED),
        phase=_PHASES[v.phase],
        rounds=v.rounds,
        completed_rounds=v.completed_rounds,
        current_round=v.current_round,
        attempt=v.attempt,
        enrolled=list(v.enrolled),
        participants=[
            cpb.ParticipantStatus(silo_id=p.silo_id, weight=p.weight, state=p.state)
            for p in v.participants
        ],
        deadline_unix_ms=v.deadline_unix_ms,
        history=[
            cpb.RoundSummary(
                round=h.round,
                attempt=h.attempt,
                participants=list(h.participants),
                reported=list(h.reported),
                opened_unix_ms=h.opened_ms,
                completed_unix_ms=h.completed_ms or 0,
                checkpoint_digest=bytes.fromhex(h.checkpoint_digest or ""),
                mean_metrics=h.mean_metrics,
                stage_seconds=h.stage_seconds,
                dropped=list(h.dropped),
                secure_aggregation=h.secure_aggregation,
                epsilon=h.epsilon,
            )
            for h in v.history
        ],
        evaluation=[
            cpb.SiloMetrics(silo_id=e.silo_id, round=e.round, kind=e.kind, metrics=e.metrics)
            for e in v.evaluation
        ],
        config_json=v.config_json,
        created_unix_ms=v.created_ms,
        finished_unix_ms=v.finished_ms or 0,
        reason=v.reason,
        secagg_stage=v.secagg_stage,
        waiting_for=list(v.waiting_for),
        refused=[cpb.SiloRefusal(silo_id=s, reason=why, unix_ms=ms) for s, why, ms in v.refused],
    )


class ControlServicer(control_pb2_grpc.ControlApiServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @map_errors
    def StartRun(
        self, request: cpb.StartRunRequest, context: grpc.ServicerContext
    ) -> cpb.RunStatus:
        cfg = from_json(RunConfig, request.run_config_json, "run_config_json")
        run_id = self.engine.start_run(cfg, request.run_id)
        return run_view_to_proto(status.run_status(self.engine, run_id))

    @map_errors
    def GetRunStatus(
        self, request: cpb.GetRunStatusRequest, context: grpc.ServicerContext
    ) -> cpb.RunStatus:
        return run_view_to_proto(status.run_status(self.engine, request.run_id))

    @map_errors
    def StopRun(self, request: cpb.StopRunRequest, context: grpc.ServicerContext) -> cpb.RunStatus:
        run_id = request.run_id or self.engine.active_run_id()
        if not run_id:
            return run_view_to_proto(status.run_status(self.engine, ""))
        self.engine.stop_run(run_id, request.reason)
        return run_view_to_proto(status.run_status(self.engine, run_id))

    @map_errors
    def ListSilos(
        self, request: cpb.ListSilosRequest, context: grpc.ServicerContext
    ) -> cpb.ListSilosReply:
        return cpb.ListSilosReply(
            federation=self.engine.federation,
            silos=[
                cpb.SiloInfo(
                    silo_id=s.silo_id,
                    allowed=s.allowed,
                    joined=s.joined,
                    num_samples=s.num_samples,
                    software_version=s.software_version,
                    first_seen_unix_ms=s.first_seen_ms,
                    last_seen_unix_ms=s.last_seen_ms,
                )
                for s in status.list_silos(self.engine)
            ],
        )

    @map_errors
    def GetRoundManifest(
        self, request: cpb.GetRoundManifestRequest, context: grpc.ServicerContext
    ) -> cpb.RoundManifest:
        m = status.round_manifest(self.engine, request.run_id, request.round)
        layout = m.layout.entries if m.layout is not None else ()
        return cpb.RoundManifest(
            run_id=m.run_id,
            round=m.round,
            global_tensors=[spec_to_proto(t) for t in m.tensors],
            global_manifest_digest=bytes.fromhex(m.digest),
            updates=[
                cpb.UpdateReceipt(
                    silo_id=u.silo_id,
                    attempt=u.attempt,
                    manifest_digest=bytes.fromhex(u.digest),
                    kind=u.kind,
                    tensors=[_entry_to_proto(t) for t in u.tensors],
                )
                for u in m.updates
            ],
            secure_aggregation=m.secure_aggregation,
            payload_layout=[
                cpb.LayoutEntry(
                    name=e.name, shape=list(e.shape), offset=e.offset, dtype=tpb.DTYPE_FLOAT32
                )
                for e in layout
            ],
            layout_digest=m.layout.digest() if m.layout is not None else "",
            attempt=m.attempt,
            summed=list(m.summed),
            dropped=list(m.dropped),
        )


def _entry_to_proto(entry: dict) -> tpb.TensorSpec:
    """A stored manifest entry (wire_manifest.tensor_info_to_dict) as a TensorSpec."""
    dtype = getattr(torch, str(entry["dtype"]))
    return tpb.TensorSpec(
        name=entry["name"],
        dtype=dtype_to_proto(dtype),
        shape=list(entry["shape"]),
        nbytes=int(entry["nbytes"]),
        sha256=bytes.fromhex(entry["sha256"]),
    )
