"""Round engine, SQLite store and checkpoints, driven by events and a fake clock (no gRPC, no
model).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.errors import (
    ConfigError,
    DataError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from pf2lora.common.privacy.config import DPConfig
from pf2lora.common.runspec import RunConfig, from_json, to_json
from pf2lora.common.wire.tasks import EvaluateTask, IdleTask, StopTask, TrainTask
from pf2lora.coordinator.checkpoints import CheckpointStore, state_digest
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.status import list_silos, round_manifest, run_status
from pf2lora.coordinator.store import Store
from pf2lora.coordinator.transitions import RESTART_GRACE_S
from pf2lora.coordinator.views import Phase
from tests.helpers.inprocess import Clock, fake_engine, plain_run_config

INITIAL = {
    "layer.lora_A.weight": torch.arange(8, dtype=torch.float32).reshape(2, 4),
    "layer.lora_B.weight": torch.zeros(4, 2),
}


def initial_state(algorithm, model, seed):  # noqa: ANN001, ANN201
    return {k: v.clone() + seed for k, v in INITIAL.items()}


def make_engine(tmp_path: Path, clock: Clock, allowed=("a", "b", "c")) -> Engine:  # noqa: ANN001
    return fake_engine(tmp_path, clock, initial_state, allowed=allowed)


run_cfg = plain_run_config


def update(value: float, weight: float) -> dict[str, torch.Tensor]:
    return weighted_payload({k: torch.full_like(v, value) for k, v in INITIAL.items()}, weight)


def join_all(engine: Engine, silos=("a", "b", "c"), samples=(10, 30, 60)) -> None:  # noqa: ANN001
    for s, n in zip(silos, samples, strict=True):
        engine.join(s, n, "test")


def push(engine: Engine, silo: str, task: TrainTask, value: float) -> None:
    engine.expected_update(silo, task.run.run_id, task.round, task.attempt)
    engine.accept_update(
        silo, task.run.run_id, task.round, task.attempt, update(value, task.weight), b"\x01" * 32
    )


def two_of_three_report(engine: Engine, clock: Clock) -> dict[str, TrainTask]:
    """Silos a, b, c enrol in round 1; a and b send (1.0, 3.0); the deadline passes."""
    for s in "abc":
        engine.get_task(s)
    tasks = {s: engine.get_task(s) for s in "abc"}
    push(engine, "a", tasks["a"], 1.0)
    push(engine, "b", tasks["b"], 3.0)
    clock.t += 61
    engine.tick()
    return tasks  # type: ignore[return-value]


# ----------------------------------------------------------------------------- store


def test_store_schema_is_versioned(tmp_path: Path) -> None:
    Store(tmp_path / "s.db").close()
    Store(tmp_path / "s.db").close()  # reopening is fine
    db = sqlite3.connect(tmp_path / "s.db")
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ConfigError, match="schema 99"):
        Store(tmp_path / "s.db")


def test_store_uses_wal(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    mode = store._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


# ------------------------------------------------------------------------ checkpoints


def test_checkpoint_roundtrip_digest_and_orphans(tmp_path: Path) -> None:
    ck = CheckpointStore(tmp_path)
    path, digest = ck.write("r1", 3, INITIAL, {"x": 1})
    assert path.name == "global-00003.safetensors"
    assert digest == state_digest(INITIAL)
    got = ck.read("r1", 3, digest)
    assert list(got) == sorted(INITIAL)
    assert all(torch.equal(got[k], INITIAL[k]) for k in INITIAL)
    with pytest.raises(DataError, match="does not match"):
        ck.read("r1", 3, "00" * 32)
    ck.write("r1", 4, INITIAL, {})
    assert ck.remove_after("r1", 3) == [ck.path("r1", 4)]
    assert ck.rounds_on_disk("r1") == [3]
    with pytest.raises(DataError, match="missing"):
        ck.read("r1", 9)


# ----------------------------------------------------------------------------- engine


def test_full_run_weighted_mean_evaluation_and_stop(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg())
    assert isinstance(eng.get_task("a"), IdleTask)  # enrolled, waiting for b and c
    assert isinstance(eng.get_task("b"), IdleTask)
    task_c = eng.get_task("c")  # the last allowed silo seals the round at once
    assert isinstance(task_c, TrainTask)
    tasks = {s: eng.get_task(s) for s in ("a", "b")} | {"c": task_c}
    assert [round(t.weight, 6) for t in tasks.values()] == [0.1, 0.3, 0.6]  # n_k / sum n
    assert [t.client_index for t in tasks.values()] == [0, 1, 2]  # sorted allow-list
    state, digest = eng.global_state("a", run_id, 0)
    assert digest == tasks["a"].global_digest == state_digest(state)
    for s, v in zip("abc", (1.0, 2.0, 3.0), strict=True):
        push(eng, s, tasks[s], v)
    # round 1 complete: the weighted mean 0.1*1 + 0.3*2 + 0.6*3 = 2.5
    g1, _ = eng.global_state("a", run_id, 1)
    assert torch.allclose(g1["layer.lora_A.weight"], torch.full((2, 4), 2.5))
    for s in "abc":
        eng.get_task(s)
    tasks = {s: eng.get_task(s) for s in "abc"}
    assert all(isinstance(t, TrainTask) and t.round == 2 for t in tasks.values())
    for s in "abc":
        push(eng, s, tasks[s], 1.0)
    ev = eng.get_task("a")
    assert isinstance(ev, EvaluateTask) and ev.round == 2
    for s in "abc":
        eng.report_metrics(s, run_id, 2, "evaluate", {"personal_accuracy": 0.5})
    view = run_status(eng, run_id)
    assert view.state == "completed" and view.phase is Phase.DONE and view.completed_rounds == 2
    assert len(view.evaluation) == 3 and [h.round for h in view.history] == [1, 2]
    assert isinstance(eng.get_task("a", run_id), StopTask)
    assert isinstance(eng.get_task("a"), IdleTask)
    manifest = round_manifest(eng, run_id, 1)
    assert manifest.digest == state_digest(g1) and len(manifest.updates) == 3
    assert {s.silo_id for s in list_silos(eng)} == {"a", "b", "c"}


def test_deadline_closes_without_a_silent_silo_and_refuses_its_late_update(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg(rounds=1))
    tasks = two_of_three_report(eng, clock)
    view = run_status(eng, run_id)
    assert view.completed_rounds == 1 and view.history[0].reported == ("a", "b")
    g, _ = eng.global_state("a", run_id, 1)
    # mean over the reporting silos: (0.1*1 + 0.3*3) / 0.4 = 2.5
    assert torch.allclose(g["layer.lora_A.weight"], torch.full((2, 4), 2.5))
    with pytest.raises(FailedPrecondition, match="round 1 refused"):
        push(eng, "c", tasks["c"], 5.0)


def test_a_dp_round_with_fewer_updates_than_dp_min_silos_is_not_released(tmp_path: Path) -> None:
    """Each DP update carries 1/dp.min_silos of the noise's variance: a sum of fewer updates is
    under-noised, so the deadline re-opens the round instead of releasing it, although the
    run's own min_silos (1) is met. Two guards: the round needs dp.min_silos updates
    (RunConfig.round_min_silos), and the DP aggregate refuses a shorter sum (DataError)."""
    dp = DPConfig(enabled=True, clip=1.0, noise_multiplier=1.0, min_silos=3)
    for with_dp in (False, True):
        clock = Clock()
        eng = make_engine(tmp_path / str(with_dp), clock)
        join_all(eng)
        algorithm = AlgorithmConfig(dp=dp if with_dp else DPConfig())
        run_id = eng.start_run(run_cfg(rounds=1, min_silos=1, algorithm=algorithm))
        two_of_three_report(eng, clock)
        view = run_status(eng, run_id)
        if with_dp:
            assert view.completed_rounds == 0 and not view.history
            assert view.phase is Phase.ENROLLING and view.attempt == 2
        else:  # the same two updates release the round without DP
            assert view.completed_rounds == 1 and view.history[0].reported == ("a", "b")


def test_too_few_updates_reopen_the_round_and_refuse_the_old_attempt(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg(rounds=1))
    for s in "abc":
        eng.get_task(s)
    old = {s: eng.get_task(s) for s in "abc"}
    push(eng, "a", old["a"], 1.0)
    clock.t += 61
    eng.tick()
    view = run_status(eng, run_id)
    assert view.phase is Phase.ENROLLING and view.attempt == 2 and view.completed_rounds == 0
    with pytest.raises(FailedPrecondition, match="attempt 1"):
        push(eng, "b", old["b"], 1.0)
    for s in "abc":
        eng.get_task(s)
    new = eng.get_task("b")
    assert isinstance(new, TrainTask) and new.attempt == 2


def test_enrollment_window_seals_with_min_silos(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    eng.start_run(run_cfg())
    assert isinstance(eng.get_task("a"), IdleTask)
    assert isinstance(eng.get_task("b"), IdleTask)
    clock.t += 4
    eng.tick()
    assert isinstance(eng.get_task("a"), IdleTask)
    clock.t += 2
    eng.tick()
    task = eng.get_task("a")
    assert isinstance(task, TrainTask) and task.weight == pytest.approx(10 / 40)
    assert isinstance(eng.get_task("c"), IdleTask)  # late: waits for the next round


def test_refusals_change_nothing(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng, ("a", "b"), (10, 10))
    with pytest.raises(PermissionDenied):
        eng.join("mallory", 10, "x")
    with pytest.raises(FailedPrecondition, match="Join first"):
        eng.get_task("c")
    with pytest.raises(InvalidArgument):
        eng.join("c", 0, "x")
    run_id = eng.start_run(run_cfg(min_silos=2))
    clock.t += 10
    eng.get_task("a")
    eng.get_task("b")
    eng.tick()
    ta = eng.get_task("a")
    before = eng.store.dump()
    bad = [
        ("a", run_id, 2, ta.attempt),  # wrong round
        ("a", run_id, 0, ta.attempt),  # stale round
        ("a", "other-run", 1, ta.attempt),  # unknown run
        ("a", run_id, 1, ta.attempt + 1),  # wrong attempt
    ]
    for silo, rid, rnd, att in bad:
        with pytest.raises(FailedPrecondition):
            eng.expected_update(silo, rid, rnd, att)
    with pytest.raises(PermissionDenied):
        eng.expected_update("mallory", run_id, 1, ta.attempt)
    with pytest.raises(InvalidArgument):
        eng.accept_update("a", run_id, 1, ta.attempt, {"x": torch.zeros(1)}, b"")
    assert eng.store.dump() == before
    push(eng, "a", ta, 1.0)
    after_first = eng.store.dump()
    with pytest.raises(FailedPrecondition, match="already sent"):
        push(eng, "a", ta, 1.0)
    assert eng.store.dump() == after_first


def test_start_while_active_and_stop(tmp_path: Path) -> None:
    eng = make_engine(tmp_path, Clock())
    run_id = eng.start_run(run_cfg(), "first")
    assert run_id == "first"
    with pytest.raises(FailedPrecondition, match="active"):
        eng.start_run(run_cfg())
    eng.stop_run(run_id, "enough")
    assert run_status(eng).state == "stopped"
    with pytest.raises(FailedPrecondition, match="stopped already"):
        eng.stop_run(run_id)
    with pytest.raises(NotFound):
        run_status(eng, "nope")
    with pytest.raises(InvalidArgument):
        eng.start_run(run_cfg(min_silos=4))  # only 3 allowed


def test_restart_resumes_at_the_last_committed_round(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg(rounds=3))
    for s in "abc":
        eng.get_task(s)
    tasks = {s: eng.get_task(s) for s in "abc"}
    for s in "abc":
        push(eng, s, tasks[s], 2.0)
    for s in "abc":
        eng.get_task(s)
    tasks = {s: eng.get_task(s) for s in "abc"}
    push(eng, "a", tasks["a"], 7.0)  # round 2 in flight
    g1_digest = run_status(eng, run_id).history[0].checkpoint_digest
    # a crash after a checkpoint file was written but before its commit leaves an orphan
    eng.checkpoints.write(run_id, 2, INITIAL, {})
    eng.store.close()

    eng2 = make_engine(tmp_path, clock)
    view = run_status(eng2, run_id)
    assert view.state == "running" and view.completed_rounds == 1
    assert view.current_round == 2 and view.attempt == 2 and view.phase is Phase.ENROLLING
    assert eng2.checkpoints.rounds_on_disk(run_id) == [0, 1]
    with pytest.raises(FailedPrecondition, match="attempt 1"):
        push(eng2, "b", tasks["b"], 7.0)
    for s in "abc":
        eng2.get_task(s)
    tasks = {s: eng2.get_task(s) for s in "abc"}
    assert all(t.round == 2 and t.global_digest == g1_digest for t in tasks.values())
    for s in "abc":
        push(eng2, s, tasks[s], 1.0)
    for s in "abc":
        eng2.get_task(s)
    for s in "abc":
        push(eng2, s, eng2.get_task(s), 1.0)
    assert isinstance(eng2.get_task("a"), EvaluateTask)


def test_restart_with_a_damaged_checkpoint_fails_the_run_loudly(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    run_id = eng.start_run(run_cfg())
    eng.store.close()
    eng.checkpoints.path(run_id, 0).write_bytes(b"garbage")
    eng2 = make_engine(tmp_path, clock)
    view = run_status(eng2, run_id)
    assert view.state == "failed" and "cannot resume" in view.reason


def test_run_config_json_roundtrip() -> None:
    cfg = run_cfg(algorithm=AlgorithmConfig(name="homlora"))
    assert from_json(RunConfig, to_json(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown key"):
        from_json(RunConfig, '{"roundz": 3}')
    with pytest.raises(ConfigError, match="min_silos"):
        RunConfig(min_silos=0)


def test_after_a_restart_the_reopened_round_waits_a_little_for_its_silos(tmp_path: Path) -> None:
    """Silos reconnect a few seconds after a coordinator restart: the re-opened round's
    enrolment does not seal without the last round's silos until enroll_window + grace."""
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    eng.start_run(run_cfg(rounds=3, min_silos=2, enroll_window_s=5.0))
    for s in "abc":
        eng.get_task(s)
    for s, t in {s: eng.get_task(s) for s in "abc"}.items():
        push(eng, s, t, 1.0)  # round 1 committed with a, b and c
    eng.store.close()

    eng2 = make_engine(tmp_path, clock)  # the restart: round 2 opens again
    eng2.get_task("a")
    eng2.get_task("b")
    clock.t += 6.0  # past enroll_window_s: without c it would seal now
    assert isinstance(eng2.get_task("a"), IdleTask)
    assert run_status(eng2, "").phase is Phase.ENROLLING
    eng2.get_task("c")  # c is back: everyone expected enrolled
    assert isinstance(eng2.get_task("c"), TrainTask)
    assert sorted(p.silo_id for p in run_status(eng2, "").participants) == ["a", "b", "c"]


