"""The coordinator's gRPC services driven directly: every bad input refused with its status and no
state change (under mutual TLS with certificates from common/transport/pki.py), and a 200 MB adapter
through
the real FetchGlobal/PushUpdate path.

The coordinator runs in this process (Coordinator from coordinator/server.py, real gRPC servers on
loopback ports) with an injected initial shared state instead of a model: these tests exercise the
wire, the servicers and the engine, not training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import torch

from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.runspec import RunConfig, to_json
from pf2lora.common.transport import grpc_factory, pki, pki_files
from pf2lora.common.wire import streams
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.server import Coordinator
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc, silo_pb2, silo_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb
from tests.helpers.inprocess import channel, constant_state, coordinator_config, status_of

FED = "testfed"
SILOS = ("silo-a", "silo-b", "silo-c")
INITIAL = {
    "enc.query.lora_A.weight": torch.linspace(-1, 1, 32).reshape(4, 8),
    "enc.query.lora_B.weight": torch.zeros(8, 4),
    "classifier.weight": torch.ones(2, 8),
}
Code = grpc.StatusCode


@pytest.fixture
def tls_federation(tmp_path: Path, pki_factory: Callable[..., Path]) -> Iterator[SimpleNamespace]:
    pki_dir = pki_factory(FED, (*SILOS, "mallory"))
    state = tmp_path / "coordinator"
    coord = Coordinator(
        coordinator_config(state, FED, SILOS, tls_dir=pki_files.coordinator_dir(pki_dir)),
        initial_state=constant_state(INITIAL),
    )
    coord.start()
    channels = {
        s: channel(coord.ports["silo_api"], pki_files.silo_dir(pki_dir, s))
        for s in (*SILOS, "mallory")
    }
    admin = channel(coord.ports["control_api"], pki_files.admin_dir(pki_dir, "ops"))
    silo_on_control = channel(coord.ports["control_api"], pki_files.silo_dir(pki_dir, "silo-a"))
    try:
        yield SimpleNamespace(
            coord=coord,
            state=state,
            pki=pki_dir,
            silo={s: silo_pb2_grpc.SiloApiStub(c) for s, c in channels.items()},
            control=control_pb2_grpc.ControlApiStub(admin),
            silo_as_admin=control_pb2_grpc.ControlApiStub(silo_on_control),
        )
    finally:
        for c in (*channels.values(), admin, silo_on_control):
            c.close()
        coord.stop(grace=0)


def _snapshot(env: SimpleNamespace) -> tuple[object, list[tuple[str, str]]]:
    """Every DB row (but last-seen times) and every checkpoint file's hash."""
    files = sorted(
        (str(p.relative_to(env.state)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in env.state.rglob("*")
        if p.is_file() and not p.name.startswith("state.db")
    )
    return env.coord.store.dump(), files


def _payload(task: silo_pb2.Task, value: float = 1.0) -> dict[str, torch.Tensor]:
    return weighted_payload(
        {k: torch.full_like(v, value) for k, v in INITIAL.items()}, task.train.weight
    )


def _stream(
    task: silo_pb2.Task, silo: str, tensors: dict[str, torch.Tensor], **kw: object
) -> list[tpb.StreamMessage]:
    args: dict[str, object] = dict(
        run_id=task.run_id,
        round=task.round,
        kind=streams.StreamKind.UPDATE,
        silo_id=silo,
        scalars={"attempt": task.train.attempt},
    )
    args.update(kw)
    return list(streams.tensors_to_stream(tensors, **args))  # type: ignore[arg-type]


def test_every_bad_input_is_refused_with_its_status_and_changes_nothing(
    tls_federation: SimpleNamespace,
) -> None:
    env = tls_federation
    silo = env.silo
    # the control API admits admin certificates only
    assert (
        status_of(lambda: env.silo_as_admin.ListSilos(cpb.ListSilosRequest(), timeout=10))
        == Code.PERMISSION_DENIED
    )
    # plain updates (secure rounds' messages: tests/integration/test_secure_round.py)
    cfg = RunConfig(
        model=ModelConfig(path="unused"),
        rounds=2,
        min_silos=2,
        enroll_window_s=30.0,
        secure_aggregation=False,
    )
    run_id = env.control.StartRun(
        cpb.StartRunRequest(run_config_json=to_json(cfg), run_id="r1"), timeout=30
    ).run_id
    for s in SILOS:
        silo[s].Join(
            silo_pb2.JoinRequest(silo_id=s, num_samples=10 * (SILOS.index(s) + 1)), timeout=10
        )
    for s in SILOS:
        silo[s].GetTask(silo_pb2.GetTaskRequest(silo_id=s, wait_ms=10), timeout=10)
    tasks = {s: silo[s].GetTask(silo_pb2.GetTaskRequest(silo_id=s), timeout=10) for s in SILOS}
    assert all(t.WhichOneof("body") == "train" for t in tasks.values())
    ta = tasks["silo-a"]
    good = _payload(ta)

    def push(s: str, msgs: list[tpb.StreamMessage]) -> Callable[[], object]:
        return lambda: silo[s].PushUpdate(iter(msgs), timeout=30)

    def tamper(msgs: list[tpb.StreamMessage]) -> list[tpb.StreamMessage]:
        out = [tpb.StreamMessage() for _ in msgs]
        for o, m in zip(out, msgs, strict=True):
            o.CopyFrom(m)
        chunk = next(o for o in out if o.WhichOneof("body") == "chunk")
        data = bytearray(chunk.chunk.data)
        data[0] ^= 0xFF
        chunk.chunk.data = bytes(data)
        return out

    def renamed() -> dict[str, torch.Tensor]:
        p = dict(good)
        p["enc.query.lora_A.private.weight"] = p.pop("enc.query.lora_A.weight")
        return p

    nan = dict(good, **{"classifier.weight": torch.full((2, 8), float("nan"))})
    inf = dict(good, **{"classifier.weight": torch.full((2, 8), float("inf"))})
    cases: list[tuple[str, Callable[[], object], grpc.StatusCode]] = [
        (
            "unknown tensor name",
            push("silo-a", _stream(ta, "silo-a", renamed())),
            Code.INVALID_ARGUMENT,
        ),
        (
            "extra tensor",
            push("silo-a", _stream(ta, "silo-a", dict(good, extra=torch.ones(3)))),
            Code.INVALID_ARGUMENT,
        ),
        (
            "missing tensor",
            push(
                "silo-a",
                _stream(ta, "silo-a", {k: v for k, v in good.items() if k != "classifier.weight"}),
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "wrong shape",
            push(
                "silo-a",
                _stream(ta, "silo-a", dict(good, **{"classifier.weight": torch.ones(8, 2)})),
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "wrong dtype",
            push("silo-a", _stream(ta, "silo-a", {k: v.double() for k, v in good.items()})),
            Code.INVALID_ARGUMENT,
        ),
        ("bad digest", push("silo-a", tamper(_stream(ta, "silo-a", good))), Code.INVALID_ARGUMENT),
        ("NaN", push("silo-a", _stream(ta, "silo-a", nan)), Code.INVALID_ARGUMENT),
        ("inf", push("silo-a", _stream(ta, "silo-a", inf)), Code.INVALID_ARGUMENT),
        (
            "truncated (no trailer)",
            push("silo-a", _stream(ta, "silo-a", good)[:-1]),
            Code.INVALID_ARGUMENT,
        ),
        (
            "chunk before header",
            push("silo-a", _stream(ta, "silo-a", good)[1:]),
            Code.INVALID_ARGUMENT,
        ),
        (
            "wrong stream kind",
            push("silo-a", _stream(ta, "silo-a", good, kind=streams.StreamKind.GLOBAL_MODEL)),
            Code.INVALID_ARGUMENT,
        ),
        (
            "no attempt",
            push("silo-a", _stream(ta, "silo-a", good, scalars={})),
            Code.INVALID_ARGUMENT,
        ),
        (
            "future round",
            push("silo-a", _stream(ta, "silo-a", good, round=2)),
            Code.FAILED_PRECONDITION,
        ),
        (
            "stale round",
            push("silo-a", _stream(ta, "silo-a", good, round=0)),
            Code.FAILED_PRECONDITION,
        ),
        (
            "stale attempt",
            push("silo-a", _stream(ta, "silo-a", good, scalars={"attempt": 7})),
            Code.FAILED_PRECONDITION,
        ),
        (
            "unknown run",
            push("silo-a", _stream(ta, "silo-a", good, run_id="r0")),
            Code.FAILED_PRECONDITION,
        ),
        (
            "claims another silo's id",
            push("silo-a", _stream(ta, "silo-b", good)),
            Code.PERMISSION_DENIED,
        ),
        (
            "unknown silo pushes",
            push("mallory", _stream(ta, "mallory", good)),
            Code.PERMISSION_DENIED,
        ),
        (
            "unknown silo joins",
            lambda: silo["mallory"].Join(
                silo_pb2.JoinRequest(silo_id="mallory", num_samples=5), timeout=10
            ),
            Code.PERMISSION_DENIED,
        ),
        (
            "unknown silo asks for work",
            lambda: silo["mallory"].GetTask(silo_pb2.GetTaskRequest(silo_id="mallory"), timeout=10),
            Code.PERMISSION_DENIED,
        ),
        (
            "silo without samples",
            lambda: silo["silo-a"].Join(
                silo_pb2.JoinRequest(silo_id="silo-a", num_samples=0), timeout=10
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "non-finite metric",
            lambda: silo["silo-a"].ReportMetrics(
                silo_pb2.ReportMetricsRequest(
                    silo_id="silo-a",
                    run_id=run_id,
                    round=1,
                    kind=silo_pb2.METRICS_KIND_TRAIN,
                    metrics={"loss": float("nan")},
                ),
                timeout=10,
            ),
            Code.INVALID_ARGUMENT,
        ),
        (
            "metrics of an unknown run",
            lambda: silo["silo-a"].ReportMetrics(
                silo_pb2.ReportMetricsRequest(
                    silo_id="silo-a",
                    run_id="nope",
                    round=1,
                    kind=silo_pb2.METRICS_KIND_TRAIN,
                    metrics={"loss": 1.0},
                ),
                timeout=10,
            ),
            Code.NOT_FOUND,
        ),
        (
            "global of a future round",
            lambda: list(
                silo["silo-a"].FetchGlobal(
                    silo_pb2.FetchGlobalRequest(silo_id="silo-a", run_id=run_id, round=1),
                    timeout=10,
                )
            ),
            Code.FAILED_PRECONDITION,
        ),
    ]
    before = _snapshot(env)
    for name, fn, expected in cases:
        assert status_of(fn) == expected, name
        assert _snapshot(env) == before, f"{name} changed the coordinator's state"

    # a good update is accepted; the same silo's second update is refused and changes nothing
    push("silo-a", _stream(ta, "silo-a", _payload(ta, 1.0)))()
    after_first = _snapshot(env)
    assert (
        status_of(push("silo-a", _stream(ta, "silo-a", _payload(ta, 1.0))))
        == Code.FAILED_PRECONDITION
    )
    assert _snapshot(env) == after_first
    push("silo-b", _stream(tasks["silo-b"], "silo-b", _payload(tasks["silo-b"], 2.0)))()
    push("silo-c", _stream(tasks["silo-c"], "silo-c", _payload(tasks["silo-c"], 3.0)))()
    # round 1 is complete; its global is the weighted mean of the three good updates only
    status = env.control.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id), timeout=10)
    assert status.completed_rounds == 1
    g1 = CheckpointStore(env.state).read(run_id, 1)
    expected = (10 * 1.0 + 20 * 2.0 + 30 * 3.0) / 60
    for name in INITIAL:
        torch.testing.assert_close(g1[name], torch.full_like(INITIAL[name], expected))
    # an update for the now stale round 1
    after_round = _snapshot(env)
    assert (
        status_of(push("silo-b", _stream(tasks["silo-b"], "silo-b", _payload(tasks["silo-b"]))))
        == Code.FAILED_PRECONDITION
    )
    assert _snapshot(env) == after_round
    manifest = env.control.GetRoundManifest(
        cpb.GetRoundManifestRequest(run_id=run_id, round=1), timeout=10
    )
    assert sorted(u.silo_id for u in manifest.updates) == list(SILOS)
    assert {t.name for t in manifest.global_tensors} == set(INITIAL)


def test_tls_and_identity_refusals_against_the_real_coordinator_change_nothing(
    tls_federation: SimpleNamespace,
) -> None:
    """Every way in without the right certificate, against the real coordinator during a run: the
    call fails with its status and no SQLite row or checkpoint file changes. Each request would
    change state if it were accepted (a new sample count, stopping the run)."""
    import datetime as dt

    env = tls_federation
    cfg = RunConfig(model=ModelConfig(path="unused"), rounds=2, min_silos=2, enroll_window_s=30.0)
    run_id = env.control.StartRun(
        cpb.StartRunRequest(run_config_json=to_json(cfg), run_id="r2"), timeout=30
    ).run_id
    for s in SILOS:
        env.silo[s].Join(silo_pb2.JoinRequest(silo_id=s, num_samples=10), timeout=10)
    port = env.coord.ports["silo_api"]
    ca_pem = (env.pki / "ca.crt").read_bytes()
    ca = pki_files.load_ca(env.pki)
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue_silo_cert(
        ca, "silo-a", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    stranger = pki.issue_silo_cert(
        pki.create_ca(FED), "silo-a"
    )  # same federation name and id, another CA

    def stub(cert: pki.IssuedCertificate | None, port: int = port) -> silo_pb2_grpc.SiloApiStub:
        creds = (
            grpc_factory.channel_credentials(ca_pem, cert.cert_pem(), cert.key_pem())
            if cert
            else grpc_factory.channel_credentials(ca_pem)
        )
        return silo_pb2_grpc.SiloApiStub(
            grpc_factory.create_channel(
                f"127.0.0.1:{port}", creds, server_name_override="localhost"
            )
        )

    def join(s: silo_pb2_grpc.SiloApiStub, silo: str = "silo-a") -> Callable[[], object]:
        return lambda: s.Join(silo_pb2.JoinRequest(silo_id=silo, num_samples=999), timeout=10)

    keys_as_b = silo_pb2.AdvertiseKeysRequest(
        header=silo_pb2.SecAggHeader(silo_id="silo-b", run_id=run_id, round=1, attempt=1)
    )
    cases: list[tuple[str, Callable[[], object], grpc.StatusCode]] = [
        ("no client certificate", join(stub(None)), Code.UNAVAILABLE),
        ("a certificate from another CA", join(stub(stranger)), Code.UNAVAILABLE),
        ("an expired certificate", join(stub(expired)), Code.UNAVAILABLE),
        (
            "silo-a's certificate claiming silo-b (Join)",
            join(env.silo["silo-a"], "silo-b"),
            Code.PERMISSION_DENIED,
        ),
        (
            "silo-a's certificate claiming silo-b (AdvertiseKeys)",
            lambda: env.silo["silo-a"].AdvertiseKeys(keys_as_b, timeout=10),
            Code.PERMISSION_DENIED,
        ),
        (
            "a silo certificate on the control API (StopRun)",
            lambda: env.silo_as_admin.StopRun(cpb.StopRunRequest(run_id=run_id), timeout=10),
            Code.PERMISSION_DENIED,
        ),
        (
            "a silo certificate on the control API (StartRun)",
            lambda: env.silo_as_admin.StartRun(
                cpb.StartRunRequest(run_config_json=to_json(cfg)), timeout=10
            ),
            Code.PERMISSION_DENIED,
        ),
        (
            "a silo not on the allow-list",
            join(env.silo["mallory"], "mallory"),
            Code.PERMISSION_DENIED,
        ),
    ]
    before = _snapshot(env)
    for name, fn, expected in cases:
        assert status_of(fn) == expected, name
        assert _snapshot(env) == before, f"{name} changed the coordinator's state"
    assert (
        env.control.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id), timeout=10).state
        == cpb.RUN_STATE_RUNNING
    )
