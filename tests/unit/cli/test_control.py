"""What `pf2lora run status` and `run start --wait` say about a round that waits."""

from __future__ import annotations

import time

from pf2lora.cli import control
from pf2lora.v1 import control_pb2 as cpb


def running(**fields) -> cpb.RunStatus:  # noqa: ANN003
    return cpb.RunStatus(run_id="r1", state=cpb.RUN_STATE_RUNNING, rounds=3, **fields)


def test_the_waiting_line_names_stage_silos_and_time_left() -> None:
    deadline = int((time.time() + 95) * 1000)
    status = running(
        current_round=2,
        secagg_stage="masked_input",
        waiting_for=["silo-b", "silo-c"],
        deadline_unix_ms=deadline,
    )
    line = control.waiting_line(status)
    assert line.startswith("waiting for masked_input from silo-b, silo-c, ")
    assert line.endswith(" s left") and 93 <= int(line.split(", ")[-1].split()[0]) <= 95
    assert line in control.describe(status)


def test_no_waiting_line_when_the_round_waits_for_nobody() -> None:
    assert control.waiting_line(running(current_round=1)) == ""
    assert "waiting for" not in control.describe(running(current_round=1))
