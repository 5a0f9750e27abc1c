"""Secure aggregation in the round, through the real coordinator (gRPC servers on loopback, mutual
TLS
with certificates made in the test) and the silo's real client and SecureRoundDriver, with fixed
payloads instead of training: the aggregate is the weighted mean, what the coordinator stores and
serves matches the silos' records (`pf2lora run audit`), bad secure-aggregation messages are
refused with their status and change nothing, and an active coordinator that substitutes a key
or lists a silo both alive and dropped gets nothing from the silos.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from pf2lora.cli.audit import audit_round
from pf2lora.common.algorithms.aggregate import weighted_payload
from pf2lora.common.errors import PermissionDenied
from pf2lora.common.learning.config import ModelConfig
from pf2lora.common.runspec import RunConfig, SecAggSettings, to_json
from pf2lora.common.secagg.config import SecAggConfig
from pf2lora.common.secagg.messages import SignedKeys, UnmaskProposal
from pf2lora.common.secagg.server import SecAggServer
from pf2lora.common.secagg.silo import SecAggSilo
from pf2lora.common.transport import pki_files
from pf2lora.common.wire import streams, task_proto
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.secure_round import SecureRound
from pf2lora.coordinator.server import Coordinator
from pf2lora.silo.config import SiloConfig
from pf2lora.silo.secure_round import SitOut, load_signing_material
from pf2lora.silo.wire_record import read_wire_record
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc, silo_pb2, silo_pb2_grpc
from pf2lora.v1 import tensors_pb2 as tpb
from tests.helpers.inprocess import (
    channel,
    constant_state,
    coordinator_config,
    silo_config,
    status_of,
)
from tests.helpers.payload_silo import PayloadSilo, expected_mean, run_all, train_tasks

FED = "secfed"
INITIAL = {
    "enc.query.lora_A.weight": torch.linspace(-1, 1, 32).reshape(4, 8),
    "enc.query.lora_B.weight": torch.zeros(8, 4),
    "classifier.weight": torch.ones(2, 8),
}
Code = grpc.StatusCode


class Env(SimpleNamespace):
    coord: Coordinator
    pki: Path
    root: Path
    silos: tuple[str, ...]


@pytest.fixture
def env(
    tmp_path: Path, request: pytest.FixtureRequest, pki_factory: Callable[..., Path]
) -> Iterator[Env]:
    silos = tuple(getattr(request, "param", ("silo-a", "silo-b", "silo-c")))
    pki_dir = pki_factory(FED, silos)
    cfg = coordinator_config(
        tmp_path / "coordinator", FED, silos, tls_dir=pki_files.coordinator_dir(pki_dir)
    )
    coord = Coordinator(cfg, initial_state=constant_state(INITIAL))
    coord.start()
    try:
        yield Env(coord=coord, pki=pki_dir, root=tmp_path, silos=silos)
    finally:
        coord.stop(grace=0)


def _silo_cfg(env: Env, silo: str) -> SiloConfig:
    return silo_config(
        env.root / silo,
        silo,
        FED,
        env.coord.ports["silo_api"],
        tls_dir=pki_files.silo_dir(env.pki, silo),
        call_timeout_s=10.0,
    )


def _admin(env: Env) -> control_pb2_grpc.ControlApiStub:
    ch = channel(env.coord.ports["control_api"], pki_files.admin_dir(env.pki, "ops"))
    return control_pb2_grpc.ControlApiStub(ch)


def _start(env: Env, **kw: Any) -> tuple[str, list[PayloadSilo]]:
    settings = kw.pop("secagg", SecAggSettings(stage_deadline_s=5.0))
    cfg = RunConfig(
        model=ModelConfig(path="unused"),
        rounds=1,
        min_silos=2,
        enroll_window_s=30.0,
        round_deadline_s=30.0,
        secagg=settings,
        **kw,
    )
    run_id = env.coord.engine.start_run(cfg, "sec")
    silos = [
        PayloadSilo(_silo_cfg(env, s), 10 * (k + 1), float(k + 1), INITIAL)
        for k, s in enumerate(env.silos)
    ]
    for s in silos:
        s.client.join(s.samples, "test")
    return run_id, silos


def test_secure_round_aggregates_the_weighted_mean_and_both_records_agree(env: Env) -> None:
    run_id, silos = _start(env)
    try:
        run_all(silos, run_id)
        assert all(s.error is None for s in silos), [s.error for s in silos]
        g1 = CheckpointStore(env.root / "coordinator").read(run_id, 1)
        mean = expected_mean(silos)
        for name in INITIAL:  # within the fixed-point bound N * 2^-(F+1)
            torch.testing.assert_close(
                g1[name], torch.full_like(INITIAL[name], mean), rtol=0, atol=1e-6
            )
        admin = _admin(env)
        status = admin.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id), timeout=10)
        h = status.history[0]
        assert h.secure_aggregation and sorted(h.reported) == list(env.silos) and not h.dropped
        assert {
            "enroll",
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask",
            "aggregate",
        } <= set(h.stage_seconds)
        manifest = admin.GetRoundManifest(
            cpb.GetRoundManifestRequest(run_id=run_id, round=1), timeout=10
        )
        assert manifest.secure_aggregation and sorted(manifest.summed) == list(env.silos)
        assert {e.name for e in manifest.payload_layout} == set(INITIAL) | {"__weight__"}
        size = sum(int(np.prod(e.shape)) for e in manifest.payload_layout)
        for u in manifest.updates:  # the wire carried one uint32 vector per silo, nothing else
            assert u.kind == "MASKED_UPDATE" and [
                (t.name, t.dtype, list(t.shape)) for t in u.tensors
            ] == [("masked", tpb.DTYPE_UINT32, [size])]
        for s in silos:  # pf2lora run audit's comparison: no finding for any silo
            events = list(read_wire_record(s.wire.path(run_id)))
            findings, notes = audit_round(s.silo, manifest, events)
            assert findings == [] and len(notes) == 1, findings
            stages = [e["stage"] for e in events if e["event"] == "secagg"]
            assert stages == ["advertise_keys", "share_keys", "consistency_check", "unmask"]
        # a doctored silo record is caught: a private tensor in the layout, a changed digest
        events = list(read_wire_record(silos[0].wire.path(run_id)))
        upd = next(e for e in events if e["event"] == "update")
        upd["layout"] = upd["layout"] + [
            {"name": "enc.query.lora_A.private.weight", "shape": [4, 8], "offset": 0}
        ]
        upd["manifest_digest"] = "00" * 32
        findings, _ = audit_round(silos[0].silo, manifest, events)
        assert len(findings) >= 2
    finally:
        for s in silos:
            s.close()


def _snapshot(env: Env) -> tuple[object, list[tuple[str, str]]]:
    state = env.root / "coordinator"
    files = sorted(
        (str(p.relative_to(state)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in state.rglob("*")
        if p.is_file() and not p.name.startswith("state.db")
    )
    return env.coord.store.dump(), files


def test_bad_secure_aggregation_messages_are_refused_and_change_nothing(env: Env) -> None:
    run_id, silos = _start(env)
    a = silos[0]
    stubs = {s.silo: silo_pb2_grpc.SiloApiStub(s.client.channel) for s in silos}
    try:
        ta = train_tasks(silos, run_id)["silo-a"]
        assert ta.secure is not None and ta.secure.roster == env.silos
        sp = ta.secure
        signing = load_signing_material(a.cfg)
        proto_silo = SecAggSilo(
            sp.instance_id,
            ta.round,
            "silo-a",
            sp.roster,
            signing.key,
            signing.certificate_der,
            signing.verifier,
            SecAggConfig(clip=sp.clip, frac_bits=sp.frac_bits, threshold=sp.threshold),
        )
        keys = proto_silo.advertise_keys()

        def advertise(
            stub: str, header_silo: str, k: SignedKeys, attempt: int = ta.attempt, rnd: int = 1
        ) -> Callable[[], object]:
            req = silo_pb2.AdvertiseKeysRequest(
                header=task_proto.secagg_header_to_proto(header_silo, run_id, rnd, attempt),
                keys=task_proto.keys_to_proto(k),
            )
            return lambda: stubs[stub].AdvertiseKeys(req, timeout=10)

        good = dict(
            weighted_payload({k: torch.ones_like(v) for k, v in INITIAL.items()}, ta.weight)
        )
        plain = list(
            streams.tensors_to_stream(
                good,
                run_id=run_id,
                round=1,
                kind=streams.StreamKind.UPDATE,
                silo_id="silo-a",
                scalars={"attempt": ta.attempt},
            )
        )
        masked = list(
            streams.tensors_to_stream(
                {"masked": torch.zeros(sp.vector_length, dtype=torch.uint32)},
                run_id=run_id,
                round=1,
                kind=streams.StreamKind.MASKED_UPDATE,
                silo_id="silo-a",
                scalars={"attempt": ta.attempt},
            )
        )
        other_keys = SignedKeys(**{**keys.__dict__, "silo_id": "silo-b"})
        shares = silo_pb2.ShareKeysRequest(
            header=task_proto.secagg_header_to_proto("silo-a", run_id, 1, ta.attempt)
        )
        cases = [
            (
                "keys claiming another silo's id in the header",
                advertise("silo-a", "silo-b", keys),
                Code.PERMISSION_DENIED,
            ),
            (
                "keys naming another silo inside",
                advertise("silo-a", "silo-a", other_keys),
                Code.PERMISSION_DENIED,
            ),
            (
                "keys of another attempt",
                advertise("silo-a", "silo-a", keys, attempt=ta.attempt + 1),
                Code.FAILED_PRECONDITION,
            ),
            (
                "keys of another round",
                advertise("silo-a", "silo-a", keys, rnd=2),
                Code.FAILED_PRECONDITION,
            ),
            (
                "shares before the key stage closed",
                lambda: stubs["silo-a"].ShareKeys(shares, timeout=10),
                Code.FAILED_PRECONDITION,
            ),
            (
                "a plain update in a secure round",
                lambda: stubs["silo-a"].PushUpdate(iter(plain), timeout=10),
                Code.INVALID_ARGUMENT,
            ),
            (
                "a masked update before its stage",
                lambda: stubs["silo-a"].PushUpdate(iter(masked), timeout=10),
                Code.FAILED_PRECONDITION,
            ),
            (
                "malformed keys",
                lambda: stubs["silo-a"].AdvertiseKeys(
                    silo_pb2.AdvertiseKeysRequest(
                        header=task_proto.secagg_header_to_proto("silo-a", run_id, 1, ta.attempt)
                    ),
                    timeout=10,
                ),
                Code.INVALID_ARGUMENT,
            ),
        ]
        before = _snapshot(env)
        for name, fn, expected in cases:
            assert status_of(fn) == expected, name
            assert _snapshot(env) == before, f"{name} changed the coordinator's state"
        assert env.coord.engine.snapshot()[1].secure.done == set()  # type: ignore[union-attr]
        # the good keys are accepted once; a second copy is refused
        advertise("silo-a", "silo-a", keys)()
        assert status_of(advertise("silo-a", "silo-a", keys)) == Code.FAILED_PRECONDITION
    finally:
        for s in silos:
            s.close()


def test_substituted_key_is_refused_end_to_end(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The coordinator relays silo-b's keys with its own mask key substituted: every silo refuses
    (the signature no longer verifies), nobody masks, and the attempt fails at its deadline."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from pf2lora.common.secagg.keys import x25519_public_bytes

    real = SecureRound.task_for
    evil = x25519_public_bytes(X25519PrivateKey.generate())

    def substituting(self: SecureRound, silo_id: str) -> Any:
        task = real(self, silo_id)
        if task is not None and type(task).__name__ == "ShareKeysTask":
            keys = tuple(
                SignedKeys(**{**k.__dict__, "mask_public_key": evil})
                if k.silo_id == "silo-b"
                else k
                for k in task.keys
            )
            return type(task)(task.run_id, task.round, task.attempt, keys)
        return task

    monkeypatch.setattr(SecureRound, "task_for", substituting)
    run_id, silos = _start(env, secagg=SecAggSettings(stage_deadline_s=2.0))
    try:
        run_all(silos, run_id)
        for s in silos:
            if s.silo == "silo-b":  # its own keys came back as sent: it is refused by the others
                continue
            assert isinstance(s.error, PermissionDenied) and "signature" in str(s.error), s.error
        engine = env.coord.engine
        deadline = time.monotonic() + 20
        while engine.snapshot()[1].attempt < 2 and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.1)
        rows = env.coord.store.participants(run_id, 1, 1)
        assert all(r.reported_ms is None for r in rows)  # no masked input was ever sent
        assert env.coord.store.round_row(run_id, 1).state == "open"  # type: ignore[union-attr]
        assert engine.snapshot()[1].attempt == 2  # type: ignore[union-attr]
        assert [st.stage for st in env.coord.store.stages(run_id, 1, 1)] == [
            "enroll",
            "advertise_keys",
            "share_keys",
        ]
    finally:
        for s in silos:
            s.close()


def test_proposal_naming_a_silo_alive_and_dropped_is_refused_end_to_end(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator proposes silo-c as both a survivor and dropped (to get both b_c and sk_c):
    no silo signs, so no unmask request can exist and nothing is revealed."""
    real = SecAggServer.close_masked_inputs

    def lying(self: SecAggServer) -> UnmaskProposal:
        honest = real(self)
        forged = UnmaskProposal(
            run_id=honest.run_id,
            round=honest.round,
            survivors=honest.survivors,
            dropped=("silo-c",),
        )
        self._proposal = forged
        return forged

    monkeypatch.setattr(SecAggServer, "close_masked_inputs", lying)
    run_id, silos = _start(env, secagg=SecAggSettings(stage_deadline_s=2.0))
    try:
        run_all(silos, run_id)
        for s in silos:
            assert isinstance(s.error, PermissionDenied) and "both alive and dropped" in str(
                s.error
            ), s.error
        assert all(
            s.state.unmask_record(run_id, 1) is None for s in silos
        )  # no share left any silo
        stages = [st.stage for st in env.coord.store.stages(run_id, 1, 1)]
        deadline = time.monotonic() + 20
        while "consistency_check" not in stages and time.monotonic() < deadline:
            time.sleep(0.1)
            stages = [st.stage for st in env.coord.store.stages(run_id, 1, 1)]
        assert stages[-1] == "consistency_check"
        consistency = env.coord.store.stages(run_id, 1, 1)[-1]
        assert consistency.silos == ()  # not one signature
        assert env.coord.store.round_row(run_id, 1).state == "open"  # type: ignore[union-attr]
    finally:
        for s in silos:
            s.close()


