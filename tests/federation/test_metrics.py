"""Prometheus metrics: the engine's hooks on a fake clock, separate registries, and both /metrics
endpoints
scraped over HTTP before, during and after a real loopback federation (coordinator + 2 silo
processes)."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.errors import ConfigError
from pf2lora.common.transport.metrics_http import split_listen, start_metrics_server
from pf2lora.common.wire.tasks import TrainTask
from pf2lora.coordinator.engine import Engine
from pf2lora.coordinator.metrics import SECAGG_STAGES, CoordinatorMetrics
from pf2lora.silo.metrics import SiloMetrics
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, free_port, run_config
from tests.helpers.inprocess import Clock, constant_state, fake_engine, plain_run_config
from tests.helpers.tiny import write_silo_data

Samples = dict[str, float]


def parse(text: str) -> Samples:
    """Prometheus text -> {'name{label="v",...}': value} (labels sorted; no labels: bare name)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        return parse(reply.read().decode())


# ------------------------------------------------------------- engine hooks (fake clock)

STATE = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}


def _engine(tmp_path: Path, clock: Clock, metrics: CoordinatorMetrics) -> Engine:
    eng = fake_engine(tmp_path, clock, constant_state(STATE), metrics=metrics)
    for s, n in zip("abc", (10, 20, 30), strict=True):
        eng.join(s, n, "test")
    return eng


def _push(eng: Engine, silo: str, task: TrainTask) -> None:
    payload = weighted_payload({k: torch.ones_like(v) for k, v in STATE.items()}, task.weight)
    eng.accept_update(silo, task.run.run_id, task.round, task.attempt, payload, b"\x01" * 32)


def _sealed_tasks(eng: Engine) -> dict[str, TrainTask]:
    for s in "abc":
        eng.get_task(s)
    tasks = {s: eng.get_task(s) for s in "abc"}
    assert all(isinstance(t, TrainTask) for t in tasks.values())
    return tasks  # type: ignore[return-value]


def test_engine_hooks_count_rounds_durations_participants_dropouts_and_reopenings(
    tmp_path: Path,
) -> None:
    clock, m = Clock(), CoordinatorMetrics()
    eng = _engine(tmp_path, clock, m)
    eng.start_run(plain_run_config())  # plain updates pushed here
    value = m.registry.get_sample_value
    assert (
        value("pf2lora_coordinator_run_active") == 1
        and value("pf2lora_coordinator_current_round") == 1
    )

    # Round 1, attempt 1: only "a" reports by the deadline (< min_silos): re-opened, 2 dropouts.
    tasks = _sealed_tasks(eng)
    assert value("pf2lora_coordinator_round_participants") == 3
    _push(eng, "a", tasks["a"])
    clock.t += 61
    eng.tick()
    assert value("pf2lora_coordinator_rounds_reopened_total") == 1
    assert value("pf2lora_coordinator_dropouts_total") == 2
    assert value("pf2lora_coordinator_rounds_completed_total") == 0

    # Attempt 2: everyone reports after 7 s of (fake) time.
    tasks = _sealed_tasks(eng)
    clock.t += 7
    for s in "abc":
        _push(eng, s, tasks[s])
    assert value("pf2lora_coordinator_rounds_completed_total") == 1
    assert value("pf2lora_coordinator_round_duration_seconds_sum") == pytest.approx(7.0)
    assert value("pf2lora_coordinator_round_duration_seconds_bucket", {"le": "10.0"}) == 1
    assert value("pf2lora_coordinator_updates_accepted_total") == 4
    assert value("pf2lora_coordinator_current_round") == 2

    # Round 2: "c" misses the deadline, the round closes with a and b: one more dropout.
    tasks = _sealed_tasks(eng)
    _push(eng, "a", tasks["a"])
    _push(eng, "b", tasks["b"])
    clock.t += 61
    eng.tick()
    assert value("pf2lora_coordinator_rounds_completed_total") == 2
    assert value("pf2lora_coordinator_dropouts_total") == 3
    assert value("pf2lora_coordinator_round_duration_seconds_count") == 2
    eng.stop_run(eng.active_run_id())
    assert (
        value("pf2lora_coordinator_run_active") == 0
        and value("pf2lora_coordinator_current_round") == 0
    )


def test_secagg_stage_hook_and_separate_registries() -> None:
    a, b = CoordinatorMetrics(), CoordinatorMetrics()  # no "Duplicated timeseries": own registries
    SiloMetrics(), SiloMetrics()
    with a.secagg_stage("share_keys"):
        pass
    a.observe_secagg_stage("unmask", 0.25)
    get = a.registry.get_sample_value
    assert (
        get("pf2lora_coordinator_secagg_stage_duration_seconds_count", {"stage": "share_keys"}) == 1
    )
    assert get("pf2lora_coordinator_secagg_stage_duration_seconds_sum", {"stage": "unmask"}) == 0.25
    for stage in SECAGG_STAGES:  # every stage has a series from the start
        assert (
            b.registry.get_sample_value(
                "pf2lora_coordinator_secagg_stage_duration_seconds_count", {"stage": stage}
            )
            == 0
        )
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("pf2lora")]


