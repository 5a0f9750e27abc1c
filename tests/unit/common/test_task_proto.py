"""Task values <-> protobuf: both ends convert with the same functions, so every task survives
the round trip; malformed attempts and metric kinds are refused."""

from __future__ import annotations

import pytest

from pf2lora.common.errors import InvalidArgument
from pf2lora.common.wire import task_proto
from pf2lora.common.wire.tasks import (
    EvaluateTask,
    IdleTask,
    RunInfo,
    SecureAggregation,
    StopTask,
    Task,
    TrainTask,
)
from pf2lora.v1 import silo_pb2
from pf2lora.v1 import tensors_pb2 as tpb

RUN = RunInfo("run-1", '{"name": "pf2lora"}', '{"path": "minilm"}', 7, 3)
SECURE = SecureAggregation(
    instance_id="run-1/a2",
    roster=("silo-a", "silo-b", "silo-c"),
    clip=4.0,
    frac_bits=16,
    threshold=2,
    neighbours=None,
    vector_length=1234,
    layout_digest="ab" * 32,
)
TASKS: list[Task] = [
    IdleTask(1.5, "no active run"),
    StopTask("run-1", "completed", ""),
    TrainTask(RUN, 2, 1, 0, 0.25, 1_700_000_000_000, "cd" * 32),
    TrainTask(RUN, 2, 2, 1, 0.75, 1_700_000_000_000, "cd" * 32, secure=SECURE),
    EvaluateTask(RUN, 3, 2, 1_700_000_000_000, "ef" * 32),
]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: type(t).__name__)
def test_every_task_survives_the_round_trip(task: Task) -> None:
    wire = task_proto.task_to_proto(task).SerializeToString()
    assert task_proto.task_from_proto(silo_pb2.Task.FromString(wire)) == task


def test_a_task_this_silo_cannot_serve_becomes_idle() -> None:
    assert isinstance(task_proto.task_from_proto(silo_pb2.Task()), IdleTask)


def test_attempts_and_metric_kinds_are_checked() -> None:
    header = tpb.StreamHeader(scalars={task_proto.ATTEMPT_SCALAR: 3.0})
    assert task_proto.attempt_of(header) == 3
    for bad in ({}, {task_proto.ATTEMPT_SCALAR: 0.5}, {task_proto.ATTEMPT_SCALAR: 0.0}):
        with pytest.raises(InvalidArgument, match="attempt"):
            task_proto.attempt_of(tpb.StreamHeader(scalars=bad))
    for kind, value in task_proto.METRICS_KIND_TO_PROTO.items():
        assert task_proto.metrics_kind_from_proto(value) == kind
    with pytest.raises(InvalidArgument, match="metrics kind 0"):
        task_proto.metrics_kind_from_proto(0)