def test_the_grace_ends_and_the_round_goes_on_without_a_silo_that_stays_away(
    tmp_path: Path,
) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    eng.start_run(run_cfg(rounds=3, min_silos=2, enroll_window_s=5.0))
    for s in "abc":
        eng.get_task(s)
    for s, t in {s: eng.get_task(s) for s in "abc"}.items():
        push(eng, s, t, 1.0)
    eng.store.close()
    eng2 = make_engine(tmp_path, clock)
    eng2.get_task("a")
    eng2.get_task("b")
    clock.t += 5.0 + RESTART_GRACE_S + 0.1
    eng2.tick()
    assert sorted(p.silo_id for p in run_status(eng2, "").participants) == ["a", "b"]


def test_run_status_names_the_silos_the_round_waits_for(tmp_path: Path) -> None:
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng, silos=("a", "b"), samples=(10, 30))
    run_id = eng.start_run(run_cfg(rounds=1))
    eng.get_task("a")
    assert run_status(eng, run_id).waiting_for == ("b", "c")  # enrolment: c never joined
    eng.get_task("b")
    clock.t += 61
    eng.tick()  # enrolment window over: the round trains with a and b
    tasks = {s: eng.get_task(s) for s in "ab"}
    assert run_status(eng, run_id).waiting_for == ("a", "b")
    push(eng, "a", tasks["a"], 1.0)
    assert run_status(eng, run_id).waiting_for == ("b",)


