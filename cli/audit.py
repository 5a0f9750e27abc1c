"""`pf2lora run audit`: compare a silo's record of what it sent with the coordinator's record.

The silo's record is STATE_DIR/runs/RUN_ID/wire.jsonl (silo/wire_record.py); the coordinator's is
GetRoundManifest of every completed round (the global checkpoint's manifest, the payload layout
and every accepted update's manifest). Reported as findings (exit status 1):
- a tensor that is not part of the shared state: a sent name, or a name in the payload layout,
  that is neither a global-state tensor nor a weight (`__weight__...`);
- a sent tensor whose name, dtype or shape does not follow the round's payload spec; with
  secure aggregation, a stream other than one uint32 vector of the layout's length, or a masked
  vector whose layout (what it flattens) differs from the coordinator's;
- an update on one side without its counterpart on the other, or whose manifest (digest,
  per-tensor SHA-256, byte counts) differs;
- a global state the silo fetched whose digest is not the coordinator's checkpoint of that round.
With --audit-log, every PushUpdate stream in the silo's audit log of sent messages (the bytes
that actually left) must be one the wire record lists.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pf2lora.cli import control
from pf2lora.common.algorithms.aggregate import is_weight_key
from pf2lora.common.errors import ConfigError
from pf2lora.common.wire.manifest import MASKED_TENSOR, layout_from_list

logger = logging.getLogger(__name__)

_DTYPES = {1: "float32", 7: "uint32"}  # pf2lora.v1.DType values an update may carry


@dataclass(frozen=True)
class Finding:
    """One discrepancy an audit found (printed one per line; any finding fails the audit)."""

    round: int
    attempt: int
    what: str

    def __str__(self) -> str:
        where = f"round {self.round}" + (f" attempt {self.attempt}" if self.attempt else "")
        return f"{where}: {self.what}"


def register_audit(rsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    a = rsub.add_parser(
        "audit",
        help="compare a silo's record of what it sent with the coordinator's",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    control.add_connection_flags(a)
    a.add_argument("run_id")
    a.add_argument(
        "--silo-state",
        type=Path,
        required=True,
        help="the silo's state_dir (or its runs/RUN_ID folder, or a wire.jsonl file)",
    )
    a.add_argument("--audit-log", type=Path, help="the silo's [silo] audit_log file, to check too")
    a.add_argument("--json", action="store_true", help="print findings and checked rounds as JSON")
    a.set_defaults(func=run_audit)


def wire_file(path: Path, run_id: str) -> Path:
    for candidate in (path, path / "wire.jsonl", path / "runs" / run_id / "wire.jsonl"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no wire record of run {run_id} under {path} (expected runs/{run_id}/wire.jsonl)"
    )


def _tensor(t: Any) -> dict[str, Any]:
    """A TensorSpec (protobuf) in the silo record's JSON form."""
    import torch

    from pf2lora.common.wire.manifest import dtype_from_proto, dtype_name

    dtype: torch.dtype = dtype_from_proto(t.dtype)
    return {
        "name": t.name,
        "dtype": dtype_name(dtype),
        "shape": list(t.shape),
        "nbytes": t.nbytes,
        "sha256": t.sha256.hex(),
    }


