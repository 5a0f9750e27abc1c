"""A silo whose own state is damaged stops once, with one clear error and exit code 5, instead of
training from an older state or retrying forever; with --start-over it sets the damage aside
and takes part again. Real coordinator and silo processes on loopback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pf2lora.silo.state import SiloState
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, freeze_in_training, run_config
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow


def _flip_a_private_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    start, end = next(v["data_offsets"] for k, v in header.items() if k.startswith("private/"))
    raw[8 + n + (start + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def test_a_flipped_bit_in_the_latest_state_stops_the_silo_once_and_start_over_recovers(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    silos = {f"silo-{k}": write_silo_data(tmp_path / "data" / f"silo-{k}", k, 24) for k in (0, 1)}
    fed = federation(silos)
    fed.start()
    fed.wait_for_silos()
    cfg = run_config(rounds=3, min_silos=2, round_deadline_s=120.0, local_steps=10)
    run_id = fed.start_run(cfg)
    r = freeze_in_training(fed, run_id, (2, 3), ["silo-1"], "fetched")
    fed.procs.kill9("silo-1")
    latest = SiloState(tmp_path / "silo-1").state_path(run_id, r - 1)
    _flip_a_private_byte(latest)

    proc = fed.start_silo("silo-1")
    assert proc.wait(timeout=120) == 5
    log = fed.procs.tail("silo-1", 300)
    assert log.count("does not match its digest") == 1, log  # once, no retry loop
    assert latest.name in log and "--start-over" in log

    fed.start_silo("silo-1", args=("--start-over",))
    done = fed.wait_run_done(run_id, 300)
    assert done.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    assert "silo-1" in done.history[r - 1].reported
    aside = list((tmp_path / "silo-1" / "runs" / run_id).glob("set-aside-*"))
    assert len(aside) == 1 and (aside[0] / latest.name).is_file()
