"""The silo's side of the wire: one channel to the coordinator, deadlines on every call, retries on
UNAVAILABLE.

Only UNAVAILABLE (coordinator down, restarting, unreachable) is retried here, with exponential
backoff and full jitter; every other status is raised to the daemon, which decides (never
retry PERMISSION_DENIED or INVALID_ARGUMENT). Protobuf stays in this module: callers get
plain tasks (common.tasks) and tensors (through serde).
"""

from __future__ import annotations

import collections
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from torch import Tensor

from pf2lora.common.errors import ConfigError, DataError, Pf2LoraError
from pf2lora.common.secagg.messages import (
    ConsistencySignature,
    EncryptedShare,
    SignedKeys,
    UnmaskResponse,
)
from pf2lora.common.transport import grpc_factory, tls_check
from pf2lora.common.wire import streams, task_proto
from pf2lora.common.wire.tasks import MetricsKind, Task
from pf2lora.silo.audit import AuditInterceptor, AuditLog
from pf2lora.silo.config import SiloConfig
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb

logger = logging.getLogger(__name__)

T = TypeVar("T")

TLS_CHECK_EVERY_S = 60.0  # while the coordinator stays UNAVAILABLE, look for a TLS cause this often


class Stopped(Pf2LoraError):
    """The daemon was asked to stop while waiting to retry."""


@dataclass(frozen=True)
class JoinInfo:
    federation: str
    active_run_id: str
    long_poll_s: float


@dataclass(frozen=True)
class PushReceipt:
    manifest_digest: bytes
    received: int
    participants: int
    sent: streams.StreamInfo | None = None  # the header of the accepted stream: what was sent


class SessionInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds this process's session id to the metadata of every call."""

    def __init__(self, session_id: str) -> None:
        self.metadata = (task_proto.SESSION_METADATA, session_id)

    def _details(self, details: Any) -> Any:
        metadata = [*(details.metadata or ()), self.metadata]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Callable, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class Backoff:
    """Retry a call on UNAVAILABLE: delays drawn uniformly from [0, min(max, initial * 2^n)]."""

    def __init__(
        self,
        initial_s: float,
        max_s: float,
        stop: threading.Event,
        before_retry: Callable[[], object] | None = None,
    ) -> None:
        self.initial_s, self.max_s, self.stop = initial_s, max_s, stop
        self.before_retry = before_retry  # e.g. pick up a rotated certificate

    def call(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            try:
                return fn()
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:  # type: ignore[attr-defined]
                    raise
                delay = random.uniform(0.05, min(self.max_s, self.initial_s * 2**attempt))
                attempt += 1
                logger.warning(
                    "%s: coordinator unavailable (%s); retry %d in %.1f s",
                    what,
                    exc.details(),
                    attempt,
                    delay,  # type: ignore[attr-defined]
                )
                if self.stop.wait(delay):
                    raise Stopped(f"stopped while retrying {what}") from None
                if self.before_retry is not None:
                    self.before_retry()


class CoordinatorClient:
    def __init__(
        self,
        cfg: SiloConfig,
        stop: threading.Event,
        *,
        interceptors: tuple[grpc_factory.ClientInterceptor, ...] = (),
    ) -> None:
        self.cfg = cfg
        self.silo_id = cfg.silo.id
        c = cfg.coordinator
        self.audit = AuditLog(cfg.silo.audit_log) if cfg.silo.audit_log else None
        # One random session id for this process's lifetime, on every request (all channels):
        # the coordinator keeps one live session per silo identity (coordinator/sessions.py).
        self.session_id = secrets.token_hex(16)
        self._chain = (
            SessionInterceptor(self.session_id),
            *interceptors,
            *((AuditInterceptor(self.audit),) if self.audit else ()),
        )
        self._tls = None if c.insecure else cfg.tls.files().read()
        self.channel, self.stub = self._connect(self._tls)
        # A failed TLS handshake is UNAVAILABLE too: before a retry, say why when the cause is
        # TLS (gRPC's detail is often just "Socket closed") and look for rotated files.
        self._tls_checked_at: float | None = None
        self._tls_said = ""
        self.retry = Backoff(c.retry_initial_s, c.retry_max_s, stop, self._before_retry)

    def _connect(
        self, material: tuple[bytes, bytes, bytes] | None
    ) -> tuple[grpc.Channel, silo_pb2_grpc.SiloApiStub]:
        """A channel presenting `material` (ca, cert, key); ConfigError if they do not fit."""
        creds = None if material is None else grpc_factory.channel_credentials(*material)
        c = self.cfg.coordinator
        channel = grpc_factory.create_channel(
            c.address,
            creds,
            server_name_override=c.server_name,
            interceptors=self._chain,
            reconnect_backoff_s=(c.retry_initial_s, c.retry_max_s),
        )
        return channel, silo_pb2_grpc.SiloApiStub(channel)

    def _before_retry(self) -> None:
        self.explain_unavailable()
        self.reload_tls_if_changed()

    def explain_unavailable(self) -> tls_check.Diagnosis | None:
        """After an UNAVAILABLE: repeat the handshake outside gRPC and log the cause when it is
        TLS or nothing listens (once per cause, checked at most every TLS_CHECK_EVERY_S)."""
        c = self.cfg.coordinator
        now = time.monotonic()
        if c.insecure or (
            self._tls_checked_at is not None and now - self._tls_checked_at < TLS_CHECK_EVERY_S
        ):
            return None
        self._tls_checked_at = now
        found = tls_check.diagnose(c.address, self.cfg.tls.files(), c.server_name)
        if not found.ok and found.cause != self._tls_said:
            logger.error("cannot connect to the coordinator: %s", found.message)
        self._tls_said = "" if found.ok else found.cause
        return found

    def reload_tls_if_changed(self) -> bool:
        """Re-read the [tls] files; when they changed and fit together, later calls use a new
        channel that presents the new certificate (rotation without a restart). Files that are
        unreadable or do not match (a rotation half written) keep the current channel."""
        if self.cfg.coordinator.insecure:
            return False
        try:
            material = self.cfg.tls.files().read()
        except ConfigError as exc:
            logger.warning("TLS files: %s; keeping the current certificate", exc)
            return False
        if material == self._tls:
            return False
        try:
            channel, stub = self._connect(material)
        except ConfigError as exc:
            logger.warning("new TLS files not used: %s; keeping the current certificate", exc)
            return False
        old, self.channel, self.stub, self._tls = self.channel, channel, stub, material
        old.close()
        logger.info(
            "TLS files changed: new calls to the coordinator present %s",
            grpc_factory.describe_certificate(material[1]),
        )
        return True

    def close(self) -> None:
        self.channel.close()
        if self.audit is not None:
            self.audit.close()

    # ------------------------------------------------------------------- calls
    def join(self, num_samples: int, version: str) -> JoinInfo:
        req = silo_pb2.JoinRequest(
            silo_id=self.silo_id, num_samples=num_samples, software_version=version
        )
        timeout = self.cfg.coordinator.call_timeout_s
        reply = self.retry.call("Join", lambda: self.stub.Join(req, timeout=timeout))
        return JoinInfo(reply.federation, reply.active_run_id, reply.long_poll_ms / 1000)

    def get_task(self, current_run_id: str) -> Task:
        c = self.cfg.coordinator
        req = silo_pb2.GetTaskRequest(
            silo_id=self.silo_id, current_run_id=current_run_id, wait_ms=int(c.long_poll_s * 1000)
        )
        timeout = c.long_poll_s + c.call_timeout_s
        return task_proto.task_from_proto(
            self.retry.call("GetTask", lambda: self.stub.GetTask(req, timeout=timeout))
        )

    def fetch_global(self, run_id: str, round_: int, expected_digest: str) -> dict[str, Tensor]:
        """The global state after round_, checked against the digest the task announced."""
        req = silo_pb2.FetchGlobalRequest(silo_id=self.silo_id, run_id=run_id, round=round_)
        timeout = self.cfg.coordinator.transfer_timeout_s

        def fetch() -> tuple[streams.StreamInfo, dict[str, Tensor]]:
            return streams.stream_to_tensors(
                self.stub.FetchGlobal(req, timeout=timeout),
                kinds=(streams.StreamKind.GLOBAL_MODEL,),
            )

        info, tensors = self.retry.call("FetchGlobal", fetch)
        if (info.run_id, info.round) != (run_id, round_):
            raise DataError(f"FetchGlobal answered run {info.run_id} round {info.round}")
        if info.manifest_digest.hex() != expected_digest:
            raise DataError(
                f"global state of round {round_} has digest {info.manifest_digest.hex()[:16]}, "
                f"the task announced {expected_digest[:16]}"
            )
        return tensors

    def push_update(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        payload: Mapping[str, Tensor],
        kind: streams.StreamKind = streams.StreamKind.UPDATE,
    ) -> PushReceipt:
        """Stream a payload (UPDATE) or a masked vector (MASKED_UPDATE, one uint32 tensor)."""
        timeout = self.cfg.coordinator.transfer_timeout_s
        headers: list[tpb.StreamMessage] = []

        def messages() -> Iterator[tpb.StreamMessage]:
            stream = streams.tensors_to_stream(
                payload,
                run_id=run_id,
                round=round_,
                kind=kind,
                silo_id=self.silo_id,
                scalars={task_proto.ATTEMPT_SCALAR: attempt},
            )
            headers.append(header := next(stream))
            yield header
            yield from stream

        reply = self.retry.call(
            "PushUpdate", lambda: self.stub.PushUpdate(messages(), timeout=timeout)
        )
        sent = streams.header_from_proto(headers[-1].header) if headers else None
        return PushReceipt(reply.manifest_digest, reply.received, reply.participants, sent)

    # ------------------------------------------------------ secure aggregation
    def _stage_call(self, method: str, request: object) -> tuple[int, int]:
        timeout = self.cfg.coordinator.call_timeout_s
        # The stub is looked up on every try: a retry may run on a channel with a rotated
        # certificate.
        reply = self.retry.call(
            method, lambda: getattr(self.stub, method)(request, timeout=timeout)
        )
        return reply.received, reply.expected

    def _header(self, run_id: str, round_: int, attempt: int) -> silo_pb2.SecAggHeader:
        return task_proto.secagg_header_to_proto(self.silo_id, run_id, round_, attempt)

    def advertise_keys(self, run_id: str, round_: int, attempt: int, keys: SignedKeys) -> int:
        req = silo_pb2.AdvertiseKeysRequest(
            header=self._header(run_id, round_, attempt), keys=task_proto.keys_to_proto(keys)
        )
        self._stage_call("AdvertiseKeys", req)
        return req.ByteSize()

    def share_keys(
        self, run_id: str, round_: int, attempt: int, shares: list[EncryptedShare]
    ) -> int:
        req = silo_pb2.ShareKeysRequest(
            header=self._header(run_id, round_, attempt),
            shares=[task_proto.share_to_proto(s) for s in shares],
        )
        self._stage_call("ShareKeys", req)
        return req.ByteSize()

    def consistency_check(
        self, run_id: str, round_: int, attempt: int, signature: ConsistencySignature
    ) -> int:
        req = silo_pb2.ConsistencyCheckRequest(
            header=self._header(run_id, round_, attempt),
            signature=task_proto.signature_to_proto(signature),
        )
        self._stage_call("ConsistencyCheck", req)
        return req.ByteSize()

    def unmask(self, run_id: str, round_: int, attempt: int, response: UnmaskResponse) -> int:
        req = silo_pb2.UnmaskRequest(
            header=self._header(run_id, round_, attempt),
            response=task_proto.response_to_proto(response),
        )
        self._stage_call("Unmask", req)
        return req.ByteSize()

    def refuse_run(self, run_id: str, reason: str) -> None:
        """Tell the coordinator this silo cannot take part in the run, and why."""
        req = silo_pb2.RefuseRunRequest(silo_id=self.silo_id, run_id=run_id, reason=reason[:1000])
        timeout = self.cfg.coordinator.call_timeout_s
        self.retry.call("RefuseRun", lambda: self.stub.RefuseRun(req, timeout=timeout))

    def report_metrics(
        self, run_id: str, round_: int, kind: MetricsKind, metrics: Mapping[str, float]
    ) -> None:
        req = silo_pb2.ReportMetricsRequest(
            silo_id=self.silo_id,
            run_id=run_id,
            round=round_,
            kind=task_proto.METRICS_KIND_TO_PROTO[kind],
            metrics={k: float(v) for k, v in metrics.items()},
        )
        timeout = self.cfg.coordinator.call_timeout_s
        self.retry.call("ReportMetrics", lambda: self.stub.ReportMetrics(req, timeout=timeout))
