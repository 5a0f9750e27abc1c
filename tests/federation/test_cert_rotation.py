"""A silo's certificate rotates without a restart (real processes, mutual TLS on loopback).

The silo starts with a certificate that expires within a minute. Its files are then replaced by
a long-lived one (atomically, as `pf2lora certs issue-silo --force` writes them). After the first
certificate has expired the coordinator is killed with SIGKILL and restarted, so the silo must
open a new TLS connection: with the expired certificate the handshake would be refused and the
run could not finish. It finishes, and the silo never restarted."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pf2lora.common.transport import pki, pki_files
from pf2lora.v1 import control_pb2 as cpb
from tests.helpers.federation import Federation, run_config
from tests.helpers.tiny import write_silo_data

pytestmark = pytest.mark.slow

SHORT_S = 60  # lifetime of the first certificate, from its issue (startup and join must fit in it)


def test_rotated_silo_certificate_is_used_without_a_restart(
    tmp_path: Path, federation: Callable[..., Federation]
) -> None:
    # two silos: a secure round needs more than one; only silo-0's certificate rotates
    silos = {
        s: write_silo_data(tmp_path / "data" / s, k, 24) for k, s in enumerate(("silo-0", "silo-1"))
    }
    fed = federation(silos, tls=True)
    ca = pki_files.load_ca(fed.pki)
    now = dt.datetime.now(dt.UTC)
    expires = now + dt.timedelta(seconds=SHORT_S)
    short = pki.issue_silo_cert(
        ca, "silo-0", not_before=now - dt.timedelta(minutes=5), not_after=expires
    )
    pki_files.write_role(pki_files.silo_dir(fed.pki, "silo-0"), short, ca.cert, force=True)
    fed.start_coordinator()
    fed.start_silo("silo-0")
    fed.start_silo("silo-1")
    fed.wait_for_silos(timeout=SHORT_S - 10)
    # rotate: a new key and a long-lived certificate for the same identity
    pki_files.write_role(
        pki_files.silo_dir(fed.pki, "silo-0"),
        pki.issue_silo_cert(ca, "silo-0"),
        ca.cert,
        force=True,
    )
    fed.wait(
        lambda: "TLS files changed" in fed.procs.tail("silo-0", 200),
        30,
        "the silo to load the new files",
    )
    # let the first certificate expire, then force a new handshake
    time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 2.0)
    fed.procs.kill9("coordinator")
    fed.start_coordinator()
    fed.wait_for_silos(timeout=60)
    run_id = fed.start_run(run_config(rounds=1, min_silos=2), "rotated")
    status = fed.wait_run_done(run_id, timeout=300)
    assert status.state == cpb.RUN_STATE_COMPLETED, fed.procs.tails()
    assert [sorted(h.reported) for h in status.history] == [["silo-0", "silo-1"]]
    fed.wait(lambda: not fed.procs.alive("silo-0"), 60, "the silo to exit after the run")
    assert fed.procs.procs["silo-0"].returncode == 0  # the same process throughout
