"""A silo's durable state per run: private adapter + trainer state after every round, run record,
last global.

Layout under STATE_DIR/runs/RUN_ID/:
  run.json                          the run's spec as received (algorithm, model, seed, index)
  state-NNNNN.safetensors           private adapter and trainer state after round NNNNN
                                    (00000 = freshly initialised, before any training)
  global.safetensors                the latest global shared state fetched (for export)
  resume.json                       what the last process start loaded (round, private digest)
  wire.jsonl                        what this silo sent and fetched (silo/wire_record.py)
  secagg/rNNNNN-aA.keys             written (fsync) before the keys of attempt A are sent: a
                                    restarted silo never advertises a second key set for it
  secagg/rNNNNN.unmask.json         the (attempt, survivors) of the unmask request it answered
and STATE_DIR/current_run names the run this silo works on.

Round r always starts from the newest state of a round < r, so a round the coordinator hands
out again (after its restart, or a re-opened round) is trained from exactly the same state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pf2lora.common.algorithms.base import ClientAlgorithm
from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.learning.trainer import private_tensors
from pf2lora.common.state_io import atomic_write_bytes, load_state, save_state

logger = logging.getLogger(__name__)

_STATE = re.compile(r"state-(\d{5,})\.safetensors")
_SECAGG = re.compile(r"r(\d{5,})[-.].*")


def private_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of named tensors in sorted order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class SiloState:
    """Paths and atomic files of one silo's state directory; what is inside a state file is
    the client's (ClientAlgorithm.state, the trainer's format)."""

    def __init__(self, root: str | Path, keep_rounds: int = 2) -> None:
        self.root = Path(root)
        self.keep_rounds = max(2, keep_rounds)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    # ------------------------------------------------------------------ paths
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def state_path(self, run_id: str, round_: int) -> Path:
        return self.run_dir(run_id) / f"state-{round_:05d}.safetensors"

    def rounds_saved(self, run_id: str) -> list[int]:
        d = self.run_dir(run_id)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _STATE.fullmatch(p.name)))

    # ------------------------------------------------------------- run record
    def write_run_record(self, run_id: str, record: Mapping[str, Any]) -> None:
        atomic_write_bytes(
            self.run_dir(run_id) / "run.json", json.dumps(dict(record), indent=1).encode()
        )
        atomic_write_bytes(self.root / "current_run", run_id.encode())

    def read_run_record(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / "run.json"
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise DataError(f"{path}: this silo has no record of run {run_id!r}") from None

    def current_run(self) -> str:
        try:
            return (self.root / "current_run").read_text().strip()
        except FileNotFoundError:
            return ""

    def clear_current_run(self) -> None:
        (self.root / "current_run").unlink(missing_ok=True)

    # --------------------------------------------------------- private state
    def prepare(self, client: ClientAlgorithm, run_id: str, round_: int) -> int:
        """Load the newest state of a round < round_ into the client (saving the fresh state as
        round 0 first if there is none); returns the round it came from."""
        before = [r for r in self.rounds_saved(run_id) if r < round_]
        if not before:
            if self.rounds_saved(run_id):
                raise DataError(
                    f"run {run_id}: no state before round {round_} (pruned?); "
                    f"kept {self.rounds_saved(run_id)}"
                )
            self.save_after(client, run_id, 0)
            return 0
        r = before[-1]
        path = self.state_path(run_id, r)
        tensors, meta = load_state(path)
        try:
            client.restore(tensors, meta)
        except (ConfigError, DataError) as exc:
            raise DataError(f"state file {path}: {exc}") from exc
        return r

    def save_after(self, client: ClientAlgorithm, run_id: str, round_: int) -> Path:
        """Persist the client's private adapter and trainer state as of the end of round_."""
        path = self.state_path(run_id, round_)
        tensors, meta = client.state()
        save_state(path, tensors, meta)
        for old in self.rounds_saved(run_id)[: -self.keep_rounds]:
            self.state_path(run_id, old).unlink(missing_ok=True)
        return path

    def private_tensors(self, run_id: str, round_: int) -> dict[str, Tensor]:
        """The private adapter stored in the state after round_."""
        tensors, _ = load_state(self.state_path(run_id, round_))
        return private_tensors(tensors)

    def write_resume_record(
        self, run_id: str, round_: int, client: ClientAlgorithm
    ) -> dict[str, Any]:
        private = {n: p.detach() for n, p in client.model.private_parameters().items()}
        digest = private_digest(private)
        record: dict[str, Any] = {
            "run_id": run_id,
            "round": round_,
            "private_sha256": digest,
            "pid": os.getpid(),
        }
        atomic_write_bytes(self.run_dir(run_id) / "resume.json", json.dumps(record).encode())
        logger.info(
            "run %s: resumed from the state after round %d (private adapter %s)",
            run_id,
            round_,
            digest[:16],
        )
        return record

    # ----------------------------------------------------- secure aggregation
    def _secagg_dir(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "secagg"

    def keys_advertised(self, run_id: str, round_: int, attempt: int) -> bool:
        return (self._secagg_dir(run_id) / f"r{round_:05d}-a{attempt}.keys").is_file()

    def mark_keys_advertised(self, run_id: str, round_: int, attempt: int) -> None:
        """Durably record, before sending them, that keys for this attempt are advertised."""
        d = self._secagg_dir(run_id)
        atomic_write_bytes(d / f"r{round_:05d}-a{attempt}.keys", b"", mode=0o600)
        for old in d.iterdir():  # markers of rounds that can no longer be re-opened
            m = _SECAGG.fullmatch(old.name)
            if m and int(m.group(1)) < round_ - 1:
                old.unlink(missing_ok=True)

    def unmask_record(self, run_id: str, round_: int) -> dict[str, Any] | None:
        path = self._secagg_dir(run_id) / f"r{round_:05d}.unmask.json"
        try:
            return dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def record_unmask(
        self, run_id: str, round_: int, attempt: int, survivors: tuple[str, ...]
    ) -> None:
        """Durably record, before answering it, the survivor set of an unmask request."""
        record = {"attempt": attempt, "survivors": list(survivors)}
        atomic_write_bytes(
            self._secagg_dir(run_id) / f"r{round_:05d}.unmask.json",
            json.dumps(record).encode(),
            mode=0o600,
        )

    # ----------------------------------------------------------------- global
    def save_global(self, run_id: str, round_: int, tensors: Mapping[str, Tensor]) -> None:
        save_state(self.run_dir(run_id) / "global.safetensors", tensors, {"round": round_})

    def load_global(self, run_id: str) -> tuple[dict[str, Tensor], int]:
        path = self.run_dir(run_id) / "global.safetensors"
        if not path.is_file():
            raise DataError(f"{path}: no global state was fetched for run {run_id!r}")
        tensors, meta = load_state(path)
        return tensors, int(meta["round"])
