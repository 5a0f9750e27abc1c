"""Input that cannot break the control plane, against the real coordinator in this process: run
settings outside what the wire carries, deeply nested JSON and a model path that is not a
model are INVALID_ARGUMENT (never INTERNAL), and client strings echo back bounded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from pf2lora.common.runspec import to_dict, to_json
from pf2lora.coordinator.server import Coordinator
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc
from tests.helpers.inprocess import coordinator_config, plain_run_config

STATE = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}
DETAILS_LIMIT = 4096  # gRPC clients refuse trailers much past 8 KiB (RESOURCE_EXHAUSTED)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[control_pb2_grpc.ControlApiStub]:
    coord = Coordinator(coordinator_config(tmp_path / "state", "fed", ("a", "b")))
    coord.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{coord.ports['control_api']}")
    try:
        yield control_pb2_grpc.ControlApiStub(channel)
    finally:
        channel.close()
        coord.stop(grace=0)


def _refusal(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value


def _start(stub: control_pb2_grpc.ControlApiStub, text: str, run_id: str = "") -> grpc.RpcError:
    req = cpb.StartRunRequest(run_config_json=text, run_id=run_id)
    return _refusal(lambda: stub.StartRun(req, timeout=30))


def _json_with(field: str, value: object) -> str:
    """A run config as JSON with one field set to a value the dataclass would refuse."""
    doc = to_dict(plain_run_config())
    doc[field] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("field", "value"), [("rounds", 2**32), ("round_deadline_s", 1e300), ("min_silos", 10**12)]
)
def test_run_settings_beyond_what_the_wire_carries_are_refused_at_start(
    control: control_pb2_grpc.ControlApiStub, field: str, value: object
) -> None:
    err = _start(control, _json_with(field, value))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert field in err.details()
    control.ListSilos(cpb.ListSilosRequest(), timeout=10)  # still serving


def test_deeply_nested_json_is_invalid_argument(control: control_pb2_grpc.ControlApiStub) -> None:
    err = _start(control, "[" * 200_000 + "]" * 200_000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert "nested too deeply" in err.details()


def test_a_model_path_that_is_a_file_is_invalid_argument(
    control: control_pb2_grpc.ControlApiStub, tmp_path: Path
) -> None:
    not_a_model = tmp_path / "weights.bin"
    not_a_model.write_bytes(b"\x00" * 64)
    doc = to_dict(plain_run_config())
    doc["model"]["path"] = str(not_a_model)
    err = _start(control, json.dumps(doc))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert str(not_a_model) in err.details() and "folder" in err.details()


def test_a_huge_run_id_echoes_back_bounded(
    control: control_pb2_grpc.ControlApiStub, caplog: pytest.LogCaptureFixture
) -> None:
    huge = "x" * (4 << 20)
    with caplog.at_level(logging.INFO):
        err = _start(control, to_json(plain_run_config()), run_id=huge)
        err2 = _refusal(
            lambda: control.GetRunStatus(cpb.GetRunStatusRequest(run_id=huge), timeout=30)
        )
    for e in (err, err2):
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), e
        assert len(e.details()) < DETAILS_LIMIT and "characters" in e.details()
    assert max(len(r.getMessage()) for r in caplog.records) < 2 * DETAILS_LIMIT


def test_undecodable_requests_are_counted_and_logged_at_a_bounded_rate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coord = Coordinator(coordinator_config(tmp_path / "state", "fed", ("a", "b")))
    coord.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{coord.ports['silo_api']}")
    try:
        join = channel.unary_unary("/pf2lora.v1.SiloApi/Join")  # raw bytes, not a JoinRequest
        with caplog.at_level(logging.WARNING, logger="grpc._common"):
            for _ in range(20):
                with pytest.raises(grpc.RpcError):
                    join(b"\xff\xff\xff\xff not protobuf", timeout=10)
        lines = [r for r in caplog.records if r.name == "grpc._common"]
        assert len(lines) == 1 and lines[0].exc_info is None  # one line, no traceback
        count = coord.metrics.registry.get_sample_value(
            "pf2lora_coordinator_undecodable_requests_total"
        )
        assert count == 20
    finally:
        channel.close()
        coord.stop(grace=0)
