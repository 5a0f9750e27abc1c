from pf2lora.v1 import tensors_pb2 as _tensors_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]

class RunPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_PHASE_UNSPECIFIED: _ClassVar[RunPhase]
    RUN_PHASE_ENROLLING: _ClassVar[RunPhase]
    RUN_PHASE_TRAINING: _ClassVar[RunPhase]
    RUN_PHASE_EVALUATING: _ClassVar[RunPhase]
    RUN_PHASE_DONE: _ClassVar[RunPhase]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_STOPPED: RunState
RUN_STATE_FAILED: RunState
RUN_PHASE_UNSPECIFIED: RunPhase
RUN_PHASE_ENROLLING: RunPhase
RUN_PHASE_TRAINING: RunPhase
RUN_PHASE_EVALUATING: RunPhase
RUN_PHASE_DONE: RunPhase

class StartRunRequest(_message.Message):
    __slots__ = ("run_config_json", "run_id")
    RUN_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_config_json: str
    run_id: str
    def __init__(self, run_config_json: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ParticipantStatus(_message.Message):
    __slots__ = ("silo_id", "weight", "state")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    weight: float
    state: str
    def __init__(self, silo_id: _Optional[str] = ..., weight: _Optional[float] = ..., state: _Optional[str] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "attempt", "participants", "reported", "opened_unix_ms", "completed_unix_ms", "checkpoint_digest", "mean_metrics", "stage_seconds", "dropped", "secure_aggregation", "epsilon")
    class MeanMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    OPENED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MEAN_METRICS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    participants: _containers.RepeatedScalarFieldContainer[str]
    reported: _containers.RepeatedScalarFieldContainer[str]
    opened_unix_ms: int
    completed_unix_ms: int
    checkpoint_digest: bytes
    mean_metrics: _containers.ScalarMap[str, float]
    stage_seconds: _containers.ScalarMap[str, float]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    secure_aggregation: bool
    epsilon: float
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., participants: _Optional[_Iterable[str]] = ..., reported: _Optional[_Iterable[str]] = ..., opened_unix_ms: _Optional[int] = ..., completed_unix_ms: _Optional[int] = ..., checkpoint_digest: _Optional[bytes] = ..., mean_metrics: _Optional[_Mapping[str, float]] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., dropped: _Optional[_Iterable[str]] = ..., secure_aggregation: _Optional[bool] = ..., epsilon: _Optional[float] = ...) -> None: ...

class SiloMetrics(_message.Message):
    __slots__ = ("silo_id", "round", "kind", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    round: int
    kind: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, silo_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "state", "phase", "rounds", "completed_rounds", "current_round", "attempt", "enrolled", "participants", "deadline_unix_ms", "history", "evaluation", "config_json", "created_unix_ms", "finished_unix_ms", "reason", "secagg_stage", "waiting_for", "refused")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SECAGG_STAGE_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    phase: RunPhase
    rounds: int
    completed_rounds: int
    current_round: int
    attempt: int
    enrolled: _containers.RepeatedScalarFieldContainer[str]
    participants: _containers.RepeatedCompositeFieldContainer[ParticipantStatus]
    deadline_unix_ms: int
    history: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    evaluation: _containers.RepeatedCompositeFieldContainer[SiloMetrics]
    config_json: str
    created_unix_ms: int
    finished_unix_ms: int
    reason: str
    secagg_stage: str
    waiting_for: _containers.RepeatedScalarFieldContainer[str]
    refused: _containers.RepeatedCompositeFieldContainer[SiloRefusal]
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., phase: _Optional[_Union[RunPhase, str]] = ..., rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., current_round: _Optional[int] = ..., attempt: _Optional[int] = ..., enrolled: _Optional[_Iterable[str]] = ..., participants: _Optional[_Iterable[_Union[ParticipantStatus, _Mapping]]] = ..., deadline_unix_ms: _Optional[int] = ..., history: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., evaluation: _Optional[_Iterable[_Union[SiloMetrics, _Mapping]]] = ..., config_json: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., reason: _Optional[str] = ..., secagg_stage: _Optional[str] = ..., waiting_for: _Optional[_Iterable[str]] = ..., refused: _Optional[_Iterable[_Union[SiloRefusal, _Mapping]]] = ...) -> None: ...

