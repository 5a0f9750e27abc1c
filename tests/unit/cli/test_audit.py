"""`pf2lora run audit`'s reading of a silo's audit log: streams of another run are said to be
so, never taken for refused streams of this one or checked against its rounds."""

from __future__ import annotations

from pf2lora.cli.audit import audit_log_check

SHARED = {1: {"a.lora_A.weight", "a.lora_B.weight"}}


def test_another_runs_stream_is_labelled_as_such_and_not_checked() -> None:
    streams = [
        (
            "aa" * 32,
            {
                "run_id": "run-1",
                "round": 1,
                "kind": "UPDATE",
                "tensors": ["a.lora_A.weight", "__weight__"],
            },
        ),
        (
            "bb" * 32,
            {"run_id": "run-0", "round": 1, "kind": "UPDATE", "tensors": ["other.lora_A.weight"]},
        ),
        (
            "cc" * 32,
            {"run_id": "run-1", "round": 1, "kind": "UPDATE", "tensors": ["a.lora_A.weight"]},
        ),
    ]
    findings, notes = audit_log_check(streams, "run-1", {"aa" * 32}, SHARED)
    assert findings == []
    assert any("belongs to run 'run-0'" in n for n in notes)
    assert [n for n in notes if "refused or interrupted" in n] == [
        "round 1: a UPDATE stream cccccccccccccccc in the audit log was not accepted "
        "(refused or interrupted)"
    ]


def test_a_private_tensor_in_this_runs_stream_is_a_finding() -> None:
    streams = [
        (
            "aa" * 32,
            {
                "run_id": "run-1",
                "round": 1,
                "kind": "UPDATE",
                "tensors": ["a.private.lora_A.weight"],
            },
        )
    ]
    findings, _ = audit_log_check(streams, "run-1", {"aa" * 32}, SHARED)
    assert [str(f) for f in findings] == [
        "round 1: the audit log shows 'a.private.lora_A.weight' sent: not a shared-state tensor"
    ]
