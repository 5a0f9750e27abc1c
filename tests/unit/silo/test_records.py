"""The silo's append-only records survive a torn write: a record cut short by a kill never
swallows the next one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pf2lora.silo.audit import AuditLog, read_audit_log
from pf2lora.silo.wire_record import WireRecord, read_wire_record
from pf2lora.v1 import silo_pb2


def test_a_torn_last_line_of_the_wire_record_is_fenced_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = WireRecord(tmp_path / "runs", "silo-a")
    record.fetched("run-1", 0, "aa" * 32)
    with record.path("run-1").open("a") as fh:
        fh.write(json.dumps({"event": "global", "round": 1})[:20])  # killed mid-write
    record.fetched("run-1", 1, "bb" * 32)
    record.fetched("run-1", 2, "cc" * 32)
    events = list(read_wire_record(record.path("run-1")))
    assert [e["manifest_digest"][:2] for e in events] == ["aa", "bb", "cc"]
    assert "unreadable line skipped" in caplog.text


def test_a_torn_last_audit_record_is_cut_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record("/pf2lora.v1.SiloApi/Join", silo_pb2.JoinRequest(silo_id="silo-a"))
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + whole[:7])  # the next record, cut short by a kill
    log = AuditLog(path)
    log.record("/pf2lora.v1.SiloApi/GetTask", silo_pb2.GetTaskRequest(silo_id="silo-a"))
    log.close()
    assert [m for m, _ in read_audit_log(path)] == [
        "/pf2lora.v1.SiloApi/Join",
        "/pf2lora.v1.SiloApi/GetTask",
    ]
