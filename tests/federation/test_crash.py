"""kill -9 of a silo mid-round and of the coordinator mid-run: real processes, loopback gRPC."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pf2lora.common.simulation import DataConfig, SimulationConfig
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.silo.state import SiloState, private_digest
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import (
    Federation,
    freeze_in_training,
    run_config,
    secure_simulation,
)
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow


def test_silo_killed_mid_round_round_completes_and_it_rejoins_bit_identical(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    silos = {f"silo-{k}": write_silo_data(tmp_path / "data" / f"silo-{k}", k, 32) for k in range(3)}
    fed = federation(silos)
    target = "silo-2"
    fed.start()
    fed.wait_for_silos()
    # a long enrollment window: round r + 1 waits for the restarted silo (all allowed silos are
    # expected)
    cfg = run_config(
        rounds=4, min_silos=2, round_deadline_s=20.0, enroll_window_s=60.0, local_steps=20
    )
    run_id = fed.start_run(cfg)
    r = freeze_in_training(fed, run_id, (2, 3), [target], "fetched")
    # the state this silo trains round r from, as it is on disk before the kill
    state = SiloState(tmp_path / target)
    before = state.private_tensors(run_id, r - 1)
    fed.procs.kill9(target)

    fed.wait(
        lambda: fed.status(run_id).completed_rounds >= r,
        90,
        f"round {r} completes without {target}",
    )
    h = fed.status(run_id).history[r - 1]
    assert target in h.participants and target not in h.reported
    assert sorted(h.reported) == ["silo-0", "silo-1"]

    proc = fed.start_silo(target)
    resume = tmp_path / target / "runs" / run_id / "resume.json"

    def resumed() -> bool:
        return resume.is_file() and json.loads(resume.read_text())["pid"] == proc.pid

    fed.wait(resumed, 120, f"{target} restarts and resumes")
    record = json.loads(resume.read_text())
    assert record["round"] == r - 1
    assert record["private_sha256"] == private_digest(before)  # what it loaded, in memory
    after = state.private_tensors(run_id, r - 1)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    final = fed.wait_run_done(run_id, 300)
    assert final.state == cpb.RUN_STATE_COMPLETED and final.completed_rounds == 4
    assert target in final.history[r].reported  # it took part in round r + 1
    assert target in {e.silo_id for e in final.evaluation}


def test_coordinator_killed_mid_run_resumes_at_last_completed_round(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    names = ["silo-0", "silo-1"]
    silos = {s: write_silo_data(tmp_path / "data" / s, k, 24 + 8 * k) for k, s in enumerate(names)}
    fed = federation(silos)
    fed.start()
    fed.wait_for_silos()
    cfg = run_config(
        rounds=3, min_silos=2, round_deadline_s=120.0, enroll_window_s=30.0, local_steps=20
    )
    run_id = fed.start_run(cfg)
    # freeze both silos mid-round so the round cannot complete, then kill the coordinator
    r = freeze_in_training(fed, run_id, (2, 3), names, "fetched")
    st = fed.status(run_id)
    assert st.completed_rounds == r - 1
    committed = {h.round: h.checkpoint_digest for h in st.history}
    fed.procs.kill9("coordinator")

    fed.start_coordinator()
    fed.wait(lambda: fed.status(run_id).state == cpb.RUN_STATE_RUNNING, 120, "coordinator back")
    st = fed.status(run_id)
    assert st.completed_rounds == r - 1 and st.current_round == r and st.attempt == 2
    assert {h.round: h.checkpoint_digest for h in st.history} == committed
    for s in names:
        fed.procs.signal(s, signal.SIGCONT)

    final = fed.wait_run_done(run_id, 300)
    assert final.state == cpb.RUN_STATE_COMPLETED and final.completed_rounds == 3, fed.procs.tails()
    assert final.history[r - 1].attempt == 2 and sorted(final.history[r - 1].reported) == names
    assert {h.round: h.checkpoint_digest for h in final.history if h.round < r} == committed
    fed.wait(lambda: not any(fed.procs.alive(s) for s in names), 60, "silos exit after the run")
    assert all(fed.procs.procs[s].returncode == 0 for s in names)
    # The interrupted round was retrained from the same silo states and securely aggregated again
    # in a new protocol instance: the result is the uninterrupted one, i.e. the in-process
    # simulation's with the sums secure aggregation reveals (fixed point for a 2-silo roster).
    sim = secure_simulation(
        SimulationConfig(
            algorithm=cfg.algorithm,
            model=cfg.model,
            rounds=cfg.rounds,
            seed=cfg.seed,
            data=DataConfig(
                source="files",
                num_clients=2,
                train_files=tuple(str(silos[s][0]) for s in names),
                test_files=tuple(str(silos[s][1]) for s in names),
            ),
        ),
        roster_size=2,
    )
    fed_global = CheckpointStore(tmp_path / "coordinator").read(run_id, 3)
    for name, value in fed_global.items():
        torch.testing.assert_close(value, sim.final_global[name], rtol=1e-5, atol=1e-6)
