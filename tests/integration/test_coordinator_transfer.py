"""The coordinator in this process moving real data: a 200 MB adapter through FetchGlobal and
PushUpdate with the silo's real client, and the plaintext health port.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import torch

from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.runspec import RunConfig
from pf2lora.common.wire.task_proto import task_from_proto
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.server import Coordinator
from pf2lora.silo.client import CoordinatorClient
from pf2lora.v1 import silo_pb2
from tests.helpers.inprocess import coordinator_config, silo_config, status_of

FED = "testfed"


def test_a_200mb_adapter_streams_through_fetch_global_and_push_update(tmp_path: Path) -> None:
    """A 200 MB shared state: FetchGlobal (coordinator -> silo) and PushUpdate (silo -> coordinator)
    through the real servicers and the silo's real client, 1 MiB chunks, digests checked."""
    gen = torch.Generator().manual_seed(0)
    big = {f"layer.{i}.lora_B.weight": torch.randn(3200, 4096, generator=gen) for i in range(4)}
    total = sum(t.numel() * 4 for t in big.values())
    assert total >= 200e6
    coord = Coordinator(
        coordinator_config(tmp_path / "coordinator", FED, ("silo-a",)),
        initial_state=lambda algorithm, model, seed: big,
    )
    coord.start()
    client = CoordinatorClient(
        silo_config(tmp_path / "silo", "silo-a", FED, coord.ports["silo_api"]),
        stop=threading.Event(),
    )
    try:
        run_id = coord.engine.start_run(
            RunConfig(
                model=ModelConfig(path="unused"), rounds=1, min_silos=1, secure_aggregation=False
            )
        )
        client.join(100, "test")
        task = client.get_task("")
        while task.__class__.__name__ == "IdleTask":
            task = client.get_task("")
        t0 = time.perf_counter()
        fetched = client.fetch_global(run_id, 0, task.global_digest)  # type: ignore[union-attr]
        t1 = time.perf_counter()
        assert all(torch.equal(fetched[k], big[k]) for k in big)
        payload = weighted_payload({k: v * 0.5 for k, v in fetched.items()}, task.weight)  # type: ignore[union-attr]
        receipt = client.push_update(run_id, 1, task.attempt, payload)  # type: ignore[union-attr]
        t2 = time.perf_counter()
        assert receipt.received == 1
        print(
            f"200 MB adapter: FetchGlobal {total / (t1 - t0) / 1e6:.0f} MB/s, "
            f"PushUpdate + aggregation + checkpoint {total / (t2 - t1) / 1e6:.0f} MB/s"
        )
        g1 = CheckpointStore(tmp_path / "coordinator").read(run_id, 1)
        for k, v in big.items():
            torch.testing.assert_close(g1[k], v * 0.5)
        assert (
            task_from_proto(silo_pb2.Task(idle=silo_pb2.IdleTask())).__class__.__name__
            == "IdleTask"
        )
    finally:
        client.close()
        coord.stop(grace=0)


def test_health_port_reports_the_services(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    coord = Coordinator(coordinator_config(tmp_path / "c", FED, ("silo-a",), health=True))
    coord.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{coord.ports['health']}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "pf2lora.v1.SiloApi", "pf2lora.v1.ControlApi"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # nothing else is served on the plaintext port: not the silo API, not the control API
            for method in (
                "/pf2lora.v1.SiloApi/Join",
                "/pf2lora.v1.SiloApi/GetTask",
                "/pf2lora.v1.ControlApi/ListSilos",
                "/pf2lora.v1.ControlApi/StartRun",
            ):
                assert (
                    status_of(lambda m=method: ch.unary_unary(m)(b"", timeout=10))
                    == grpc.StatusCode.UNIMPLEMENTED
                ), method
    finally:
        coord.stop(grace=0)


def test_a_damaged_checkpoint_is_data_loss_naming_the_file(tmp_path: Path) -> None:
    """FetchGlobal of an older checkpoint altered on disk answers DATA_LOSS with the file's
    name (the silo and the operator see what to restore), not a generic INTERNAL."""
    state = {"layer.lora_A.weight": torch.ones(2, 4)}
    coord = Coordinator(
        coordinator_config(tmp_path / "coordinator", FED, ("silo-a",)),
        initial_state=lambda algorithm, model, seed: state,
    )
    coord.start()
    client = CoordinatorClient(
        silo_config(tmp_path / "silo", "silo-a", FED, coord.ports["silo_api"]),
        stop=threading.Event(),
    )
    try:
        run_id = coord.engine.start_run(
            RunConfig(
                model=ModelConfig(path="unused"), rounds=2, min_silos=1, secure_aggregation=False
            )
        )
        client.join(100, "test")
        task = client.get_task("")
        while task.__class__.__name__ == "IdleTask":
            task = client.get_task("")
        digest = task.global_digest  # type: ignore[union-attr]
        fetched = client.fetch_global(run_id, 0, digest)
        client.push_update(run_id, 1, task.attempt, weighted_payload(fetched, task.weight))  # type: ignore[union-attr]
        path = CheckpointStore(tmp_path / "coordinator").path(run_id, 0)  # now an older one
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF  # one bit of a tensor value
        path.write_bytes(bytes(data))
        try:
            client.fetch_global(run_id, 0, digest)
            raise AssertionError("a damaged checkpoint was served")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DATA_LOSS, exc  # type: ignore[attr-defined]
            assert str(path) in exc.details()  # type: ignore[attr-defined]
    finally:
        client.close()
        coord.stop(grace=0)
