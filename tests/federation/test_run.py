"""One real federation (coordinator + 3 silo processes, loopback gRPC, MiniLM cut to one layer) run
to
completion with secure aggregation (the default), then checked five ways: completion, parity with
`pf2lora simulate` (within the fixed-point bound), privacy of what each silo sent (only masked
vectors of the payload spec's layout, which look uniform, and no private byte), the audit of both
records (`pf2lora run audit`), and the PEFT export of a silo's personalised model.

The transport is plaintext on purpose: a TCP capture of silo-0 is searched for private bytes.
The silos still sign their secure-aggregation keys with certificates made for the test."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from pf2lora.common.algorithms.registry import make_algorithm
from pf2lora.common.secagg import fixedpoint
from pf2lora.common.secagg.layout import flatten
from pf2lora.common.simulation import DataConfig, SimulationConfig, run_simulation
from pf2lora.common.wire.manifest import payload_layout
from pf2lora.common.wire.streams import StreamKind, stream_to_tensors
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.store import Store
from pf2lora.silo.audit import read_audit_log
from pf2lora.silo.config import load_silo_config
from pf2lora.silo.state import SiloState
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import silo_pb2
from pf2lora.v1 import tensors_pb2 as tpb
from tests.helpers.federation import Federation, RecordingProxy, run_config, secure_simulation
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow

SILOS = ("silo-0", "silo-1", "silo-2")
SIZES = (24, 32, 40)  # different sample counts: non-trivial FedAvg weights
WITHHOLDS = "silo-2"  # report_metrics = false: it sends the coordinator no scalar metrics
SILO_METHODS = {
    f"/pf2lora.v1.SiloApi/{m}": m
    for m in (
        "Join",
        "GetTask",
        "FetchGlobal",
        "PushUpdate",
        "ReportMetrics",
        "AdvertiseKeys",
        "ShareKeys",
        "ConsistencyCheck",
        "Unmask",
    )
}
SECAGG_REQUESTS = {
    "AdvertiseKeys": "AdvertiseKeysRequest",
    "ShareKeys": "ShareKeysRequest",
    "ConsistencyCheck": "ConsistencyCheckRequest",
    "Unmask": "UnmaskRequest",
}


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    root = tmp_path_factory.mktemp("federation")
    silos = {
        s: write_silo_data(root / "data" / s, k, n)
        for k, (s, n) in enumerate(zip(SILOS, SIZES, strict=True))
    }
    extra: dict[str, dict[str, object]] = {
        s: {"audit_log": str(root / f"{s}.audit")} for s in SILOS
    }
    extra[WITHHOLDS]["report_metrics"] = False
    fed = Federation(root, silos, silo_extra=extra)
    proxy: RecordingProxy | None = None
    try:
        fed.start_coordinator()
        proxy = RecordingProxy(fed.silo_port)  # silo-0 reaches the coordinator through it
        extra["silo-0"]["address"] = f"127.0.0.1:{proxy.port}"
        for s in SILOS:
            fed.start_silo(s)
        fed.wait_for_silos()
        cfg = run_config(rounds=2, min_silos=3)
        run_id = fed.start_run(cfg, "parity")
        status = fed.wait_run_done(run_id, timeout=400)
        fed.wait(lambda: not any(fed.procs.alive(s) for s in SILOS), 60, "silos exit after the run")
        yield SimpleNamespace(
            fed=fed, root=root, run_id=run_id, status=status, cfg=cfg, silos=silos, proxy=proxy
        )
    finally:
        fed.close()
        if proxy is not None:
            proxy.close()


def test_full_run_completes(done: SimpleNamespace) -> None:
    st = done.status
    assert st.state == cpb.RUN_STATE_COMPLETED, done.fed.procs.tails()
    assert st.completed_rounds == 2 and [h.round for h in st.history] == [1, 2]
    for h in st.history:
        assert sorted(h.reported) == list(SILOS) and h.attempt == 1
        assert "train_loss" in h.mean_metrics
    assert sorted(e.silo_id for e in st.evaluation) == list(SILOS)
    for e in st.evaluation:
        if e.silo_id == WITHHOLDS:
            assert dict(e.metrics) == {"metrics_withheld": 1.0}
        else:
            assert 0.0 <= e.metrics["personal_accuracy"] <= 1.0 and "shared_accuracy" in e.metrics
    assert all(done.fed.procs.procs[s].returncode == 0 for s in SILOS)
    for h in st.history:  # every round was securely aggregated, nobody dropped
        assert h.secure_aggregation and not h.dropped
        assert {
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask",
        } <= set(h.stage_seconds)
    ck = CheckpointStore(done.root / "coordinator")
    assert ck.rounds_on_disk(done.run_id) == [0, 1, 2]
    store = Store(done.root / "coordinator" / "state.db")
    try:
        rows = store.rounds(done.run_id)
        assert [(r.round, r.state) for r in rows] == [
            (0, "complete"),
            (1, "complete"),
            (2, "complete"),
        ]
        for r in rows:  # every checkpoint matches the digest committed for it
            ck.read(done.run_id, r.round, r.checkpoint_digest)
        weights = {p.silo_id: p.weight for p in store.participants(done.run_id, 1)}
        assert weights == pytest.approx(
            {s: n / sum(SIZES) for s, n in zip(SILOS, SIZES, strict=True)}
        )
    finally:
        store.close()


def test_a_silo_with_report_metrics_false_sends_the_coordinator_no_scalars(
    done: SimpleNamespace,
) -> None:
    """Its update still counts (parity below covers all three), but the coordinator holds no
    metric of it beyond the withheld marker, and nothing else left the silo in a metrics report."""
    store = Store(done.root / "coordinator" / "state.db")
    try:
        rows = store.metrics(done.run_id)
    finally:
        store.close()
    mine = {key: values for key, values in rows.items() if key[1] == WITHHOLDS}
    assert mine == {(2, WITHHOLDS, "evaluate"): {"metrics_withheld": 1.0}}
    others = {key[1] for key in rows if key[2] == "train"}
    assert others == set(SILOS) - {WITHHOLDS}  # the other silos did report
    reports = [
        silo_pb2.ReportMetricsRequest.FromString(data)
        for method, data in read_audit_log(done.root / f"{WITHHOLDS}.audit")
        if method.endswith("/ReportMetrics")
    ]
    assert [(r.kind, dict(r.metrics)) for r in reports] == [
        (silo_pb2.METRICS_KIND_EVALUATE, {"metrics_withheld": 1.0})
    ]
    for h in done.status.history:
        assert WITHHOLDS in h.reported  # its update was part of every round's sum


def test_parity_with_the_in_process_simulation(done: SimpleNamespace) -> None:
    """The same seeds and files through `run_simulation` give the same final shared adapter."""
    cfg = done.cfg
    trains = [str(done.silos[s][0]) for s in SILOS]
    tests = [str(done.silos[s][1]) for s in SILOS]
    sim_cfg = SimulationConfig(
        algorithm=cfg.algorithm,
        model=cfg.model,
        rounds=cfg.rounds,
        seed=cfg.seed,
        data=DataConfig(
            source="files", num_clients=3, train_files=tuple(trains), test_files=tuple(tests)
        ),
    )
    sim = secure_simulation(sim_cfg, roster_size=3)  # the sums secure aggregation reveals
    fed_global = CheckpointStore(done.root / "coordinator").read(done.run_id, cfg.rounds)
    assert set(fed_global) == set(sim.final_global)
    worst = max(float((fed_global[k] - sim.final_global[k]).abs().max()) for k in fed_global)
    print(f"parity: max |federation - simulation| over the final shared adapter = {worst:.3g}")
    for name, value in fed_global.items():
        torch.testing.assert_close(value, sim.final_global[name], rtol=1e-5, atol=1e-6)
    # and the plain weighted mean (no fixed point) is within the fixed-point bound's reach
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain = run_simulation(sim_cfg)
    finally:
        torch.set_num_threads(threads)
    drift = max(float((fed_global[k] - plain.final_global[k]).abs().max()) for k in fed_global)
    print(f"parity: max |federation - plain simulation| = {drift:.3g}")
    assert drift < 1e-4
    # the per-silo evaluation of the final models agrees as well
    fed_eval = {e.silo_id: dict(e.metrics) for e in done.status.evaluation}
    for k, s in enumerate(SILOS):
        if s == WITHHOLDS:
            continue
        assert fed_eval[s]["personal_accuracy"] == pytest.approx(
            sim.clients[k]["personal_accuracy"]
        )
        assert fed_eval[s]["personal_loss"] == pytest.approx(
            sim.clients[k]["personal_loss"], rel=1e-4
        )


def _windows(t: torch.Tensor, count: int = 24, size: int = 32) -> list[bytes]:
    """Byte windows spread over a tensor's raw bytes, skipping low-entropy ones (zeros match
    anything).
    """
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if len(raw) < size:
        return []
    step = max(1, (len(raw) - size) // count)
    out = [raw[i : i + size] for i in range(0, len(raw) - size + 1, step)][:count]
    return [w for w in out if len(set(w)) >= 12]


def _streams(records: list[tuple[str, bytes]]) -> list[list[tpb.StreamMessage]]:
    streams: list[list[tpb.StreamMessage]] = []
    for method, data in records:
        if SILO_METHODS.get(method) != "PushUpdate":
            continue
        msg = tpb.StreamMessage.FromString(data)
        if msg.WhichOneof("body") == "header":
            streams.append([])
        streams[-1].append(msg)
    return streams


def _p_uniform(v: np.ndarray) -> float:
    """Chi-square p-value of the top byte of each uint32 (a fixed-point update piles up at 0x00
    and 0xFF; a masked one is uniform)."""
    counts = np.bincount((v >> 24).astype(np.int64), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def test_privacy_only_masked_shared_tensors_leave_a_silo(done: SimpleNamespace) -> None:
    """Every message each silo sent (its audit log; silo-0 also every byte, via a TCP proxy): the
    only tensor streams are one masked uint32 vector per round, of the payload spec's length
    (shared state + weight), which passes a uniformity test; the secure-aggregation messages carry
    keys, shares and signatures only; no private tensor's bytes appear anywhere."""
    initial = CheckpointStore(done.root / "coordinator").read(done.run_id, 0)
    cfg = done.cfg
    algorithm = make_algorithm(cfg.algorithm, cfg.model.adapters)
    spec = algorithm.payload_spec({k: (tuple(v.shape), v.dtype) for k, v in initial.items()})
    layout = payload_layout(spec)
    masked_spec = {"masked": ((layout.size,), torch.uint32)}
    for silo in SILOS:
        records = list(read_audit_log(done.root / f"{silo}.audit"))
        raw_audit = (done.root / f"{silo}.audit").read_bytes()
        methods = {m for m, _ in records}
        assert methods <= set(SILO_METHODS), methods
        for method, data in records:  # every message parses as its request type
            kind = SILO_METHODS[method]
            if kind == "ReportMetrics":
                msg = silo_pb2.ReportMetricsRequest.FromString(data)
                assert msg.silo_id == silo and len(msg.metrics) < 32
            elif kind in SECAGG_REQUESTS:  # keys, shares, signatures: small, no tensor
                msg = getattr(silo_pb2, SECAGG_REQUESTS[kind]).FromString(data)
                assert msg.header.silo_id == silo and len(data) < 16384
            elif kind != "PushUpdate":
                getattr(
                    silo_pb2, f"{kind}Request" if kind != "FetchGlobal" else "FetchGlobalRequest"
                ).FromString(data)
        streams = _streams(records)
        assert len(streams) == cfg.rounds  # one update per round, nothing else carried tensors
        sent: list[torch.Tensor] = []
        for msgs in streams:
            info, tensors = stream_to_tensors(msgs, masked_spec, kinds=(StreamKind.MASKED_UPDATE,))
            assert info.silo_id == silo and list(tensors) == ["masked"]
            vector = tensors["masked"].numpy()
            assert _p_uniform(vector) > 1e-4, "a masked vector from the wire is not uniform"
            sent.append(tensors["masked"])
        # the same test tells a plain update apart: the fixed-point code of a weighted payload
        # (the final global state times this silo's weight) is far from uniform
        final = CheckpointStore(done.root / "coordinator").read(done.run_id, cfg.rounds)
        weight = (
            next(p.weight for p in done.status.participants) if done.status.participants else 1 / 3
        )
        plain, _ = flatten(
            {**{k: v * weight for k, v in final.items()}, "__weight__": torch.tensor(weight)}
        )
        encoded, _ = fixedpoint.encode(plain, 4.0, 26)
        assert _p_uniform(encoded) < 1e-12
        # byte level: no window of any private tensor, at any saved round, was ever sent
        state = SiloState(done.root / silo)
        private_windows = []
        for r in state.rounds_saved(done.run_id):
            for t in state.private_tensors(done.run_id, r).values():
                private_windows += _windows(t)
        assert len(private_windows) > 50
        captures = [raw_audit] + ([bytes(done.proxy.sent)] if silo == "silo-0" else [])
        for capture in captures:
            leaked = [w for w in private_windows if w in capture]
            assert not leaked, f"{silo}: {len(leaked)} private byte windows found in what it sent"
            # positive control: the same search finds the update tensors that were sent
            sent_windows = [w for t in sent for w in _windows(t)]
            found = sum(w in capture for w in sent_windows)
            assert found >= 0.9 * len(sent_windows) > 0