def test_an_older_checkpoint_is_verified_when_served(tmp_path: Path) -> None:
    """A silo resuming from an earlier round fetches that round's state: a changed file is
    refused with its name, never served."""
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg(rounds=3))
    for _ in range(2):
        for s in "abc":
            eng.get_task(s)
        tasks = {s: eng.get_task(s) for s in "abc"}
        for s in "abc":
            push(eng, s, tasks[s], 2.0)
    assert run_status(eng, run_id).completed_rounds == 2
    older = eng.checkpoints.path(run_id, 1)
    eng.checkpoints.write(run_id, 1, {k: v + 1 for k, v in INITIAL.items()}, {})  # altered
    eng.store.close()
    eng2 = make_engine(tmp_path, clock)  # a restart: nothing cached
    with pytest.raises(DataError, match=f"{older}.*does not match the digest"):
        eng2.global_state("a", run_id, 1)
    assert run_status(eng2, run_id).completed_rounds == 2  # the latest is intact: run goes on


def test_a_refusing_silo_is_not_waited_for_and_shows_in_the_status(tmp_path: Path) -> None:
    """Refused while enrolled: enrolment seals with the others at once; refused while a
    participant of a plain round: the round completes when the others have reported; its
    tasks are idle until it joins again."""
    clock = Clock()
    eng = make_engine(tmp_path, clock)
    join_all(eng)
    run_id = eng.start_run(run_cfg(rounds=2, min_silos=1, enroll_window_s=600.0))
    eng.get_task("c")  # c enrols, then finds its model differs
    eng.refuse_run("c", run_id, "model differs:\n config.json differs")
    assert isinstance(eng.get_task("a"), IdleTask)
    task_b = eng.get_task("b")  # a and b are everyone left: sealed without the window
    assert isinstance(task_b, TrainTask) and task_b.round == 1
    idle = eng.get_task("c")
    assert isinstance(idle, IdleTask) and "config.json differs" in idle.reason
    view = run_status(eng, run_id)
    assert [(s, why) for s, why, _ in view.refused] == [("c", "model differs: config.json differs")]
    task_a = eng.get_task("a")
    push(eng, "a", task_a, 1.0)
    # round 2: b refuses after it got its task; a's update alone completes the round
    push(eng, "b", task_b, 1.0)
    for s in "ab":
        eng.get_task(s)
    tasks = {s: eng.get_task(s) for s in "ab"}
    assert all(isinstance(t, TrainTask) and t.round == 2 for t in tasks.values())
    eng.refuse_run("b", run_id, "local training diverged")
    push(eng, "a", tasks["a"], 2.0)
    assert isinstance(eng.get_task("a"), EvaluateTask)
    assert eng.store.run(run_id).completed_rounds == 2
    # a new session of c may take part again (in the next run's rounds)
    eng.join("c", 60, "test")
    assert "c" not in {s for s, _, _ in run_status(eng, run_id).refused}
