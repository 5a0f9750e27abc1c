"""One live session per silo identity, against the real coordinator in this process: a second
process with the same identity is refused while the first is alive (and named), takes over once
the first is gone, and a silo's sample count cannot change inside a run."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from pf2lora.coordinator.server import Coordinator
from pf2lora.silo.client import SessionInterceptor
from pf2lora.v1 import silo_pb2, silo_pb2_grpc
from tests.helpers.inprocess import constant_state, coordinator_config, plain_run_config

STATE = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[Coordinator]:
    c = Coordinator(
        coordinator_config(tmp_path / "state", "fed", ("silo-a", "silo-b"), long_poll_s=5.0),
        initial_state=constant_state(STATE),
    )
    c.start()
    yield c
    c.stop(grace=0)


def _process(coord: Coordinator) -> tuple[grpc.Channel, silo_pb2_grpc.SiloApiStub]:
    """A silo process of its own: its own channel and its own session id on every call, as the
    silo's client sends (silo/client.py SessionInterceptor)."""
    ch = grpc.insecure_channel(f"127.0.0.1:{coord.ports['silo_api']}")
    session = SessionInterceptor(secrets.token_hex(16))
    return ch, silo_pb2_grpc.SiloApiStub(grpc.intercept_channel(ch, session))


def _join(stub: silo_pb2_grpc.SiloApiStub, samples: int) -> silo_pb2.JoinReply:
    req = silo_pb2.JoinRequest(silo_id="silo-a", num_samples=samples, software_version="t")
    return stub.Join(req, timeout=10)


def _long_poll(stub: silo_pb2_grpc.SiloApiStub) -> threading.Thread:
    req = silo_pb2.GetTaskRequest(silo_id="silo-a", wait_ms=5000)

    def poll() -> None:
        try:
            stub.GetTask(req, timeout=10)
        except grpc.RpcError:
            pass

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    time.sleep(0.3)  # the poll is in flight on the coordinator
    return t


def test_a_second_process_with_the_same_identity_is_refused_while_the_first_lives(
    coord: Coordinator,
) -> None:
    first_ch, first = _process(coord)
    second_ch, second = _process(coord)
    _join(first, 60)
    poll = _long_poll(first)
    with pytest.raises(grpc.RpcError) as info:
        _join(second, 2)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "live session" in info.value.details() and "127.0.0.1:" in info.value.details()
    assert coord.engine.store.silo("silo-a").num_samples == 60  # the weight did not change
    first_ch.close()  # the first process is gone (its poll ends with its connection)
    poll.join(10)
    assert _join(second, 60).federation == "fed"  # a restart takes over at once
    second_ch.close()


def test_a_silos_sample_count_cannot_change_inside_a_run(coord: Coordinator) -> None:
    ch, stub = _process(coord)
    _join(stub, 60)
    coord.engine.start_run(plain_run_config(min_silos=1, enroll_window_s=0.1), "run-1")
    stub.GetTask(silo_pb2.GetTaskRequest(silo_id="silo-a", wait_ms=0), timeout=10)  # enrolls
    ch.close()
    ch2, stub2 = _process(coord)
    with pytest.raises(grpc.RpcError) as info:
        _join(stub2, 2)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "60 examples" in info.value.details() and "run-1" in info.value.details()
    assert _join(stub2, 60).active_run_id == "run-1"  # the same data rejoins
    ch2.close()