class SiloRefusal(_message.Message):
    __slots__ = ("silo_id", "reason", "unix_ms")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    reason: str
    unix_ms: int
    def __init__(self, silo_id: _Optional[str] = ..., reason: _Optional[str] = ..., unix_ms: _Optional[int] = ...) -> None: ...

class ListSilosRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiloInfo(_message.Message):
    __slots__ = ("silo_id", "allowed", "joined", "num_samples", "software_version", "first_seen_unix_ms", "last_seen_unix_ms")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    allowed: bool
    joined: bool
    num_samples: int
    software_version: str
    first_seen_unix_ms: int
    last_seen_unix_ms: int
    def __init__(self, silo_id: _Optional[str] = ..., allowed: _Optional[bool] = ..., joined: _Optional[bool] = ..., num_samples: _Optional[int] = ..., software_version: _Optional[str] = ..., first_seen_unix_ms: _Optional[int] = ..., last_seen_unix_ms: _Optional[int] = ...) -> None: ...

class ListSilosReply(_message.Message):
    __slots__ = ("federation", "silos")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    SILOS_FIELD_NUMBER: _ClassVar[int]
    federation: str
    silos: _containers.RepeatedCompositeFieldContainer[SiloInfo]
    def __init__(self, federation: _Optional[str] = ..., silos: _Optional[_Iterable[_Union[SiloInfo, _Mapping]]] = ...) -> None: ...

class GetRoundManifestRequest(_message.Message):
    __slots__ = ("run_id", "round")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class UpdateReceipt(_message.Message):
    __slots__ = ("silo_id", "attempt", "manifest_digest", "tensors", "kind")
    SILO_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    silo_id: str
    attempt: int
    manifest_digest: bytes
    tensors: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorSpec]
    kind: str
    def __init__(self, silo_id: _Optional[str] = ..., attempt: _Optional[int] = ..., manifest_digest: _Optional[bytes] = ..., tensors: _Optional[_Iterable[_Union[_tensors_pb2.TensorSpec, _Mapping]]] = ..., kind: _Optional[str] = ...) -> None: ...

class LayoutEntry(_message.Message):
    __slots__ = ("name", "shape", "offset", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    dtype: _tensors_pb2.DType
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., dtype: _Optional[_Union[_tensors_pb2.DType, str]] = ...) -> None: ...

class RoundManifest(_message.Message):
    __slots__ = ("run_id", "round", "global_tensors", "global_manifest_digest", "updates", "secure_aggregation", "payload_layout", "layout_digest", "attempt", "summed", "dropped")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_TENSORS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_MANIFEST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SUMMED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    round: int
    global_tensors: _containers.RepeatedCompositeFieldContainer[_tensors_pb2.TensorSpec]
    global_manifest_digest: bytes
    updates: _containers.RepeatedCompositeFieldContainer[UpdateReceipt]
    secure_aggregation: bool
    payload_layout: _containers.RepeatedCompositeFieldContainer[LayoutEntry]
    layout_digest: str
    attempt: int
    summed: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., round: _Optional[int] = ..., global_tensors: _Optional[_Iterable[_Union[_tensors_pb2.TensorSpec, _Mapping]]] = ..., global_manifest_digest: _Optional[bytes] = ..., updates: _Optional[_Iterable[_Union[UpdateReceipt, _Mapping]]] = ..., secure_aggregation: _Optional[bool] = ..., payload_layout: _Optional[_Iterable[_Union[LayoutEntry, _Mapping]]] = ..., layout_digest: _Optional[str] = ..., attempt: _Optional[int] = ..., summed: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ...) -> None: ...
