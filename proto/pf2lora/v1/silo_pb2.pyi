from pf2lora.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MetricsKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRICS_KIND_UNSPECIFIED: _ClassVar[MetricsKind]
    METRICS_KIND_TRAIN: _ClassVar[MetricsKind]
    METRICS_KIND_EVALUATE: _ClassVar[MetricsKind]
METRICS_KIND_UNSPECIFIED: MetricsKind
METRICS_KIND_TRAIN: MetricsKind
METRICS_KIND_EVALUATE: MetricsKind

class JoinRequest(_message.Message):
    __slots__ = ("silo_id", "num_samples", "software_version", "capabilities")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    num_samples: int
    software_version: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, silo_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("federation", "coordinator_version", "active_run_id", "long_poll_ms")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LONG_POLL_MS_FIELD_NUMBER: _ClassVar[int]
    federation: str
    coordinator_version: str
    active_run_id: str
    long_poll_ms: int
    def __init__(self, federation: _Optional[str] = ..., coordinator_version: _Optional[str] = ..., active_run_id: _Optional[str] = ..., long_poll_ms: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("silo_id", "current_run_id", "wait_ms")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    current_run_id: str
    wait_ms: int
    def __init__(self, silo_id: _Optional[str] = ..., current_run_id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class RunSpec(_message.Message):
    __slots__ = ("run_id", "algorithm_json", "model_json", "seed", "rounds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_JSON_FIELD_NUMBER: _ClassVar[int]
    MODEL_JSON_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    algorithm_json: str
    model_json: str
    seed: int
    rounds: int
    def __init__(self, run_id: _Optional[str] = ..., algorithm_json: _Optional[str] = ..., model_json: _Optional[str] = ..., seed: _Optional[int] = ..., rounds: _Optional[int] = ...) -> None: ...

class SecureAggregationParams(_message.Message):
    __slots__ = ("enabled", "clip", "frac_bits", "threshold", "neighbours", "roster", "instance_id", "vector_length", "layout_digest")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    clip: float
    frac_bits: int
    threshold: int
    neighbours: int
    roster: _containers.RepeatedScalarFieldContainer[str]
    instance_id: str
    vector_length: int
    layout_digest: str
    def __init__(self, enabled: _Optional[bool] = ..., clip: _Optional[float] = ..., frac_bits: _Optional[int] = ..., threshold: _Optional[int] = ..., neighbours: _Optional[int] = ..., roster: _Optional[_Iterable[str]] = ..., instance_id: _Optional[str] = ..., vector_length: _Optional[int] = ..., layout_digest: _Optional[str] = ...) -> None: ...

class IdleTask(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("run", "attempt", "client_index", "weight", "deadline_unix_ms", "global_manifest_digest", "secure_aggregation")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    run: RunSpec
    attempt: int
    client_index: int
    weight: float
    deadline_unix_ms: int
    global_manifest_digest: bytes
    secure_aggregation: SecureAggregationParams
    def __init__(self, run: _Optional[_Union[RunSpec, _Mapping]] = ..., attempt: _Optional[int] = ..., client_index: _Optional[int] = ..., weight: _Optional[float] = ..., deadline_unix_ms: _Optional[int] = ..., global_manifest_digest: _Optional[bytes] = ..., secure_aggregation: _Optional[_Union[SecureAggregationParams, _Mapping]] = ...) -> None: ...

class EvaluateTask(_message.Message):
    __slots__ = ("run", "client_index", "global_manifest_digest", "deadline_unix_ms")
    RUN_FIELD_NUMBER: _ClassVar[int]
    CLIENT_INDEX_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    run: RunSpec
    client_index: int
    global_manifest_digest: bytes
    deadline_unix_ms: int
    def __init__(self, run: _Optional[_Union[RunSpec, _Mapping]] = ..., client_index: _Optional[int] = ..., global_manifest_digest: _Optional[bytes] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class StopTask(_message.Message):
    __slots__ = ("state", "reason")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    state: str
    reason: str
    def __init__(self, state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ShareKeysTask(_message.Message):
    __slots__ = ("neighbour_keys", "attempt")
    NEIGHBOUR_KEYS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    neighbour_keys: _containers.RepeatedCompositeFieldContainer[SignedKeys]
    attempt: int
    def __init__(self, neighbour_keys: _Optional[_Iterable[_Union[SignedKeys, _Mapping]]] = ..., attempt: _Optional[int] = ...) -> None: ...

class MaskedInputTask(_message.Message):
    __slots__ = ("shares", "attempt")
    SHARES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    attempt: int
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., attempt: _Optional[int] = ...) -> None: ...

class ConsistencyCheckTask(_message.Message):
    __slots__ = ("proposal", "attempt")
    PROPOSAL_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    proposal: UnmaskProposal
    attempt: int
    def __init__(self, proposal: _Optional[_Union[UnmaskProposal, _Mapping]] = ..., attempt: _Optional[int] = ...) -> None: ...

class UnmaskTask(_message.Message):
    __slots__ = ("survivors", "dropped", "signatures", "attempt", "instance_id")
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.RepeatedCompositeFieldContainer[ConsistencySignature]
    attempt: int
    instance_id: str
    def __init__(self, survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Iterable[_Union[ConsistencySignature, _Mapping]]] = ..., attempt: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("run_id", "round", "idle", "train", "evaluate", "stop", "share_keys", "masked_input", "unmask", "consistency_check")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SHARE_KEYS_FIELD_NUMBER: _ClassVar[int]
    MASKED_INPUT_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_CHECK_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    idle: IdleTask
    train: TrainTask
    evaluate: EvaluateTask
    stop: StopTask
    share_keys: ShareKeysTask
    masked_input: MaskedInputTask
    unmask: UnmaskTask
    consistency_check: ConsistencyCheckTask
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., idle: _Optional[_Union[IdleTask, _Mapping]] = ..., train: _Optional[_Union[TrainTask, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateTask, _Mapping]] = ..., stop: _Optional[_Union[StopTask, _Mapping]] = ..., share_keys: _Optional[_Union[ShareKeysTask, _Mapping]] = ..., masked_input: _Optional[_Union[MaskedInputTask, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskTask, _Mapping]] = ..., consistency_check: _Optional[_Union[ConsistencyCheckTask, _Mapping]] = ...) -> None: ...

class FetchGlobalRequest(_message.Message):
    __slots__ = ("silo_id", "run_id", "round")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class PushUpdateReply(_message.Message):
    __slots__ = ("run_id", "round", "manifest_digest", "received", "participants")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    manifest_digest: bytes
    received: int
    participants: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., manifest_digest: _Optional[bytes] = ..., received: _Optional[int] = ..., participants: _Optional[int] = ...) -> None: ...

class ReportMetricsRequest(_message.Message):
    __slots__ = ("silo_id", "run_id", "round", "kind", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    kind: MetricsKind
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[MetricsKind, str]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReportMetricsReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RefuseRunRequest(_message.Message):
    __slots__ = ("silo_id", "run_id", "reason")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    reason: str
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RefuseRunReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggHeader(_message.Message):
    __slots__ = ("silo_id", "run_id", "round", "attempt")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    run_id: str
    round: int
    attempt: int
    def __init__(self, silo_id: _Optional[str] = ..., run_id: _Optional[str] = ..., round: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("received", "expected")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    received: int
    expected: int
    def __init__(self, received: _Optional[int] = ..., expected: _Optional[int] = ...) -> None: ...

class AdvertiseKeysRequest(_message.Message):
    __slots__ = ("header", "keys")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    keys: SignedKeys
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., keys: _Optional[_Union[SignedKeys, _Mapping]] = ...) -> None: ...

class ShareKeysRequest(_message.Message):
    __slots__ = ("header", "shares")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class ConsistencyCheckRequest(_message.Message):
    __slots__ = ("header", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    signature: ConsistencySignature
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., signature: _Optional[_Union[ConsistencySignature, _Mapping]] = ...) -> None: ...

class UnmaskRequest(_message.Message):
    __slots__ = ("header", "response")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    response: UnmaskResponse
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., response: _Optional[_Union[UnmaskResponse, _Mapping]] = ...) -> None: ...

class SignedKeys(_message.Message):
    __slots__ = ("run_id", "round", "silo_id", "mask_public_key", "share_public_key", "signature", "certificate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SHARE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    silo_id: str
    mask_public_key: bytes
    share_public_key: bytes
    signature: bytes
    certificate: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., silo_id: _Optional[str] = ..., mask_public_key: _Optional[bytes] = ..., share_public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("run_id", "round", "sender", "receiver", "ciphertext")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    sender: str
    receiver: str
    ciphertext: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., sender: _Optional[str] = ..., receiver: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class OwnedShare(_message.Message):
    __slots__ = ("owner", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., share: _Optional[bytes] = ...) -> None: ...

class UnmaskResponse(_message.Message):
    __slots__ = ("run_id", "round", "silo_id", "self_mask_shares", "mask_key_shares")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    silo_id: str
    self_mask_shares: _containers.RepeatedCompositeFieldContainer[OwnedShare]
    mask_key_shares: _containers.RepeatedCompositeFieldContainer[OwnedShare]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., silo_id: _Optional[str] = ..., self_mask_shares: _Optional[_Iterable[_Union[OwnedShare, _Mapping]]] = ..., mask_key_shares: _Optional[_Iterable[_Union[OwnedShare, _Mapping]]] = ...) -> None: ...

class UnmaskProposal(_message.Message):
    __slots__ = ("run_id", "round", "survivors", "dropped")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...

class ConsistencySignature(_message.Message):
    __slots__ = ("run_id", "round", "silo_id", "signature", "certificate")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    silo_id: str
    signature: bytes
    certificate: bytes
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., silo_id: _Optional[str] = ..., signature: _Optional[bytes] = ..., certificate: _Optional[bytes] = ...) -> None: ...