def test_audit_of_every_silo_finds_nothing(
    done: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pf2lora run audit` against the real coordinator: each silo's wire record (and its audit log
    of
    sent messages) agrees with the coordinator's manifests; a tampered record is a finding."""
    from pf2lora.cli.main import main

    base = [
        "run",
        "audit",
        done.run_id,
        "--insecure",
        "--coordinator",
        f"127.0.0.1:{done.fed.control_port}",
    ]
    for silo in SILOS:
        argv = [
            *base,
            "--silo-state",
            str(done.root / silo),
            "--audit-log",
            str(done.root / f"{silo}.audit"),
        ]
        code = main(argv)
        out = capsys.readouterr().out
        assert code == 0, out
        assert "0 finding(s)" in out and out.count("MASKED_UPDATE") == 2
    wire = done.root / "silo-1" / "runs" / done.run_id / "wire.jsonl"
    tampered = done.root / "tampered.jsonl"
    tampered.write_text(
        wire.read_text().replace('"name": "masked"', '"name": "enc.private.weight"', 1)
    )
    assert main([*base, "--silo-state", str(tampered)]) == 1
    assert "FINDING" in capsys.readouterr().out


def test_export_loads_with_plain_peft(done: SimpleNamespace, tmp_path: Path) -> None:
    from peft import PeftModel

    from pf2lora.common.learning.base_model import load_base_model
    from pf2lora.silo.export import export, personalised_model

    cfg = load_silo_config(done.root / "silo-1.toml")
    info = export(cfg, tmp_path / "out", done.run_id)
    assert (tmp_path / "out" / "shared" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "private" / "adapter_model.safetensors").is_file()
    assert info["global_round"] == 2 and info["private_round"] == 2
    ours, _ = personalised_model(cfg, done.run_id)
    model_cfg = dataclasses.replace(done.cfg.model)
    peft_model = PeftModel.from_pretrained(load_base_model(model_cfg), tmp_path / "out" / "shared")
    peft_model.load_adapter(tmp_path / "out" / "private", adapter_name="private")
    peft_model.base_model.set_adapter(["default", "private"])
    peft_model.eval()
    ours.eval()
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 102], [101, 6659, 1998, 11771, 102, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a = peft_model(input_ids=ids, attention_mask=mask).logits
        b = ours.peft(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)
    # and the exported adapters are the federation's global state and the silo's private state
    fed_global = CheckpointStore(done.root / "coordinator").read(done.run_id, 2)
    assert set(fed_global) == set(ours.shared_state())
    state = SiloState(done.root / "silo-1")
    saved = state.private_tensors(done.run_id, 2)
    for name, p in ours.private_parameters().items():
        assert torch.equal(p.detach(), saved[name])


def test_run_report_draws_the_coordinator_records(
    done: SimpleNamespace, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pf2lora.cli.main import main

    out = tmp_path / "report"
    argv = ["run", "report", done.run_id, "--out", str(out), "--insecure"]
    assert main([*argv, "--coordinator", f"127.0.0.1:{done.fed.control_port}"]) == 0
    assert "report.md" in capsys.readouterr().out
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["evaluation.png", "participants.png", "round_time.png", "training_loss.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    md = (out / "report.md").read_text()
    # every silo that reported its final evaluation is in the table with its numbers
    evaluated = {e.silo_id: dict(e.metrics) for e in done.status.evaluation}
    assert "personal_accuracy" not in evaluated[WITHHOLDS]  # it kept its metrics
    assert f"Kept their metrics on the silo: {WITHHOLDS}." in md
    for silo, m in evaluated.items():
        if silo == WITHHOLDS:
            continue
        assert f"| {silo} | {m['personal_accuracy']:.4f} | {m['shared_accuracy']:.4f} |" in md
    assert f"{len(done.status.history)} rounds" in md
    for name in pngs:
        assert f"![{name}]({name})" in md
