"""The silo's side of a secure round: after local training, SecAgg+ stage by stage, then nothing in
the clear.

    flatten(payload) -> AdvertiseKeys -> [share_keys task] -> ShareKeys -> [masked_input task]
        -> PushUpdate(MASKED_UPDATE) -> [consistency_check task] -> ConsistencyCheck
        -> [unmask task] -> Unmask

One `SecAggSilo` per (run, round, attempt), bound to the attempt's protocol instance
("RUN/aN"); keys are signed with this silo's TLS key and every peer key and signature is checked
against the federation CA (`PeerVerifier`). Two durable records make a restart safe:
- before the keys of an attempt are sent, `secagg/rNNNNN-aA.keys` is written (fsync): a silo
  that restarts never creates a second SecAggSilo for that attempt, it sits the attempt out;
- before unmask shares are sent, `secagg/rNNNNN.unmask.json` records the survivor set: in a
  later attempt of the same round (the update is retrained bit for bit from the same state),
  the silo signs only the same survivor set, so the coordinator cannot difference two sums of
  the same updates over different survivor sets.
Any refusal (a bad key or signature, a share floor not met, an inconsistent proposal) makes the
silo sit the attempt out: it logs why and sends nothing further; the coordinator's stage
deadlines move the round on.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from torch import Tensor

from pf2lora.common.algorithms.aggregate import is_weight_key
from pf2lora.common.errors import (
    ConfigError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Pf2LoraError,
)
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.keys import PeerVerifier
from pf2lora.common.secagg.layout import flatten
from pf2lora.common.secagg.silo import SecAggSilo
from pf2lora.common.wire import streams
from pf2lora.common.wire.manifest import MASKED_TENSOR
from pf2lora.common.wire.tasks import (
    ConsistencyCheckTask,
    IdleTask,
    MaskedInputTask,
    SecureAggregation,
    ShareKeysTask,
    Task,
    TrainTask,
    UnmaskTask,
)
from pf2lora.silo.client import CoordinatorClient, PushReceipt, Stopped
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.state import SiloState
from pf2lora.silo.wire_record import WireRecord

logger = logging.getLogger(__name__)

S = TypeVar("S", ShareKeysTask, MaskedInputTask, ConsistencyCheckTask, UnmaskTask)
# Fault injection for the dropout tests only: "stop-before:STAGE" makes this process SIGSTOP
# itself when that stage's task arrives (the test then kills it with SIGKILL). Never set it.
FAILPOINT_ENV = "PF2LORA_TEST_FAILPOINT"


def _failpoint(stage: str) -> None:
    if os.environ.get(FAILPOINT_ENV) == f"stop-before:{stage}":
        logger.warning(
            "%s: stopping this process before %s (test fault injection)", FAILPOINT_ENV, stage
        )
        os.kill(os.getpid(), signal.SIGSTOP)


class SitOut(Pf2LoraError):
    """This silo does not (or no longer) take part in the round attempt; the message says why."""


class Superseded(Pf2LoraError):  # noqa: N818 - a control-flow signal, not a failure
    """The coordinator moved on (new attempt, round, run): `task` is what to do next."""

    def __init__(self, task: Task) -> None:
        super().__init__(f"the coordinator handed out {type(task).__name__}")
        self.task = task


@dataclass
class SecureOutcome:
    receipt: PushReceipt
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    clipped_fraction: float
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, this silo's view


@dataclass(frozen=True)
class SigningMaterial:
    key: ec.EllipticCurvePrivateKey
    certificate_der: bytes
    verifier: PeerVerifier


def load_signing_material(cfg: SiloConfig) -> SigningMaterial:
    """The TLS key and certificate this silo signs its round keys with, and the CA to check peers.

    Read for every round, so a rotated certificate is picked up. ConfigError if [tls] is not
    set, the key is not P-256, or the certificate does not name this silo."""
    if not cfg.tls.configured:
        raise ConfigError(
            "secure aggregation signs each round's keys with this silo's TLS key: set [tls] "
            "ca_file, cert_file, key_file (also with --insecure transport)"
        )
    ca_pem, cert_pem, key_pem = cfg.tls.files().read()
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{cfg.tls.key_file}: secure aggregation needs an ECDSA P-256 key")
    cert_der = x509.load_pem_x509_certificates(cert_pem)[0].public_bytes(serialization.Encoding.DER)
    verifier = PeerVerifier(x509.load_pem_x509_certificates(ca_pem), cfg.silo.federation)
    try:  # the same check every peer will make
        verifier.verify_certificate(cert_der, cfg.silo.id)
    except PermissionDenied as exc:
        raise ConfigError(f"{cfg.tls.cert_file}: peers would refuse it: {exc}") from None
    return SigningMaterial(key, cert_der, verifier)


class SecureRoundDriver:
    """The stages of one secure round attempt for this silo (blocking, on the daemon thread)."""

    def __init__(
        self,
        cfg: SiloConfig,
        client: CoordinatorClient,
        state: SiloState,
        record: WireRecord,
        stop: threading.Event,
    ) -> None:
        self.cfg, self.client, self.state, self.record, self.stop = cfg, client, state, record, stop

    def _wait(self, kind: type[S], task: TrainTask) -> S:
        """Long-poll GetTask until this attempt's next stage task; Superseded on anything else."""
        while not self.stop.is_set():
            t = self.client.get_task(task.run.run_id)
            if isinstance(t, kind) and (t.run_id, t.round, t.attempt) == (
                task.run.run_id,
                task.round,
                task.attempt,
            ):
                return t
            if isinstance(t, IdleTask):
                continue  # the coordinator held the call up to its long poll already
            raise Superseded(t)
        raise Stopped("stopped during secure aggregation")

    def run(self, task: TrainTask, payload: Mapping[str, Tensor]) -> SecureOutcome:
        """Take part in the attempt with this (weighted) payload; SitOut or Superseded if not."""
        params = task.secure
        assert params is not None
        run_id, rnd, attempt = task.run.run_id, task.round, task.attempt
        vector, layout = flatten(payload)  # (L,) float32, the payload spec in sorted-name order
        if layout.size != params.vector_length or layout.digest() != params.layout_digest:
            raise SitOut(
                f"round {rnd}: this silo's payload layout ({layout.size} values, "
                f"{layout.digest()[:16]}) "
                f"differs from the round's ({params.vector_length}, {params.layout_digest[:16]})"
            )
        for entry in layout.entries:  # a clipped weight would corrupt the sum's denominator
            if is_weight_key(entry.name) and abs(float(vector[entry.offset])) > params.clip:
                raise SitOut(
                    f"round {rnd}: weight {entry.name} = {float(vector[entry.offset]):.4g} exceeds "
                    "the "
                    f"secure-aggregation clip {params.clip:g}; raise [secagg] clip in the run"
                )
        if self.state.keys_advertised(run_id, rnd, attempt):
            raise SitOut(
                f"round {rnd} attempt {attempt}: this silo advertised keys for it before a "
                "restart; "
                "it never advertises a second key set for one attempt and sits it out"
            )
        signing = load_signing_material(self.cfg)
        sa = self._protocol(params, rnd, signing)
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()

        keys = sa.advertise_keys()
        self.state.mark_keys_advertised(run_id, rnd, attempt)  # durable before the keys leave
        self._sent(task, "advertise_keys", self.client.advertise_keys(run_id, rnd, attempt, keys))
        seconds["advertise_keys"] = time.perf_counter() - t0

        relay = self._wait(ShareKeysTask, task)
        t1 = time.perf_counter()
        sa.receive_keys(relay.keys)  # every peer key checked against the federation CA
        shares = sa.share_keys()
        self._sent(task, "share_keys", self.client.share_keys(run_id, rnd, attempt, shares))
        seconds["share_keys"] = time.perf_counter() - t1

        routed = self._wait(MaskedInputTask, task)
        _failpoint("masked_input")
        t2 = time.perf_counter()
        sa.receive_shares(routed.shares)  # the mask floor: refuses to mask with too few peers
        masked = sa.masked_input(vector)  # uint32 (L,)
        receipt = self.client.push_update(
            run_id,
            rnd,
            attempt,
            {MASKED_TENSOR: torch.from_numpy(masked)},
            kind=streams.StreamKind.MASKED_UPDATE,
        )
        if receipt.sent is not None:
            self.record.sent_update(
                run_id,
                rnd,
                attempt,
                receipt.sent,
                receipt.manifest_digest,
                layout,
                params.instance_id,
            )
        seconds["masked_input"] = time.perf_counter() - t2

        check = self._wait(ConsistencyCheckTask, task)
        t3 = time.perf_counter()
        self._check_earlier_attempts(run_id, rnd, attempt, check.proposal.survivors)
        signature = sa.consistency_check(check.proposal)  # refuses a silo both alive and dropped
        self._sent(
            task,
            "consistency_check",
            self.client.consistency_check(run_id, rnd, attempt, signature),
        )
        seconds["consistency_check"] = time.perf_counter() - t3

        request = self._wait(UnmaskTask, task).request
        t4 = time.perf_counter()
        response = sa.unmask(request)  # only the proposal it signed, with a quorum of signatures
        self.state.record_unmask(run_id, rnd, attempt, request.survivors)  # durable before sending
        self._sent(task, "unmask", self.client.unmask(run_id, rnd, attempt, response))
        seconds["unmask"] = time.perf_counter() - t4
        logger.info(
            "round %d attempt %d: secure aggregation done (%d survivors%s), %.0f%% clipped, %.2f s",
            rnd,
            attempt,
            len(request.survivors),
            f", dropped {list(request.dropped)}" if request.dropped else "",
            100 * (sa.clipped_fraction or 0.0),
            time.perf_counter() - t0,
        )
        return SecureOutcome(
            receipt, request.survivors, request.dropped, sa.clipped_fraction or 0.0, seconds
        )

    def _protocol(
        self, params: SecureAggregation, rnd: int, signing: SigningMaterial
    ) -> SecAggSilo:
        if self.cfg.silo.id not in params.roster:
            raise SitOut(f"round {rnd}: this silo is not in the secure-aggregation roster")
        config = SecAggConfig(
            clip=params.clip,
            frac_bits=params.frac_bits,
            threshold=params.threshold,
            neighbours=params.neighbours,
        )
        try:  # the RoundPlan re-checks overflow (N * clip * 2^F) and the threshold
            return SecAggSilo(
                params.instance_id,
                rnd,
                self.cfg.silo.id,
                params.roster,
                signing.key,
                signing.certificate_der,
                signing.verifier,
                config,
            )
        except (ConfigError, InvalidArgument) as exc:
            raise SitOut(
                f"round {rnd}: refusing the secure-aggregation parameters: {exc}"
            ) from None

    def _check_earlier_attempts(
        self, run_id: str, rnd: int, attempt: int, survivors: tuple[str, ...]
    ) -> None:
        earlier = self.state.unmask_record(run_id, rnd)
        if (
            earlier is not None
            and earlier["attempt"] != attempt
            and tuple(earlier["survivors"]) != survivors
        ):
            raise SitOut(
                f"round {rnd} attempt {attempt}: this silo already answered an unmask request of "
                f"attempt {earlier['attempt']} over {earlier['survivors']}; signing a different "
                f"survivor set {list(survivors)} for the same retrained update could let the two "
                "sums be differenced"
            )

    def _sent(self, task: TrainTask, stage: str, nbytes: int) -> None:
        self.record.sent_message(task.run.run_id, task.round, task.attempt, stage, nbytes)


# What makes the silo sit an attempt out rather than fail: the library's refusals.
REFUSALS = (PermissionDenied, FailedPrecondition, InvalidArgument, ConfigError, SitOut)
