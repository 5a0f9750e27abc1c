"""`pf2lora demo` end to end, shrunk (one layer, one round, a few dozen examples per silo), with its
defaults: mutual TLS and secure aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf2lora.cli.main import main

pytestmark = pytest.mark.slow


# The README's main job as it ships: mutual TLS with certificates the demo makes, SecAgg+ on.
@pytest.mark.parametrize("insecure", [False], ids=["mtls-secagg"])
def test_demo_runs_a_federation_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], insecure: bool
) -> None:
    work = tmp_path / "demo"
    argv = [
        "demo",
        "--workdir",
        str(work),
        "--num-layers",
        "1",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--max-train",
        "24",
        "--max-test",
        "12",
        "--max-length",
        "32",
        "--threads",
        "1",
    ]
    assert main(argv + (["--insecure"] if insecure else [])) == 0
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert "round 1/1 complete: 4 silo(s), secure aggregation" in out
    assert (
        "plaintext" if insecure else "mutual TLS"
    ) in out and "secure aggregation (SecAgg+)" in out
    for silo in ("amazon", "movies", "nyt", "tweets"):
        assert silo in out
        assert (work / "silos" / silo / "data" / "train.jsonl").is_file()
    assert "personalised acc" in out and "shared-only acc" in out
    assert (work / "coordinator" / "runs" / "demo" / "global-00001.safetensors").is_file()
    # a quiet terminal: the demo's own lines only; library log lines went to logs/demo.log
    assert " INFO " not in out and " INFO " not in err
    assert "pf2lora.common.transport.pki: created CA" in (work / "logs" / "demo.log").read_text()
    assert "waiting for the silos to join" in out
    # and the run's report, drawn from the coordinator's records
    report = work / "report"
    assert f"report with 4 plots: {report / 'report.md'}" in out
    assert sorted(p.name for p in report.glob("*.png")) == [
        "evaluation.png",
        "participants.png",
        "round_time.png",
        "training_loss.png",
    ]
