"""The silo's own record of what crossed the wire, per run: one JSON line per event, always on.

STATE_DIR/runs/RUN_ID/wire.jsonl gets, per round:
- {"event": "global", ...}: the manifest digest of the global state fetched (FetchGlobal);
- {"event": "update", ...}: every tensor stream the coordinator accepted (PushUpdate): kind,
  attempt, the manifest (names, dtypes, shapes, byte counts, SHA-256 of the bytes sent), its
  digest and the coordinator's receipt digest; with secure aggregation also the layout of the
  masked vector (which payload tensors it flattens, where) and the protocol instance;
- {"event": "secagg", ...}: each secure-aggregation message sent (stage, bytes): keys, shares,
  signatures and unmask shares carry no tensor.
`pf2lora run audit` compares these records with the coordinator's (GetRoundManifest). The
record holds nothing that did not cross the wire (digests of sent bytes, public layouts).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pf2lora.common.secagg.layout import VectorLayout
from pf2lora.common.state_io import make_dirs
from pf2lora.common.wire.manifest import layout_to_list, tensor_info_to_dict
from pf2lora.common.wire.streams import StreamInfo

logger = logging.getLogger(__name__)

FILE_NAME = "wire.jsonl"


class WireRecord:
    """Appends events to RUN_DIR/wire.jsonl for the runs under a silo's state root."""

    def __init__(self, runs_root: str | Path, silo_id: str) -> None:
        self.runs_root = Path(runs_root)
        self.silo_id = silo_id

    def path(self, run_id: str) -> Path:
        return self.runs_root / run_id / FILE_NAME

    def _append(self, run_id: str, event: dict[str, Any]) -> None:
        event = {
            "time_ms": int(time.time() * 1000),
            "silo_id": self.silo_id,
            "run_id": run_id,
            **event,
        }
        path = self.path(run_id)
        make_dirs(path.parent)
        with path.open("ab") as fh:
            # A torn last line (the process was killed mid-write) is fenced off by a newline:
            # it stays one unreadable line (skipped with a warning) and this record is whole.
            if fh.tell() > 0:
                with path.open("rb") as tail:
                    tail.seek(-1, 2)
                    if tail.read(1) != b"\n":
                        fh.write(b"\n")
            fh.write(json.dumps(event, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())

    def fetched(self, run_id: str, round_: int, digest_hex: str) -> None:
        self._append(run_id, {"event": "global", "round": round_, "manifest_digest": digest_hex})

    def sent_update(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        info: StreamInfo,
        receipt_digest: bytes,
        layout: VectorLayout | None = None,
        instance: str = "",
    ) -> None:
        event: dict[str, Any] = {
            "event": "update",
            "round": round_,
            "attempt": attempt,
            "kind": str(info.kind),
            "manifest_digest": info.manifest_digest.hex(),
            "receipt_digest": receipt_digest.hex(),
            "tensors": [tensor_info_to_dict(t) for t in info.tensors],
        }
        if layout is not None:
            event.update(
                layout=layout_to_list(layout), layout_digest=layout.digest(), instance=instance
            )
        self._append(run_id, event)

    def sent_message(self, run_id: str, round_: int, attempt: int, stage: str, nbytes: int) -> None:
        self._append(
            run_id,
            {
                "event": "secagg",
                "round": round_,
                "attempt": attempt,
                "stage": stage,
                "bytes": nbytes,
            },
        )


def read_wire_record(path: str | Path) -> Iterator[dict[str, Any]]:
    """The events of a wire.jsonl file, in order (a torn last line is skipped with a warning)."""
    with Path(path).open() as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield dict(json.loads(line))
            except ValueError:
                logger.warning("%s:%d: unreadable line skipped", path, number)
