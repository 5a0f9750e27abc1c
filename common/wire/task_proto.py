"""Every task value <-> pf2lora.v1 protobuf conversion: tasks, run specs, metric kinds, update
attempts, SecAgg messages.

The coordinator's silo servicer and the silo's client are the only callers (wire at the edges):
both ends convert with the same functions and the same constants. Every secure-aggregation
`*_from_proto` builds a validated library message (common/secagg/messages.py), so a malformed
field surfaces as InvalidArgument before any protocol state is touched.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    OwnedShare,
    SignedKeys,
    UnmaskProposal,
    UnmaskRequest,
    UnmaskResponse,
)
from pf2lora.common.wire.tasks import (
    ConsistencyCheckTask,
    EvaluateTask,
    IdleTask,
    MaskedInputTask,
    MetricsKind,
    RunInfo,
    SecureAggregation,
    ShareKeysTask,
    StageTask,
    StopTask,
    Task,
    TrainTask,
    UnmaskTask,
)
from pf2lora.v1 import silo_pb2
from pf2lora.v1 import tensors_pb2 as tpb

MAX_INSTANCE_ID = 256
# The update stream's header scalar that carries the task's attempt (PushUpdate).
ATTEMPT_SCALAR = "attempt"
# gRPC metadata key of the random id a silo process sends with every request: the coordinator
# keeps one live session per silo identity (coordinator/sessions.py).
SESSION_METADATA = "pf2lora-session"
METRICS_KIND_TO_PROTO: dict[MetricsKind, silo_pb2.MetricsKind] = {
    "train": silo_pb2.METRICS_KIND_TRAIN,
    "evaluate": silo_pb2.METRICS_KIND_EVALUATE,
}
_METRICS_KIND_FROM_PROTO: dict[int, MetricsKind] = {
    int(v): k for k, v in METRICS_KIND_TO_PROTO.items()
}


# ------------------------------------------------------------------------------- tasks
def run_info_to_proto(info: RunInfo) -> silo_pb2.RunSpec:
    return silo_pb2.RunSpec(
        run_id=info.run_id,
        algorithm_json=info.algorithm_json,
        model_json=info.model_json,
        seed=info.seed,
        rounds=info.rounds,
    )


def run_info_from_proto(msg: silo_pb2.RunSpec) -> RunInfo:
    return RunInfo(msg.run_id, msg.algorithm_json, msg.model_json, msg.seed, msg.rounds)


def task_to_proto(task: Task) -> silo_pb2.Task:
    if isinstance(task, IdleTask):
        return silo_pb2.Task(
            idle=silo_pb2.IdleTask(
                retry_after_ms=int(task.retry_after_s * 1000), reason=task.reason
            )
        )
    if isinstance(task, StopTask):
        return silo_pb2.Task(
            run_id=task.run_id, stop=silo_pb2.StopTask(state=task.state, reason=task.reason)
        )
    if isinstance(task, TrainTask):
        return silo_pb2.Task(
            run_id=task.run.run_id,
            round=task.round,
            train=silo_pb2.TrainTask(
                run=run_info_to_proto(task.run),
                attempt=task.attempt,
                client_index=task.client_index,
                weight=task.weight,
                deadline_unix_ms=task.deadline_unix_ms,
                global_manifest_digest=bytes.fromhex(task.global_digest),
                secure_aggregation=params_to_proto(task.secure),
            ),
        )
    if isinstance(task, EvaluateTask):
        return silo_pb2.Task(
            run_id=task.run.run_id,
            round=task.round,
            evaluate=silo_pb2.EvaluateTask(
                run=run_info_to_proto(task.run),
                client_index=task.client_index,
                global_manifest_digest=bytes.fromhex(task.global_digest),
                deadline_unix_ms=task.deadline_unix_ms,
            ),
        )
    return stage_task_to_proto(task)


def task_from_proto(msg: silo_pb2.Task) -> Task:
    body = msg.WhichOneof("body")
    if body == "train":
        t = msg.train
        return TrainTask(
            run=run_info_from_proto(t.run),
            round=msg.round,
            attempt=t.attempt,
            client_index=t.client_index,
            weight=t.weight,
            deadline_unix_ms=t.deadline_unix_ms,
            global_digest=t.global_manifest_digest.hex(),
            secure=params_from_proto(t.secure_aggregation),
        )
    if body == "evaluate":
        e = msg.evaluate
        return EvaluateTask(
            run=run_info_from_proto(e.run),
            round=msg.round,
            client_index=e.client_index,
            deadline_unix_ms=e.deadline_unix_ms,
            global_digest=e.global_manifest_digest.hex(),
        )
    if body == "stop":
        return StopTask(msg.run_id, msg.stop.state, msg.stop.reason)
    if body == "idle":
        return IdleTask(msg.idle.retry_after_ms / 1000, msg.idle.reason)
    stage = stage_task_from_proto(msg)
    if stage is not None:
        return stage
    # A secure-aggregation stage from a newer coordinator: this silo cannot serve it.
    return IdleTask(5.0, f"task {body!r} is not supported by this silo version")


def attempt_of(header: tpb.StreamHeader) -> int:
    """The task attempt an update stream's header carries; InvalidArgument if absent or bad."""
    value = header.scalars.get(ATTEMPT_SCALAR)
    if value is None or not math.isfinite(value) or value != int(value) or not 1 <= value < 2**31:
        raise InvalidArgument(
            f"update header needs the scalar {ATTEMPT_SCALAR!r} (the task's attempt), got {value!r}"
        )
    return int(value)


