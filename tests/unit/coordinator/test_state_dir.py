"""A coordinator's state directory that lies is refused: a missing, emptied or WAL-less database
beside checkpoints it does not know, or a file that is not a database, never passes for a fresh
start. What it creates is owner-only."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest
import torch

from pf2lora.common.errors import ConfigError
from pf2lora.coordinator.server import Coordinator
from tests.helpers.inprocess import constant_state, coordinator_config, plain_run_config

STATE = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}


def _coordinator(state_dir: Path) -> Coordinator:
    return Coordinator(
        coordinator_config(state_dir, "fed", ("a", "b")), initial_state=constant_state(STATE)
    )


def _with_a_run(state_dir: Path) -> str:
    coord = _coordinator(state_dir)
    run_id = coord.engine.start_run(plain_run_config(), "run-1")
    coord.store.close()
    return run_id


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_missing_or_emptied_database_beside_checkpoints_is_refused(
    tmp_path: Path, damage: str
) -> None:
    state = tmp_path / "state"
    _with_a_run(state)
    db = state / "state.db"
    for side in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        side.unlink(missing_ok=True)
    if damage == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"runs/run-1.*restore state\.db") as info:
        _coordinator(state)
    assert "\n" not in str(info.value)


def test_a_database_copied_without_its_wal_is_refused(tmp_path: Path) -> None:
    """All committed state was in the -wal; the copy holds an older, empty database."""
    state, copy = tmp_path / "state", tmp_path / "copy"
    copy.mkdir()
    _coordinator(copy).store.close()  # an empty database (schema only), as a WAL-less copy is
    _with_a_run(state)
    shutil.copytree(state / "runs", copy / "runs")
    with pytest.raises(ConfigError, match="runs the database does not know.*run-1"):
        _coordinator(copy)


def test_a_file_that_is_not_a_database_is_one_clear_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match=r"state\.db is not a readable SQLite database") as info:
        _coordinator(state)
    assert "\n" not in str(info.value)


def test_a_fresh_state_dir_starts_and_everything_it_writes_is_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _with_a_run(state)
    again = _coordinator(state)  # the same directory, consistent: resumes
    assert again.engine.active_run_id() == "run-1"
    again.store.close()
    files = [p for p in state.rglob("*") if p.is_file()]
    assert any(p.name == "state.db" for p in files) and any(
        p.suffix == ".safetensors" for p in files
    )
    for p in [state, *state.rglob("*")]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