def audit_round(
    silo_id: str, manifest: Any, events: Sequence[dict[str, Any]]
) -> tuple[list[Finding], list[str]]:
    """Findings and notes for one completed round (`manifest`: a pf2lora.v1.RoundManifest;
    `events`: the silo's wire-record events of that run)."""
    r = manifest.round
    findings: list[Finding] = []
    notes: list[str] = []
    shared = {t.name for t in manifest.global_tensors}
    layout = {e.name: tuple(e.shape) for e in manifest.payload_layout}
    size = sum(_prod(s) for s in layout.values())

    def bad(attempt: int, what: str) -> None:
        findings.append(Finding(r, attempt, what))

    for name in sorted(layout):  # the coordinator's payload spec asks for shared tensors only
        if name not in shared and not is_weight_key(name):
            bad(0, f"the payload spec names {name!r}, which is not a shared-state tensor")

    theirs = {u.attempt: u for u in manifest.updates if u.silo_id == silo_id}
    ours = {e["attempt"]: e for e in events if e["event"] == "update" and e["round"] == r}
    for attempt in sorted(set(theirs) | set(ours)):
        before = len(findings)
        u, e = theirs.get(attempt), ours.get(attempt)
        if e is None:
            bad(
                attempt,
                "the coordinator recorded an update from this silo that its wire record lacks",
            )
            continue
        for t in e["tensors"]:
            _check_tensor(t, e, layout, shared, size, lambda what, a=attempt: bad(a, what))
        if e["kind"] == "MASKED_UPDATE":
            silo_layout = {x["name"]: tuple(x["shape"]) for x in e.get("layout", [])}
            if silo_layout != layout or e.get("layout_digest") != manifest.layout_digest:
                bad(
                    attempt,
                    f"the masked vector flattens {sorted(silo_layout)} (layout "
                    f"{str(e.get('layout_digest'))[:16]}), not the round's payload spec "
                    f"(layout {manifest.layout_digest[:16]})",
                )
            elif layout_from_list(e["layout"]).digest() != e.get("layout_digest"):
                bad(attempt, "the recorded layout does not match its own digest")
        if e["receipt_digest"] != e["manifest_digest"]:
            bad(
                attempt, "the coordinator's receipt digest differs from the digest of what was sent"
            )
        if u is None:
            bad(
                attempt,
                f"the silo sent a {e['kind']} stream ({e['manifest_digest'][:16]}) that the "
                "coordinator has no record of",
            )
            continue
        if u.manifest_digest.hex() != e["manifest_digest"] or u.kind != e["kind"]:
            bad(
                attempt,
                f"manifest digest {u.manifest_digest.hex()[:16]} ({u.kind}) on the coordinator, "
                f"{e['manifest_digest'][:16]} ({e['kind']}) on the silo",
            )
        if [_tensor(t) for t in u.tensors] != e["tensors"]:
            bad(attempt, "the tensors the coordinator recorded differ from those the silo sent")
        if len(findings) == before:
            notes.append(
                f"round {r} attempt {attempt}: {e['kind']} {e['manifest_digest'][:16]} on both "
                "sides"
            )
    for e in events:
        if (
            e["event"] == "global"
            and e["round"] == r
            and e["manifest_digest"] != manifest.global_manifest_digest.hex()
        ):
            bad(
                0,
                f"the silo fetched a global state {e['manifest_digest'][:16]} that is not the "
                "checkpoint "
                f"{manifest.global_manifest_digest.hex()[:16]} of round {r}",
            )
    return findings, notes


def _check_tensor(
    t: dict[str, Any],
    e: dict[str, Any],
    layout: dict[str, tuple[int, ...]],
    shared: set[str],
    size: int,
    bad: Any,
) -> None:
    name = t["name"]
    if e["kind"] == "MASKED_UPDATE":
        if (name, t["dtype"], tuple(t["shape"])) != (MASKED_TENSOR, "uint32", (size,)):
            bad(
                f"masked stream carries {name!r} {t['dtype']} {t['shape']}, expected "
                f"{MASKED_TENSOR!r} uint32 [{size}]"
            )
        return
    if name not in shared and not is_weight_key(name):
        bad(f"sent {name!r}, which is not a shared-state tensor")
    elif name not in layout or tuple(t["shape"]) != layout[name] or t["dtype"] != "float32":
        bad(f"sent {name!r} {t['dtype']} {t['shape']}, outside the round's payload spec")


