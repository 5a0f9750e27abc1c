"""A silo of two processes under torchrun (gloo) in a real federation: it trains its rounds, a
killed rank fails the silo's round without sending anything, and the restarted silo resumes."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, run_config
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker of that rank (LOCAL_RANK in its environment)."""
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under pid {launcher}")


def test_two_process_silo_trains_and_a_killed_rank_fails_only_its_round(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    silos = {f"silo-{k}": write_silo_data(tmp_path / "data" / f"silo-{k}", k, 32) for k in range(3)}
    fed = federation(silos)
    target = "silo-0"
    fed.start_coordinator()
    fed.start_silo("silo-1")
    fed.start_silo("silo-2")
    launcher = fed.start_silo(target, processes=2)
    fed.wait_for_silos(timeout=240)
    cfg = run_config(
        rounds=4, min_silos=2, round_deadline_s=20.0, enroll_window_s=60.0, local_steps=20
    )
    run_id = fed.start_run(cfg)

    def training(r: int) -> bool:
        st = fed.status(run_id)
        mine = {p.silo_id: p.state for p in st.participants}
        return st.current_round == r and mine.get(target) == "fetched"

    # round 1 with both ranks, then kill rank 1 as soon as round 2's global state is fetched
    fed.wait(lambda: fed.status(run_id).completed_rounds >= 1, 240, "round 1")
    assert target in fed.status(run_id).history[0].reported
    resume = tmp_path / target / "runs" / run_id / "resume.json"
    first_pid = json.loads(resume.read_text())["pid"]  # rank 0's: it alone writes state
    assert first_pid != launcher.pid
    fed.wait(lambda: training(2), 120, f"{target} training round 2", poll=0.01)
    os.kill(_rank_pid(launcher.pid, 1), signal.SIGKILL)
    launcher.wait(timeout=120)
    assert launcher.returncode != 0  # torchrun stops the silo when one of its ranks dies
    log = fed.procs.tail(target, 400)
    assert "rank 1 of 2: following rank 0" in log
    assert "start the silo again (all its processes)" in log  # rank 0 said why it stopped
    fed.wait(lambda: fed.status(run_id).completed_rounds >= 2, 120, "round 2 without it")
    assert target not in fed.status(run_id).history[1].reported

    # started again, both ranks resume from the last saved round and finish the run
    restarted = fed.start_silo(target, processes=2)

    def resumed() -> bool:
        return json.loads(resume.read_text())["pid"] not in (first_pid, restarted.pid)

    fed.wait(resumed, 240, f"{target} restarts and resumes")
    final = fed.wait_run_done(run_id, 300)
    assert final.state == cpb.RUN_STATE_COMPLETED and final.completed_rounds == 4
    assert any(target in h.reported for h in final.history[2:])
    assert target in {e.silo_id for e in final.evaluation}
    fed.wait(lambda: restarted.poll() is not None, 120, f"{target} exits after the run")
    assert restarted.returncode == 0, fed.procs.tail(target)
