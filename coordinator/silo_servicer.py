"""SiloApi servicer: checks the caller's identity, converts protobuf <-> plain values, calls the engine.

Thin on purpose: every decision is the engine's, every tensor conversion is serde's, every
error becomes a status code in grpc_errors.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator

import grpc

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.transport.identity import require_silo
from pf2lora.common.wire import streams as serde
from pf2lora.common.wire import task_proto as serde_secagg
from pf2lora.common.wire.manifest_json import MASKED_TENSOR
from pf2lora.common.wire.tasks import EvaluateTask, IdleTask, RunInfo, StopTask, Task, TrainTask
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.grpc_errors import map_errors
from pf2lora.coordinator.secure_round import SecureRound
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb

logger = logging.getLogger(__name__)

ATTEMPT_SCALAR = "attempt"
_KINDS = {silo_pb2.METRICS_KIND_TRAIN: "train", silo_pb2.METRICS_KIND_EVALUATE: "evaluate"}


def run_info_to_proto(info: RunInfo) -> silo_pb2.RunSpec:
    return silo_pb2.RunSpec(
        run_id=info.run_id, algorithm_json=info.algorithm_json, model_json=info.model_json,
        seed=info.seed, rounds=info.rounds,
    )


def task_to_proto(task: Task) -> silo_pb2.Task:
    if isinstance(task, IdleTask):
        return silo_pb2.Task(
            idle=silo_pb2.IdleTask(retry_after_ms=int(task.retry_after_s * 1000), reason=task.reason)
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
                run=run_info_to_proto(task.run), attempt=task.attempt,
                client_index=task.client_index, weight=task.weight,
                deadline_unix_ms=task.deadline_unix_ms,
                global_manifest_digest=bytes.fromhex(task.global_digest),
                secure_aggregation=serde_secagg.params_to_proto(task.secure),
            ),
        )
    if not isinstance(task, EvaluateTask):
        return serde_secagg.stage_task_to_proto(task)
    return silo_pb2.Task(
        run_id=task.run.run_id,
        round=task.round,
        evaluate=silo_pb2.EvaluateTask(
            run=run_info_to_proto(task.run), client_index=task.client_index,
            global_manifest_digest=bytes.fromhex(task.global_digest),
            deadline_unix_ms=task.deadline_unix_ms,
        ),
    )


def attempt_of(header: tpb.StreamHeader) -> int:
    value = header.scalars.get(ATTEMPT_SCALAR)
    if value is None or not math.isfinite(value) or value != int(value) or not 1 <= value < 2**31:
        raise InvalidArgument(
            f"update header needs the scalar {ATTEMPT_SCALAR!r} (the task's attempt), got {value!r}"
        )
    return int(value)


class SiloServicer(silo_pb2_grpc.SiloApiServicer):
    def __init__(
        self,
        engine: Engine,
        *,
        insecure: bool,
        long_poll_s: float,
        version: str,
    ) -> None:
        self.engine = engine
        self.insecure = insecure
        self.long_poll_s = long_poll_s
        self.version = version

    def _silo(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The caller's silo id: its certificate's (or, with --insecure, its claim)."""
        ident = require_silo(
            context, self.engine.federation, claimed, self.engine.allowed, insecure=self.insecure
        )
        return ident.name

    @map_errors
    def Join(self, request: silo_pb2.JoinRequest, context: grpc.ServicerContext) -> silo_pb2.JoinReply:
        silo = self._silo(context, request.silo_id)
        active = self.engine.join(silo, request.num_samples, request.software_version)
        return silo_pb2.JoinReply(
            federation=self.engine.federation, coordinator_version=self.version,
            active_run_id=active, long_poll_ms=int(self.long_poll_s * 1000),
        )

    @map_errors
    def GetTask(self, request: silo_pb2.GetTaskRequest, context: grpc.ServicerContext) -> silo_pb2.Task:
        silo = self._silo(context, request.silo_id)
        wait = min(request.wait_ms / 1000 if request.wait_ms else self.long_poll_s, self.long_poll_s)
        return task_to_proto(self.engine.wait_task(silo, request.current_run_id, wait))

    @map_errors
    def FetchGlobal(
        self, request: silo_pb2.FetchGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[tpb.StreamMessage]:
        silo = self._silo(context, request.silo_id)
        tensors, _ = self.engine.global_state(silo, request.run_id, request.round)
        yield from self.engine.metrics.count_sent(serde.tensors_to_stream(
            tensors, run_id=request.run_id, round=request.round, kind=serde.StreamKind.GLOBAL_MODEL
        ))

    @map_errors
    def PushUpdate(
        self, request_iterator: Iterator[tpb.StreamMessage], context: grpc.ServicerContext
    ) -> silo_pb2.PushUpdateReply:
        messages = self.engine.metrics.count_received(request_iterator)  # bytes, for /metrics
        first = next(messages, None)
        if first is None or first.WhichOneof("body") != "header":
            raise InvalidArgument("an update stream must start with its header")
        header = first.header
        silo = self._silo(context, header.silo_id)
        attempt = attempt_of(header)
        if header.kind == tpb.STREAM_KIND_MASKED_UPDATE:
            return self._push_masked(silo, attempt, itertools.chain([first], messages))
        # Checked before any tensor byte is buffered: run, round, attempt, participant, duplicate.
        expected = self.engine.expected_update(silo, header.run_id, header.round, attempt)
        info, tensors = serde.stream_to_tensors(
            itertools.chain([first], messages), expected, kinds=(serde.StreamKind.UPDATE,)
        )
        receipt = self.engine.accept_update(
            silo, info.run_id, info.round, attempt, tensors, info.manifest_digest, info.tensors
        )
        return silo_pb2.PushUpdateReply(
            run_id=receipt.run_id, round=receipt.round, manifest_digest=receipt.manifest_digest,
            received=receipt.received, participants=receipt.participants,
        )

    def _push_masked(
        self, silo: str, attempt: int, messages: Iterator[tpb.StreamMessage]
    ) -> silo_pb2.PushUpdateReply:
        """A secure round's masked input: one uint32 vector, added to the attempt's sum."""
        first = next(messages)
        header = first.header
        # Checked before any byte is buffered: run, round, attempt, stage, participant, duplicate.
        expected = self.engine.secure_step(
            silo, header.run_id, header.round, attempt, lambda r: r.masked_spec(silo)
        )
        info, tensors = serde.stream_to_tensors(
            itertools.chain([first], messages), expected, kinds=(serde.StreamKind.MASKED_UPDATE,)
        )
        received, waiting_for = self.engine.accept_masked(
            silo, info.run_id, info.round, attempt, tensors[MASKED_TENSOR].numpy(),
            info.manifest_digest, info.tensors,
        )
        return silo_pb2.PushUpdateReply(
            run_id=info.run_id, round=info.round, manifest_digest=info.manifest_digest,
            received=received, participants=waiting_for,
        )

    def _stage(self, silo: str, header: silo_pb2.SecAggHeader,
               step: Callable[[SecureRound], tuple[int, int]]) -> silo_pb2.SecAggAck:
        """One stage message of the authenticated silo, for the attempt its header names."""
        received, expected = self.engine.secure_step(silo, header.run_id, header.round, header.attempt, step)
        return silo_pb2.SecAggAck(received=received, expected=expected)

    @map_errors
    def AdvertiseKeys(
        self, request: silo_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)  # identity first, then the message
        keys = serde_secagg.keys_from_proto(request.keys)
        return self._stage(silo, request.header, lambda r: r.receive_keys(silo, keys))

    @map_errors
    def ShareKeys(
        self, request: silo_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        shares = [serde_secagg.share_from_proto(s) for s in request.shares]
        return self._stage(silo, request.header, lambda r: r.receive_shares(silo, shares))

    @map_errors
    def ConsistencyCheck(
        self, request: silo_pb2.ConsistencyCheckRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        signature = serde_secagg.signature_from_proto(request.signature)
        return self._stage(silo, request.header, lambda r: r.receive_consistency(silo, signature))

    @map_errors
    def Unmask(self, request: silo_pb2.UnmaskRequest, context: grpc.ServicerContext) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        response = serde_secagg.response_from_proto(request.response)
        return self._stage(silo, request.header, lambda r: r.receive_unmask(silo, response))

    @map_errors
    def ReportMetrics(
        self, request: silo_pb2.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> silo_pb2.ReportMetricsReply:
        silo = self._silo(context, request.silo_id)
        kind = _KINDS.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"metrics kind {request.kind}: use TRAIN or EVALUATE")
        self.engine.report_metrics(silo, request.run_id, request.round, kind, dict(request.metrics))
        return silo_pb2.ReportMetricsReply()