def _prod(shape: Iterable[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def audit_log_check(
    streams: list[tuple[str, dict[str, Any]]],
    run_id: str,
    recorded: set[str],
    shared_of: dict[int, set[str]],
) -> tuple[list[Finding], list[str]]:
    """Findings and notes on the PushUpdate streams of a silo's audit log for one run: a stream
    of another run is said to be so (and not checked against this run's rounds); one of this
    run the silo's record does not hold was not accepted; every tensor sent must be shared."""
    findings: list[Finding] = []
    notes: list[str] = []
    for digest, header in streams:
        if header.get("run_id", run_id) != run_id:
            notes.append(
                f"a {header['kind']} stream {digest[:16]} in the audit log belongs to run "
                f"{header['run_id']!r} (round {header['round']}), not audited here"
            )
            continue
        if digest not in recorded:
            notes.append(
                f"round {header['round']}: a {header['kind']} stream {digest[:16]} in the audit "
                "log was not accepted (refused or interrupted)"
            )
        shared = shared_of.get(header["round"])
        if shared is None:
            continue
        for name in header["tensors"]:
            masked = header["kind"] == "MASKED_UPDATE" and name == MASKED_TENSOR
            if not (masked or name in shared or is_weight_key(name)):
                findings.append(
                    Finding(
                        header["round"],
                        0,
                        f"the audit log shows {name!r} sent: not a shared-state tensor",
                    )
                )
    return findings, notes


def audit_log_streams(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(manifest digest hex, header as a dict) of every PushUpdate stream in an audit log."""
    from pf2lora.common.wire import streams
    from pf2lora.silo.audit import read_audit_log
    from pf2lora.v1 import tensors_pb2 as tpb

    out = []
    for method, data in read_audit_log(path):
        if method.endswith("/PushUpdate"):
            msg = tpb.StreamMessage.FromString(data)
            if msg.WhichOneof("body") == "header":
                info = streams.header_from_proto(msg.header)
                out.append(
                    (
                        info.manifest_digest.hex(),
                        {
                            "run_id": info.run_id,
                            "round": info.round,
                            "kind": str(info.kind),
                            "tensors": [t.name for t in info.tensors],
                        },
                    )
                )
    return out


def run_audit(args: argparse.Namespace) -> int:
    from pf2lora.silo.wire_record import read_wire_record
    from pf2lora.v1 import control_pb2 as cpb

    events = list(read_wire_record(wire_file(args.silo_state, args.run_id)))
    silo_ids = {e["silo_id"] for e in events}
    if len(silo_ids) != 1:
        raise ConfigError(f"the wire record names silos {sorted(silo_ids)}: expected exactly one")
    silo_id = silo_ids.pop()
    findings: list[Finding] = []
    notes: list[str] = []
    shared_of: dict[int, set[str]] = {}
    stub, channel = control.connect(args)
    with channel:
        status_req = cpb.GetRunStatusRequest(run_id=args.run_id)
        status = control.call(
            args, lambda: stub.GetRunStatus(status_req, timeout=control.CALL_TIMEOUT_S)
        )
        for r in range(1, status.completed_rounds + 1):
            req = cpb.GetRoundManifestRequest(run_id=args.run_id, round=r)
            manifest = control.call(
                args, functools.partial(stub.GetRoundManifest, req, timeout=control.CALL_TIMEOUT_S)
            )
            shared_of[r] = {t.name for t in manifest.global_tensors}
            round_findings, round_notes = audit_round(silo_id, manifest, events)
            findings += round_findings
            notes += round_notes
    recorded = {e["manifest_digest"] for e in events if e["event"] == "update"}
    if args.audit_log is not None:
        log_findings, log_notes = audit_log_check(
            audit_log_streams(args.audit_log), args.run_id, recorded, shared_of
        )
        findings += log_findings
        notes += log_notes
    if args.json:
        print(
            json.dumps(
                {
                    "run_id": args.run_id,
                    "silo_id": silo_id,
                    "rounds": status.completed_rounds,
                    "findings": [str(f) for f in findings],
                    "notes": notes,
                },
                indent=1,
            )
        )
    else:
        print(
            f"audit of run {args.run_id}, silo {silo_id}: {status.completed_rounds} completed "
            "round(s), "
            f"{len(findings)} finding(s)"
        )
        for note in notes:
            print(f"  ok: {note}")
        for finding in findings:
            print(f"  FINDING: {finding}")
    return 1 if findings else 0