def test_a_silo_sits_out_a_clipped_weight_and_an_attempt_it_advertised_keys_for_before_a_restart(
    env: Env,
) -> None:
    run_id, silos = _start(env)
    try:
        a = silos[0]
        task = train_tasks(silos, run_id)[a.silo]
        too_heavy = {**a.payload(task), "__weight__": torch.tensor(10.0)}  # above the clip 4.0
        with pytest.raises(SitOut, match="exceeds the secure-aggregation clip"):
            a.driver.run(task, too_heavy)  # refused before any key is made: nothing sent
        assert not a.state.keys_advertised(run_id, task.round, task.attempt)
        a.state.mark_keys_advertised(run_id, task.round, task.attempt)  # as before a crash
        with pytest.raises(SitOut, match="advertised keys"):
            a.driver.run(task, a.payload(task))
    finally:
        for s in silos:
            s.close()


def test_plain_runs_need_the_explicit_switch(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    cfg = RunConfig(
        model=ModelConfig(path="unused"), rounds=1, min_silos=2, secure_aggregation=False
    )
    env.coord.engine.start_run(cfg, "plain")
    assert "secure_aggregation = false" in caplog.text
    assert RunConfig().secure_aggregation and RunConfig().round_min_silos == 2
    # a configuration that would overflow int32 for the allowed silos is refused at StartRun
    env.coord.engine.stop_run("plain")
    bad = RunConfig(model=ModelConfig(path="unused"), secagg=SecAggSettings(clip=4.0, frac_bits=30))
    admin = _admin(env)
    code = status_of(
        lambda: admin.StartRun(cpb.StartRunRequest(run_config_json=to_json(bad)), timeout=10)
    )
    assert code == Code.INVALID_ARGUMENT


@pytest.mark.parametrize("algorithm", ["pf2lora", "homlora", "hetlora", "perfedavg"])
def test_every_algorithm_aggregates_the_securely_summed_payload(env: Env, algorithm: str) -> None:
    """Each algorithm's payload spec (HETLoRA: per-module norm weights too) through a secure round:
    the global state is that algorithm's aggregate of the plain sum of the same payloads."""
    from pf2lora.common.algorithms.aggregate import sum_payloads
    from pf2lora.common.algorithms.base import AlgorithmConfig
    from pf2lora.common.algorithms.registry import make_algorithm

    cfg_algo = AlgorithmConfig(name=algorithm)
    algo = make_algorithm(cfg_algo, ModelConfig().adapters)
    spec = algo.payload_spec({k: (tuple(v.shape), v.dtype) for k, v in INITIAL.items()})
    gen = torch.Generator().manual_seed(3)
    payloads: dict[str, dict[str, torch.Tensor]] = {}
    for k, s in enumerate(env.silos):  # weights in (0, 1], values as weighted adapters are: small
        payloads[s] = {
            name: (torch.rand((), generator=gen) * 0.5 + 0.1 * (k + 1))
            if name.startswith("__weight__")
            else torch.randn(shape, generator=gen) * 0.05
            for name, (shape, _) in spec.items()
        }
    run_id, silos = _start(env, algorithm=cfg_algo)
    try:
        for s in silos:
            s.payload = lambda task, s=s: payloads[s.silo]  # type: ignore[method-assign]
        run_all(silos, run_id)
        assert all(s.error is None for s in silos), [s.error for s in silos]
        expected = algo.aggregate(
            sum_payloads(payloads.values()), {k: v.clone() for k, v in INITIAL.items()}
        )
        g1 = CheckpointStore(env.root / "coordinator").read(run_id, 1)
        assert set(g1) == set(expected)
        for name in g1:  # fixed point: 3 silos, clip 4 (256 for hetlora), well within 1e-5
            torch.testing.assert_close(g1[name], expected[name].float(), rtol=1e-5, atol=1e-5)
    finally:
        for s in silos:
            s.close()