def test_listen_addresses_and_a_busy_port() -> None:
    assert split_listen("0.0.0.0:9100") == ("0.0.0.0", 9100)
    assert split_listen(":9100") == ("0.0.0.0", 9100)
    assert split_listen("[::1]:0") == ("::1", 0)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        split_listen("9100")
    m = SiloMetrics()
    server = start_metrics_server("127.0.0.1:0", m.registry)
    try:
        m.evaluated({"personal_accuracy": 0.75, "shared_accuracy": 0.5})
        got = scrape(server.port)
        assert (
            got["pf2lora_silo_personal_accuracy"] == 0.75
            and got["pf2lora_silo_evaluations_total"] == 1
        )
        with pytest.raises(ConfigError, match="cannot listen"):
            start_metrics_server(f"127.0.0.1:{server.port}", m.registry)
    finally:
        server.stop()


# ------------------------------------------------- a real loopback federation, scraped over HTTP

SILOS = ("silo-0", "silo-1")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("metrics")
    silos = {s: write_silo_data(root / "data" / s, k, 16) for k, s in enumerate(SILOS)}
    ports = {name: free_port() for name in ("coordinator", *SILOS)}
    extra = {s: {"metrics_listen": f"127.0.0.1:{ports[s]}", "exit_after_run": False} for s in SILOS}
    fed = Federation(
        root,
        silos,
        silo_extra=extra,
        coordinator_args=["--metrics-listen", f"127.0.0.1:{ports['coordinator']}"],
    )
    try:
        fed.start()
        fed.wait_for_silos()
        yield SimpleNamespace(fed=fed, ports=ports)
    finally:
        fed.close()


@pytest.mark.slow
def test_endpoints_move_during_a_real_federation(federation: SimpleNamespace) -> None:
    fed, ports = federation.fed, federation.ports
    before = {name: scrape(port) for name, port in ports.items()}
    c0 = before["coordinator"]
    assert c0["pf2lora_coordinator_rounds_completed_total"] == 0
    assert (
        c0["pf2lora_coordinator_received_bytes_total"] == 0
        and c0["pf2lora_coordinator_run_active"] == 0
    )
    assert any(k.startswith('pf2lora_coordinator_info{federation="pf2lora",version=') for k in c0)
    for s in SILOS:
        assert before[s]["pf2lora_silo_train_seconds_count"] == 0
        assert before[s]["pf2lora_silo_rounds_participated_total"] == 0
        assert before[s]["pf2lora_silo_evaluations_total"] == 0

    cfg = run_config(rounds=2, min_silos=2, local_steps=2)
    run_id = fed.start_run(cfg, "metrics")
    fed.wait(lambda: fed.status(run_id).completed_rounds >= 1, 300, "round 1 completes")
    during = scrape(ports["coordinator"])
    assert during["pf2lora_coordinator_rounds_completed_total"] >= 1
    assert during["pf2lora_coordinator_received_bytes_total"] > 0
    assert during["pf2lora_coordinator_sent_bytes_total"] > 0

    status = fed.wait_run_done(run_id, timeout=300)
    assert status.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    after = {name: scrape(port) for name, port in ports.items()}
    c = after["coordinator"]
    assert c["pf2lora_coordinator_rounds_completed_total"] == 2
    assert c["pf2lora_coordinator_round_duration_seconds_count"] == 2
    assert c["pf2lora_coordinator_round_duration_seconds_sum"] > 0
    assert c["pf2lora_coordinator_round_participants"] == 2
    assert c["pf2lora_coordinator_updates_accepted_total"] == 4
    assert c["pf2lora_coordinator_dropouts_total"] == 0
    assert c["pf2lora_coordinator_run_active"] == 0
    if during["pf2lora_coordinator_rounds_completed_total"] == 1:  # scraped mid-run (usually)
        # Round 2 streamed more: 2 updates in, the globals of rounds 1 and 2 out.
        for name in ("received", "sent"):
            key = f"pf2lora_coordinator_{name}_bytes_total"
            assert c[key] > during[key]

    evaluation = {e.silo_id: dict(e.metrics) for e in status.evaluation}
    for s in SILOS:
        m = after[s]
        assert (
            m["pf2lora_silo_train_seconds_count"] == 2 and m["pf2lora_silo_train_seconds_sum"] > 0
        )
        assert m['pf2lora_silo_transfer_seconds_count{direction="push"}'] == 2
        assert (
            m["pf2lora_silo_rounds_participated_total"] == 2 and m["pf2lora_silo_last_round"] == 2
        )
        assert m["pf2lora_silo_train_loss"] > 0
        assert m["pf2lora_silo_evaluations_total"] == 1
        # The accuracy gauges hold exactly what the silo reported to the coordinator.
        assert m["pf2lora_silo_personal_accuracy"] == pytest.approx(
            evaluation[s]["personal_accuracy"]
        )
        assert m["pf2lora_silo_shared_accuracy"] == pytest.approx(evaluation[s]["shared_accuracy"])
        assert any(k.startswith("pf2lora_silo_info{") and f'silo="{s}"' in k for k in m)
