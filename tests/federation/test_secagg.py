"""Secure aggregation with real processes over mutual TLS (certificates made in the test): one of
five
silos is killed (SIGKILL) after the key-sharing stage; the round completes with the survivors, its
pairwise masks are removed with the survivors' shares, and the global state equals the weighted mean
of the four survivors (the in-process simulation of those four silos). The plaintext health ports
of the coordinator and of a silo answer SERVING and expose nothing else."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pf2lora.common.runspec import SecAggSettings
from pf2lora.common.simulation import DataConfig, SimulationConfig
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.store import Store
from pf2lora.silo.secure_round import FAILPOINT_ENV
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, free_port, run_config, secure_simulation
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow

SILOS = [f"silo-{k}" for k in range(5)]
VICTIM = "silo-4"  # the last index: the survivors are clients 0..3, as in a 4-client simulation


def _only_health(port: int) -> None:
    """SERVING over plaintext, and the silo/control APIs are not served on that port."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        for method in (
            "/pf2lora.v1.SiloApi/Join",
            "/pf2lora.v1.SiloApi/GetTask",
            "/pf2lora.v1.ControlApi/ListSilos",
            "/pf2lora.v1.ControlApi/StartRun",
        ):
            with pytest.raises(grpc.RpcError) as exc:
                ch.unary_unary(method)(b"", timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED, method


def test_silo_killed_after_key_sharing_round_completes_with_the_survivors_mean(
    tmp_path: Path,
    federation: Callable[..., Federation],
) -> None:
    silos = {s: write_silo_data(tmp_path / "data" / s, k, 16 + 4 * k) for k, s in enumerate(SILOS)}
    coord_health, silo_health = free_port(), free_port()
    fed = federation(
        silos,
        tls=True,
        coordinator_args=["--health-listen", f"127.0.0.1:{coord_health}"],
        silo_extra={"silo-0": {"health_listen": f"127.0.0.1:{silo_health}"}},
    )
    fed.start_coordinator()
    for s in SILOS:
        fed.start_silo(s, env={FAILPOINT_ENV: "stop-before:masked_input"} if s == VICTIM else None)
    fed.wait_for_silos(180)
    _only_health(coord_health)
    _only_health(silo_health)
    cfg = run_config(
        rounds=1,
        min_silos=4,
        round_deadline_s=300.0,
        local_steps=2,
        secagg=SecAggSettings(stage_deadline_s=8.0),
    )
    run_id = fed.start_run(cfg, "dropout")
    # the victim shared its keys, received its shares and stopped itself before masking
    fed.wait(lambda: fed.procs.stopped(VICTIM), 240, f"{VICTIM} stopped before its masked input")
    st = fed.status(run_id)
    assert st.secagg_stage == "masked_input", st
    fed.procs.kill9(VICTIM)
    final = fed.wait_run_done(run_id, 240)
    assert final.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    h = final.history[0]
    assert h.attempt == 1 and h.secure_aggregation
    assert (
        sorted(h.participants) == SILOS
        and sorted(h.reported) == SILOS[:4]
        and list(h.dropped) == [VICTIM]
    )
    store = Store(tmp_path / "coordinator" / "state.db")
    try:
        stages = {st.stage: st.silos for st in store.stages(run_id, 1, 1)}
    finally:
        store.close()
    assert stages["share_keys"] == tuple(SILOS) and stages["masked_input"] == tuple(SILOS[:4])
    # The sum the coordinator unmasked is the four survivors' weighted payloads, renormalised by
    # their summed weight: the simulation of those four silos alone, within the fixed-point bound.
    sim = secure_simulation(
        SimulationConfig(
            algorithm=cfg.algorithm,
            model=cfg.model,
            rounds=1,
            seed=cfg.seed,
            data=DataConfig(
                source="files",
                num_clients=4,
                train_files=tuple(str(silos[s][0]) for s in SILOS[:4]),
                test_files=tuple(str(silos[s][1]) for s in SILOS[:4]),
            ),
        ),
        roster_size=5,
    )  # F is chosen for the round's roster of 5, not for the survivors
    fed_global = CheckpointStore(tmp_path / "coordinator").read(run_id, 1)
    worst = max(float((fed_global[k] - sim.final_global[k]).abs().max()) for k in fed_global)
    print(f"dropout: max |federation - simulation of the 4 survivors| = {worst:.3g}")
    for name, value in fed_global.items():
        torch.testing.assert_close(value, sim.final_global[name], rtol=1e-5, atol=1e-6)


def test_a_silo_restarted_after_key_sharing_does_not_hold_the_round_to_its_deadline(
    tmp_path: Path,
    federation: Callable[..., Federation],
) -> None:
    """Killed after sharing its keys and restarted at once, the silo joins again: the round
    drops it from the attempt then, not at the 120 s stage deadline."""
    silos = {s: write_silo_data(tmp_path / "data" / s, k, 16) for k, s in enumerate(SILOS[:3])}
    victim = "silo-2"
    fed = federation(silos, tls=True)
    fed.start_coordinator()
    for s in silos:
        fed.start_silo(s, env={FAILPOINT_ENV: "stop-before:masked_input"} if s == victim else None)
    fed.wait_for_silos(180)
    stage_deadline_s = 120.0
    cfg = run_config(
        rounds=1,
        min_silos=2,
        round_deadline_s=300.0,
        local_steps=2,
        secagg=SecAggSettings(stage_deadline_s=stage_deadline_s),
    )
    run_id = fed.start_run(cfg, "restart")
    fed.wait(lambda: fed.procs.stopped(victim), 240, f"{victim} stopped before its masked input")
    fed.wait(lambda: fed.status(run_id).waiting_for == [victim], 60, f"the round waits on {victim}")
    st = fed.status(run_id)
    assert st.secagg_stage == "masked_input" and st.deadline_unix_ms > 0
    fed.procs.kill9(victim)
    t0 = time.monotonic()
    fed.start_silo(victim)  # at once, without the failpoint
    final = fed.wait_run_done(run_id, 240)
    waited = time.monotonic() - t0
    assert final.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    h = final.history[0]
    assert sorted(h.reported) == ["silo-0", "silo-1"] and list(h.dropped) == [victim]
    print(f"round done {waited:.1f} s after the restart (stage deadline {stage_deadline_s:.0f} s)")
    assert waited < stage_deadline_s / 2
