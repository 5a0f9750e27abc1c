"""A silo's durable state per run: private adapter + trainer state after every round, run record,
last global.

Layout under STATE_DIR/runs/RUN_ID/:
  run.json                          the run's spec as received (algorithm, model, seed, index)
  state-NNNNN.safetensors           private adapter and trainer state after round NNNNN
                                    (00000 = freshly initialised, before any training)
  global.safetensors                the latest global shared state fetched (for export)
  saved.json                        the newest round whose state was saved (written after it):
                                    a state file missing below it is damage, never a fallback
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

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from pf2lora.common.algorithms.base import ClientAlgorithm
from pf2lora.common.errors import ConfigError, DataError
from pf2lora.common.learning.trainer import private_tensors
from pf2lora.common.names import is_label
from pf2lora.common.state_io import atomic_write_bytes, load_state, save_state, tensors_digest

logger = logging.getLogger(__name__)

_STATE = re.compile(r"state-(\d{5,})\.safetensors")
_SECAGG = re.compile(r"r(\d{5,})[-.].*")


def private_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of the private tensors in sorted order."""
    return tensors_digest(tensors)


START_OVER = (
    "restore the file from a backup of this silo's state directory, or start this silo over "
    "for the run with `pf2lora silo serve --start-over` (its private adapter begins again; "
    "the damaged files are kept aside)"
)


class StateDamaged(DataError):
    """This silo's own state is missing or damaged: no silent fallback, the operator decides."""


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
        path = self.root / "current_run"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return ""
        try:
            run_id = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            run_id = "\x00"  # refused below
        if run_id and not is_label(run_id):
            raise StateDamaged(
                f"{path} is damaged (it must name one run, got {raw[:40]!r}): restore it, or "
                "delete it to let this silo take the coordinator's active run"
            )
        return run_id

    def clear_current_run(self) -> None:
        (self.root / "current_run").unlink(missing_ok=True)

    # --------------------------------------------------------- private state
    def prepare(self, client: ClientAlgorithm, run_id: str, round_: int) -> int:
        """Load the newest state of a round < round_ into the client (saving the fresh state as
        round 0 first if this silo has none for the run); returns the round it came from.

        StateDamaged (naming the file and the choices) when that state is missing although
        this silo saved it (saved.json says so) or when it does not read back as written.
        """
        saved = self.rounds_saved(run_id)
        recorded = self.saved_round(run_id)
        before = [r for r in saved if r < round_]
        if recorded is not None:
            needed = min(recorded, round_ - 1)  # this state existed: it must still, unless
            pruned = needed <= recorded - self.keep_rounds  # keep_rounds pruned it on purpose
            if not pruned and (not before or before[-1] < needed):
                raise StateDamaged(
                    f"{self.state_path(run_id, needed)} is missing: this silo saved its state "
                    f"after round {recorded} of run {run_id} and round {round_} starts from "
                    f"round {needed}; {START_OVER}"
                )
        if not before:
            if saved:
                raise DataError(
                    f"run {run_id}: no state before round {round_} (pruned?); kept {saved}"
                )
            self.save_after(client, run_id, 0)
            return 0
        r = before[-1]
        path = self.state_path(run_id, r)
        try:
            tensors, meta = load_state(path)
            client.restore(tensors, meta)
        except (ConfigError, DataError) as exc:
            what = str(exc) if str(path) in str(exc) else f"state file {path}: {exc}"
            raise StateDamaged(f"{what}; {START_OVER}") from exc
        return r

    def save_after(self, client: ClientAlgorithm, run_id: str, round_: int) -> Path:
        """Persist the client's private adapter and trainer state as of the end of round_."""
        path = self.state_path(run_id, round_)
        tensors, meta = client.state()
        save_state(path, tensors, meta)
        if round_ >= (self.saved_round(run_id) or 0):
            self._write_json(run_id, "saved.json", {"round": round_})
        for old in self.rounds_saved(run_id)[: -self.keep_rounds]:
            self.state_path(run_id, old).unlink(missing_ok=True)
        return path

    def saved_round(self, run_id: str) -> int | None:
        """The newest round whose state this silo saved for the run (None: none yet)."""
        path = self.run_dir(run_id) / "saved.json"
        try:
            record = json.loads(path.read_bytes())
            return int(record["round"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise StateDamaged(f"{path} is damaged ({exc}); {START_OVER}") from None

    def start_over(self, run_id: str) -> Path:
        """Set this silo's private state for the run aside (never deleted): the next round
        starts from a fresh private adapter. Secure-aggregation records stay where they are."""
        aside = self.run_dir(run_id) / f"set-aside-{int(time.time())}"
        aside.mkdir(parents=True, exist_ok=True)
        for p in self.run_dir(run_id).iterdir():
            if _STATE.fullmatch(p.name) or p.name in ("saved.json", "resume.json"):
                p.rename(aside / p.name)
        logger.warning(
            "run %s: this silo starts over: its state was set aside in %s", run_id, aside
        )
        return aside

    def _write_json(self, run_id: str, name: str, record: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.run_dir(run_id) / name, json.dumps(dict(record)).encode(), 0o600)

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
