"""The run names its base model: a silo whose model folder differs from the run's refuses the
run at once (before loading anything), `run status` shows it as refused with the file that
differs, and the round goes on with the other silos instead of waiting for its deadline.
Real processes, mutual TLS, secure aggregation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pf2lora.common.learning.base_model import resolve_model_path
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, run_config
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow

SILOS = ("silo-a", "silo-b", "silo-c")
ODD = "silo-c"


def other_model(folder: Path) -> Path:
    """MiniLM's files (links), with a config.json that differs in one field."""
    src = Path(resolve_model_path("minilm"))
    folder.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((src / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_silo_with_another_model_refuses_the_run_and_the_round_goes_on_without_it(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    silos = {s: write_silo_data(tmp_path / "data" / s, k, 16) for k, s in enumerate(SILOS)}
    odd = other_model(tmp_path / "other-minilm")
    fed = federation(silos, tls=True, silo_extra={ODD: {"model_path": str(odd)}})
    fed.start()
    fed.wait_for_silos(180)
    cfg = run_config(rounds=1, min_silos=2, round_deadline_s=600.0, local_steps=2)
    run_id = fed.start_run(cfg, "named-model")
    started = time.monotonic()
    fed.wait(lambda: len(fed.status(run_id).refused) > 0, 120, "the odd silo's refusal")
    refused_after = time.monotonic() - started
    (refusal,) = fed.status(run_id).refused
    assert refusal.silo_id == ODD
    assert "config.json differs" in refusal.reason and "minilm" in refusal.reason
    status = fed.wait_run_done(run_id, 300)
    done_after = time.monotonic() - started
    assert status.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    (h,) = status.history
    assert sorted(h.reported) == ["silo-a", "silo-b"]
    print(f"refused {refused_after:.1f} s after the run started; run done after {done_after:.1f} s")
    # the refusal came within seconds of the round's start, and nothing waited for a deadline
    # (round 600 s, secure-aggregation stages 120 s)
    assert refused_after < 60 and done_after < 110, (refused_after, done_after)
    assert ODD not in {e.silo_id for e in status.evaluation}
    assert "refused" in fed.procs.tail(ODD, 200) and "config.json differs" in fed.procs.tail(
        ODD, 200
    )
