"""Global-state checkpoints: one safetensors file per completed round, written atomically.

A checkpoint is identified by its manifest digest (serde.manifest_digest over the tensors in
sorted-name order, the order FetchGlobal streams them in), so a silo can check what it
downloaded against the digest in its task, and an audit can check a file against the DB.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from pf2lora.common.errors import DataError
from pf2lora.common.state_io import load_state, save_state
from pf2lora.common.wire.manifest import manifest_digest, tensor_spec

logger = logging.getLogger(__name__)

_NAME = re.compile(r"global-(\d{5,})\.safetensors")


def canonical(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors in sorted-name order (the order of checkpoints, digests and streams)."""
    return {name: tensors[name] for name in sorted(tensors)}


def state_digest(tensors: Mapping[str, Tensor]) -> str:
    """Hex manifest digest of a global state in canonical order."""
    specs = [tensor_spec(name, t) for name, t in canonical(tensors).items()]
    return manifest_digest(specs).hex()


class CheckpointStore:
    """Files under ROOT/runs/RUN_ID/global-NNNNN.safetensors (round 0 is the initial state)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # The last checkpoint read by read_cached: silos that rejoin late fetch the same one.
        self._cached: tuple[str, int, str, dict[str, Tensor]] | None = None

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def path(self, run_id: str, round_: int) -> Path:
        return self.run_dir(run_id) / f"global-{round_:05d}.safetensors"

    def write(
        self, run_id: str, round_: int, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
    ) -> tuple[Path, str]:
        """Write atomically (temp file, fsync, rename, fsync dir); returns (path, digest)."""
        ordered = canonical(tensors)
        digest = state_digest(ordered)
        path = self.path(run_id, round_)
        save_state(path, ordered, {**meta, "run_id": run_id, "round": round_, "digest": digest})
        logger.info("checkpoint %s written (round %d, digest %s)", path, round_, digest[:16])
        return path, digest

    def read(
        self, run_id: str, round_: int, expected_digest: str | None = None
    ) -> dict[str, Tensor]:
        """The tensors of a checkpoint, checked against the recorded digest; DataError otherwise."""
        path = self.path(run_id, round_)
        if not path.is_file():
            raise DataError(f"checkpoint {path} is missing")
        tensors, _ = load_state(path)
        ordered = canonical(tensors)
        if expected_digest is not None and state_digest(ordered) != expected_digest:
            raise DataError(
                f"checkpoint {path} does not match the digest recorded for round {round_} "
                f"({expected_digest[:16]}...): the file was changed or damaged"
            )
        return ordered

    def read_cached(self, run_id: str, round_: int, expected_digest: str) -> dict[str, Tensor]:
        """`read`, keeping the last checkpoint read this way in memory (checked once)."""
        cached = self._cached
        if cached is not None and cached[:3] == (run_id, round_, expected_digest):
            return cached[3]
        tensors = self.read(run_id, round_, expected_digest)
        self._cached = (run_id, round_, expected_digest, tensors)
        return tensors

    def runs_on_disk(self) -> list[str]:
        """Run ids with at least one checkpoint under ROOT/runs/."""
        runs = self.root / "runs"
        if not runs.is_dir():
            return []
        return sorted(d.name for d in runs.iterdir() if d.is_dir() and self.rounds_on_disk(d.name))

    def rounds_on_disk(self, run_id: str) -> list[int]:
        d = self.run_dir(run_id)
        if not d.is_dir():
            return []
        return sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.fullmatch(p.name)))

    def remove_after(self, run_id: str, completed_rounds: int) -> list[Path]:
        """Delete checkpoints of rounds the DB does not mark complete (a crash between the file
        and the commit) and stray temp files; returns what was removed."""
        removed: list[Path] = []
        d = self.run_dir(run_id)
        if not d.is_dir():
            return removed
        for r in self.rounds_on_disk(run_id):
            if r > completed_rounds:
                p = self.path(run_id, r)
                logger.warning("removing checkpoint %s: round %d was never committed", p, r)
                p.unlink()
                removed.append(p)
        for p in d.glob(".global-*.tmp"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed
