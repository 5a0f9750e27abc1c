"""The coordinator's state directory: its database and the checkpoints beside it, opened only
when the two agree (docs/operations.md, backup and restore).

A missing or emptied database, or one copied without its -wal file, next to checkpoints of runs
it does not know would otherwise look like a fresh start: the runs would vanish and silos be
told "no such run". That is refused with one line saying what to restore.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pf2lora.common.errors import ConfigError
from pf2lora.common.state_io import make_dirs
from pf2lora.coordinator.checkpoints import CheckpointStore
from pf2lora.coordinator.store import Store

logger = logging.getLogger(__name__)

DB_NAME = "state.db"


def _names(runs: list[str]) -> str:
    return ", ".join(runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")


def open_state_dir(state_dir: str | Path) -> tuple[Store, CheckpointStore]:
    """(store, checkpoints) of a consistent state directory; ConfigError otherwise."""
    root = make_dirs(state_dir, 0o700)  # owner-only when this creates it
    checkpoints = CheckpointStore(root)
    on_disk = checkpoints.runs_on_disk()
    db = root / DB_NAME
    empty = db.exists() and db.stat().st_size == 0
    if (not db.exists() or empty) and on_disk:
        what = "is empty" if empty else "is missing"
        raise ConfigError(
            f"{db} {what} but {root / 'runs'} holds checkpoints of {len(on_disk)} run(s) "
            f"(runs/{_names(on_disk)}): restore state.db together with its state.db-wal from "
            f"your backup, or move {root / 'runs'} away to start a new federation state"
        )
    if empty:
        db.unlink()  # an empty file and nothing beside it: a fresh start
    store = Store(db)
    unknown = sorted(set(on_disk) - set(store.run_ids()))
    if unknown:
        store.close()
        raise ConfigError(
            f"{root / 'runs'} holds checkpoints of runs the database does not know "
            f"({_names(unknown)}): was {db} restored without its state.db-wal? Restore both "
            "from the same backup"
        )
    return store, checkpoints