def metrics_kind_from_proto(value: int) -> MetricsKind:
    kind = _METRICS_KIND_FROM_PROTO.get(value)
    if kind is None:
        raise InvalidArgument(f"metrics kind {value}: use TRAIN or EVALUATE")
    return kind


# ---------------------------------------------------------------------------- messages
# The flat library messages and their protobuf twins have the same fields, by name.
_Plain = SignedKeys | EncryptedShare | UnmaskProposal | ConsistencySignature
_P = TypeVar(
    "_P",
    silo_pb2.SignedKeys,
    silo_pb2.EncryptedShare,
    silo_pb2.UnmaskProposal,
    silo_pb2.ConsistencySignature,
)
_M = TypeVar("_M", SignedKeys, EncryptedShare, UnmaskProposal, ConsistencySignature)


def _plain_to_proto(m: _Plain, proto_cls: type[_P]) -> _P:
    """A flat library message as its protobuf twin (tuples become repeated fields)."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(m):
        v = getattr(m, f.name)
        fields[f.name] = list(v) if isinstance(v, tuple) else v
    return proto_cls(**fields)


def _plain_from_proto(msg: Any, cls: type[_M]) -> _M:
    """The library message (validated by its constructor) from its protobuf twin."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        v = getattr(msg, f.name)
        kwargs[f.name] = v if isinstance(v, str | int | bytes) else tuple(v)
    return cls(**kwargs)


def keys_to_proto(m: SignedKeys) -> silo_pb2.SignedKeys:
    return _plain_to_proto(m, silo_pb2.SignedKeys)


def keys_from_proto(m: silo_pb2.SignedKeys) -> SignedKeys:
    return _plain_from_proto(m, SignedKeys)


def share_to_proto(m: EncryptedShare) -> silo_pb2.EncryptedShare:
    return _plain_to_proto(m, silo_pb2.EncryptedShare)


def share_from_proto(m: silo_pb2.EncryptedShare) -> EncryptedShare:
    return _plain_from_proto(m, EncryptedShare)


def proposal_to_proto(m: UnmaskProposal) -> silo_pb2.UnmaskProposal:
    return _plain_to_proto(m, silo_pb2.UnmaskProposal)


def proposal_from_proto(m: silo_pb2.UnmaskProposal) -> UnmaskProposal:
    return _plain_from_proto(m, UnmaskProposal)


def signature_to_proto(m: ConsistencySignature) -> silo_pb2.ConsistencySignature:
    return _plain_to_proto(m, silo_pb2.ConsistencySignature)


def signature_from_proto(m: silo_pb2.ConsistencySignature) -> ConsistencySignature:
    return _plain_from_proto(m, ConsistencySignature)


def response_to_proto(m: UnmaskResponse) -> silo_pb2.UnmaskResponse:
    return silo_pb2.UnmaskResponse(
        run_id=m.run_id,
        round=m.round,
        silo_id=m.silo_id,
        self_mask_shares=[
            silo_pb2.OwnedShare(owner=s.owner, share=s.share) for s in m.self_mask_shares
        ],
        mask_key_shares=[
            silo_pb2.OwnedShare(owner=s.owner, share=s.share) for s in m.mask_key_shares
        ],
    )


def response_from_proto(m: silo_pb2.UnmaskResponse) -> UnmaskResponse:
    return UnmaskResponse(
        run_id=m.run_id,
        round=m.round,
        silo_id=m.silo_id,
        self_mask_shares=tuple(OwnedShare(s.owner, bytes(s.share)) for s in m.self_mask_shares),
        mask_key_shares=tuple(OwnedShare(s.owner, bytes(s.share)) for s in m.mask_key_shares),
    )


# ------------------------------------------------------------------ round parameters
def params_to_proto(p: SecureAggregation | None) -> silo_pb2.SecureAggregationParams:
    if p is None:
        return silo_pb2.SecureAggregationParams(enabled=False)
    return silo_pb2.SecureAggregationParams(
        enabled=True,
        clip=p.clip,
        frac_bits=p.frac_bits,
        threshold=p.threshold,
        neighbours=p.neighbours or 0,
        roster=list(p.roster),
        instance_id=p.instance_id,
        vector_length=p.vector_length,
        layout_digest=p.layout_digest,
    )


def params_from_proto(m: silo_pb2.SecureAggregationParams) -> SecureAggregation | None:
    if not m.enabled:
        return None
    if not 0 < len(m.instance_id) <= MAX_INSTANCE_ID or m.vector_length < 1 or len(m.roster) < 2:
        raise InvalidArgument(
            f"secure-aggregation parameters incomplete: instance {m.instance_id[:64]!r}, "
            f"vector_length {m.vector_length}, {len(m.roster)} silos"
        )
    return SecureAggregation(
        instance_id=m.instance_id,
        roster=tuple(m.roster),
        clip=m.clip,
        frac_bits=m.frac_bits,
        threshold=m.threshold,
        neighbours=m.neighbours or None,
        vector_length=m.vector_length,
        layout_digest=m.layout_digest,
    )


# ------------------------------------------------------------------------ stage tasks
def stage_task_to_proto(task: StageTask) -> silo_pb2.Task:
    if isinstance(task, ShareKeysTask):
        body = {
            "share_keys": silo_pb2.ShareKeysTask(
                neighbour_keys=[keys_to_proto(k) for k in task.keys], attempt=task.attempt
            )
        }
    elif isinstance(task, MaskedInputTask):
        body = {
            "masked_input": silo_pb2.MaskedInputTask(
                shares=[share_to_proto(s) for s in task.shares], attempt=task.attempt
            )
        }
    elif isinstance(task, ConsistencyCheckTask):
        body = {
            "consistency_check": silo_pb2.ConsistencyCheckTask(
                proposal=proposal_to_proto(task.proposal), attempt=task.attempt
            )
        }
    else:
        r = task.request
        body = {
            "unmask": silo_pb2.UnmaskTask(
                survivors=list(r.survivors),
                dropped=list(r.dropped),
                signatures=[signature_to_proto(s) for s in r.signatures],
                attempt=task.attempt,
                instance_id=r.run_id,
            )
        }
    return silo_pb2.Task(run_id=task.run_id, round=task.round, **body)  # type: ignore[arg-type]


def stage_task_from_proto(msg: silo_pb2.Task) -> StageTask | None:
    """The stage task in `msg`, or None if its body is not a secure-aggregation stage."""
    body = msg.WhichOneof("body")
    if body == "share_keys":
        t = msg.share_keys
        return ShareKeysTask(
            msg.run_id, msg.round, t.attempt, tuple(keys_from_proto(k) for k in t.neighbour_keys)
        )
    if body == "masked_input":
        m = msg.masked_input
        return MaskedInputTask(
            msg.run_id, msg.round, m.attempt, tuple(share_from_proto(s) for s in m.shares)
        )
    if body == "consistency_check":
        c = msg.consistency_check
        return ConsistencyCheckTask(
            msg.run_id, msg.round, c.attempt, proposal_from_proto(c.proposal)
        )
    if body == "unmask":
        u = msg.unmask
        request = UnmaskRequest(
            run_id=u.instance_id,
            round=msg.round,
            survivors=tuple(u.survivors),
            dropped=tuple(u.dropped),
            signatures=tuple(signature_from_proto(s) for s in u.signatures),
        )
        return UnmaskTask(msg.run_id, msg.round, u.attempt, request)
    return None


def secagg_header_to_proto(
    silo_id: str, run_id: str, round_: int, attempt: int
) -> silo_pb2.SecAggHeader:
    return silo_pb2.SecAggHeader(silo_id=silo_id, run_id=run_id, round=round_, attempt=attempt)
