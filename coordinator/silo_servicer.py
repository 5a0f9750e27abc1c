"""SiloApi servicer: checks the caller's identity, converts protobuf <-> plain values, calls the
engine.

Thin on purpose: every decision is the engine's, every tensor conversion is serde's, every
error becomes a status code in grpc_errors.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager

import grpc

from pf2lora.common.errors import InvalidArgument, bounded
from pf2lora.common.transport.identity import require_silo
from pf2lora.common.wire import streams, task_proto
from pf2lora.common.wire.manifest import MASKED_TENSOR
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.grpc_errors import map_errors
from pf2lora.coordinator.secure_round import SecureRound
from pf2lora.coordinator.sessions import Sessions
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb

logger = logging.getLogger(__name__)

MAX_METRICS = 256
MAX_METRIC_NAME = 128
MAX_REASON_CHARS = 1000  # a RefuseRun reason (one line for the operator)


def session_of(context: grpc.ServicerContext) -> str:
    """The session id the silo process sent (empty from a client that sends none)."""
    for key, value in context.invocation_metadata() or ():
        if key == task_proto.SESSION_METADATA:
            return bounded(str(value), 64)
    return ""


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
        self.sessions = Sessions()

    def _silo(self, context: grpc.ServicerContext, claimed: str) -> str:
        """The caller's silo id: its certificate's (or, with --insecure, its claim)."""
        ident = require_silo(
            context, self.engine.federation, claimed, self.engine.allowed, insecure=self.insecure
        )
        return ident.name

    def _session(self, context: grpc.ServicerContext, silo: str) -> AbstractContextManager[None]:
        """The request counts as its silo's only if it comes from the silo's bound session."""
        return self.sessions.call(silo, session_of(context))

    @map_errors
    def Join(
        self, request: silo_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> silo_pb2.JoinReply:
        silo = self._silo(context, request.silo_id)
        restarted = self.sessions.join(silo, session_of(context), context.peer())
        active = self.engine.join(silo, request.num_samples, request.software_version)
        if restarted:
            self.engine.silo_restarted(silo)
        return silo_pb2.JoinReply(
            federation=self.engine.federation,
            coordinator_version=self.version,
            active_run_id=active,
            long_poll_ms=int(self.long_poll_s * 1000),
        )

    @map_errors
    def GetTask(
        self, request: silo_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> silo_pb2.Task:
        silo = self._silo(context, request.silo_id)
        wait = min(
            request.wait_ms / 1000 if request.wait_ms else self.long_poll_s, self.long_poll_s
        )
        with self._session(context, silo):  # in flight while it waits: the session is alive
            task = self.engine.wait_task(silo, request.current_run_id, wait, context.is_active)
        return task_proto.task_to_proto(task)

    @map_errors
    def FetchGlobal(
        self, request: silo_pb2.FetchGlobalRequest, context: grpc.ServicerContext
    ) -> Iterator[tpb.StreamMessage]:
        silo = self._silo(context, request.silo_id)
        with self._session(context, silo):
            tensors, _ = self.engine.global_state(silo, request.run_id, request.round)
            yield from self.engine.metrics.count_sent(
                streams.tensors_to_stream(
                    tensors,
                    run_id=request.run_id,
                    round=request.round,
                    kind=streams.StreamKind.GLOBAL_MODEL,
                )
            )

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
        with self._session(context, silo):
            return self._push(silo, first, messages)

    def _push(
        self, silo: str, first: tpb.StreamMessage, messages: Iterator[tpb.StreamMessage]
    ) -> silo_pb2.PushUpdateReply:
        header = first.header
        attempt = task_proto.attempt_of(header)
        if header.kind == tpb.STREAM_KIND_MASKED_UPDATE:
            return self._push_masked(silo, attempt, itertools.chain([first], messages))
        # Checked before any tensor byte is buffered: run, round, attempt, participant, duplicate.
        expected = self.engine.expected_update(silo, header.run_id, header.round, attempt)
        info, tensors = streams.stream_to_tensors(
            itertools.chain([first], messages), expected, kinds=(streams.StreamKind.UPDATE,)
        )
        receipt = self.engine.accept_update(
            silo, info.run_id, info.round, attempt, tensors, info.manifest_digest, info.tensors
        )
        return silo_pb2.PushUpdateReply(
            run_id=receipt.run_id,
            round=receipt.round,
            manifest_digest=receipt.manifest_digest,
            received=receipt.received,
            participants=receipt.participants,
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
        info, tensors = streams.stream_to_tensors(
            itertools.chain([first], messages), expected, kinds=(streams.StreamKind.MASKED_UPDATE,)
        )
        received, waiting_for = self.engine.accept_masked(
            silo,
            info.run_id,
            info.round,
            attempt,
            tensors[MASKED_TENSOR].numpy(),
            info.manifest_digest,
            info.tensors,
        )
        return silo_pb2.PushUpdateReply(
            run_id=info.run_id,
            round=info.round,
            manifest_digest=info.manifest_digest,
            received=received,
            participants=waiting_for,
        )

    def _stage(
        self,
        context: grpc.ServicerContext,
        silo: str,
        header: silo_pb2.SecAggHeader,
        step: Callable[[SecureRound], tuple[int, int]],
    ) -> silo_pb2.SecAggAck:
        """One stage message of the authenticated silo, for the attempt its header names."""
        with self._session(context, silo):
            received, expected = self.engine.secure_step(
                silo, header.run_id, header.round, header.attempt, step
            )
        return silo_pb2.SecAggAck(received=received, expected=expected)

    @map_errors
    def AdvertiseKeys(
        self, request: silo_pb2.AdvertiseKeysRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)  # identity first, then the message
        keys = task_proto.keys_from_proto(request.keys)
        return self._stage(context, silo, request.header, lambda r: r.receive_keys(silo, keys))

    @map_errors
    def ShareKeys(
        self, request: silo_pb2.ShareKeysRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        shares = [task_proto.share_from_proto(s) for s in request.shares]
        return self._stage(context, silo, request.header, lambda r: r.receive_shares(silo, shares))

    @map_errors
    def ConsistencyCheck(
        self, request: silo_pb2.ConsistencyCheckRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        signature = task_proto.signature_from_proto(request.signature)
        return self._stage(
            context, silo, request.header, lambda r: r.receive_consistency(silo, signature)
        )

    @map_errors
    def Unmask(
        self, request: silo_pb2.UnmaskRequest, context: grpc.ServicerContext
    ) -> silo_pb2.SecAggAck:
        silo = self._silo(context, request.header.silo_id)
        response = task_proto.response_from_proto(request.response)
        return self._stage(
            context, silo, request.header, lambda r: r.receive_unmask(silo, response)
        )

    @map_errors
    def ReportMetrics(
        self, request: silo_pb2.ReportMetricsRequest, context: grpc.ServicerContext
    ) -> silo_pb2.ReportMetricsReply:
        silo = self._silo(context, request.silo_id)
        kind = task_proto.metrics_kind_from_proto(request.kind)
        values = check_metrics(request.metrics)
        with self._session(context, silo):
            self.engine.report_metrics(silo, request.run_id, request.round, kind, values)
        return silo_pb2.ReportMetricsReply()

    @map_errors
    def RefuseRun(
        self, request: silo_pb2.RefuseRunRequest, context: grpc.ServicerContext
    ) -> silo_pb2.RefuseRunReply:
        silo = self._silo(context, request.silo_id)
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"reason longer than {MAX_REASON_CHARS} characters")
        with self._session(context, silo):
            self.engine.refuse_run(silo, request.run_id, request.reason)
        return silo_pb2.RefuseRunReply()
