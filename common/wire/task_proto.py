"""Secure-aggregation values <-> pf2lora.v1 protobuf: the library's messages, stage tasks and round parameters.

The coordinator's silo servicer and the silo's client are the only callers (wire at the edges).
Every `*_from_proto` builds a validated library message (common/secagg/messages.py), so a
malformed field surfaces as InvalidArgument before any protocol state is touched.
"""

from __future__ import annotations

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
    MaskedInputTask,
    SecureAggregation,
    ShareKeysTask,
    StageTask,
    UnmaskTask,
)
from pf2lora.v1 import silo_pb2

MAX_INSTANCE_ID = 256


# ---------------------------------------------------------------------------- messages
def keys_to_proto(m: SignedKeys) -> silo_pb2.SignedKeys:
    return silo_pb2.SignedKeys(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id, mask_public_key=m.mask_public_key,
        share_public_key=m.share_public_key, signature=m.signature, certificate=m.certificate,
    )


def keys_from_proto(m: silo_pb2.SignedKeys) -> SignedKeys:
    return SignedKeys(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id, mask_public_key=bytes(m.mask_public_key),
        share_public_key=bytes(m.share_public_key), signature=bytes(m.signature),
        certificate=bytes(m.certificate),
    )


def share_to_proto(m: EncryptedShare) -> silo_pb2.EncryptedShare:
    return silo_pb2.EncryptedShare(
        run_id=m.run_id, round=m.round, sender=m.sender, receiver=m.receiver, ciphertext=m.ciphertext
    )


def share_from_proto(m: silo_pb2.EncryptedShare) -> EncryptedShare:
    return EncryptedShare(
        run_id=m.run_id, round=m.round, sender=m.sender, receiver=m.receiver,
        ciphertext=bytes(m.ciphertext),
    )


def proposal_to_proto(m: UnmaskProposal) -> silo_pb2.UnmaskProposal:
    return silo_pb2.UnmaskProposal(
        run_id=m.run_id, round=m.round, survivors=list(m.survivors), dropped=list(m.dropped)
    )


def proposal_from_proto(m: silo_pb2.UnmaskProposal) -> UnmaskProposal:
    return UnmaskProposal(
        run_id=m.run_id, round=m.round, survivors=tuple(m.survivors), dropped=tuple(m.dropped)
    )


def signature_to_proto(m: ConsistencySignature) -> silo_pb2.ConsistencySignature:
    return silo_pb2.ConsistencySignature(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id, signature=m.signature,
        certificate=m.certificate,
    )


def signature_from_proto(m: silo_pb2.ConsistencySignature) -> ConsistencySignature:
    return ConsistencySignature(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id, signature=bytes(m.signature),
        certificate=bytes(m.certificate),
    )


def response_to_proto(m: UnmaskResponse) -> silo_pb2.UnmaskResponse:
    return silo_pb2.UnmaskResponse(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id,
        self_mask_shares=[silo_pb2.OwnedShare(owner=s.owner, share=s.share) for s in m.self_mask_shares],
        mask_key_shares=[silo_pb2.OwnedShare(owner=s.owner, share=s.share) for s in m.mask_key_shares],
    )


def response_from_proto(m: silo_pb2.UnmaskResponse) -> UnmaskResponse:
    return UnmaskResponse(
        run_id=m.run_id, round=m.round, silo_id=m.silo_id,
        self_mask_shares=tuple(OwnedShare(s.owner, bytes(s.share)) for s in m.self_mask_shares),
        mask_key_shares=tuple(OwnedShare(s.owner, bytes(s.share)) for s in m.mask_key_shares),
    )


# ------------------------------------------------------------------ round parameters
def params_to_proto(p: SecureAggregation | None) -> silo_pb2.SecureAggregationParams:
    if p is None:
        return silo_pb2.SecureAggregationParams(enabled=False)
    return silo_pb2.SecureAggregationParams(
        enabled=True, clip=p.clip, frac_bits=p.frac_bits, threshold=p.threshold,
        neighbours=p.neighbours or 0, roster=list(p.roster), instance_id=p.instance_id,
        vector_length=p.vector_length, layout_digest=p.layout_digest,
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
        instance_id=m.instance_id, roster=tuple(m.roster), clip=m.clip, frac_bits=m.frac_bits,
        threshold=m.threshold, neighbours=m.neighbours or None, vector_length=m.vector_length,
        layout_digest=m.layout_digest,
    )


# ------------------------------------------------------------------------ stage tasks
def stage_task_to_proto(task: StageTask) -> silo_pb2.Task:
    if isinstance(task, ShareKeysTask):
        body = {"share_keys": silo_pb2.ShareKeysTask(
            neighbour_keys=[keys_to_proto(k) for k in task.keys], attempt=task.attempt)}
    elif isinstance(task, MaskedInputTask):
        body = {"masked_input": silo_pb2.MaskedInputTask(
            shares=[share_to_proto(s) for s in task.shares], attempt=task.attempt)}
    elif isinstance(task, ConsistencyCheckTask):
        body = {"consistency_check": silo_pb2.ConsistencyCheckTask(
            proposal=proposal_to_proto(task.proposal), attempt=task.attempt)}
    else:
        r = task.request
        body = {"unmask": silo_pb2.UnmaskTask(
            survivors=list(r.survivors), dropped=list(r.dropped),
            signatures=[signature_to_proto(s) for s in r.signatures], attempt=task.attempt,
            instance_id=r.run_id)}
    return silo_pb2.Task(run_id=task.run_id, round=task.round, **body)  # type: ignore[arg-type]


def stage_task_from_proto(msg: silo_pb2.Task) -> StageTask | None:
    """The stage task in `msg`, or None if its body is not a secure-aggregation stage."""
    body = msg.WhichOneof("body")
    if body == "share_keys":
        t = msg.share_keys
        return ShareKeysTask(msg.run_id, msg.round, t.attempt, tuple(keys_from_proto(k) for k in t.neighbour_keys))
    if body == "masked_input":
        m = msg.masked_input
        return MaskedInputTask(msg.run_id, msg.round, m.attempt, tuple(share_from_proto(s) for s in m.shares))
    if body == "consistency_check":
        c = msg.consistency_check
        return ConsistencyCheckTask(msg.run_id, msg.round, c.attempt, proposal_from_proto(c.proposal))
    if body == "unmask":
        u = msg.unmask
        request = UnmaskRequest(
            run_id=u.instance_id, round=msg.round, survivors=tuple(u.survivors),
            dropped=tuple(u.dropped), signatures=tuple(signature_from_proto(s) for s in u.signatures),
        )
        return UnmaskTask(msg.run_id, msg.round, u.attempt, request)
    return None


def header_to_proto(silo_id: str, run_id: str, round_: int, attempt: int) -> silo_pb2.SecAggHeader:
    return silo_pb2.SecAggHeader(silo_id=silo_id, run_id=run_id, round=round_, attempt=attempt)
