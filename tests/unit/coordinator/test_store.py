"""The coordinator's SQLite store on its own: the typed states match the schema, every record
round-trips through a second connection, refusals name what is wrong."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import get_args

import pytest

from pf2lora.common.errors import ConfigError, NotFound
from pf2lora.common.wire.tasks import MetricsKind
from pf2lora.coordinator import store as store_module
from pf2lora.coordinator.store import SCHEMA_VERSION, RoundState, RunState, Store


def _check_values(table: str, column: str) -> set[str]:
    """The values the schema's CHECK (column IN (...)) allows in one table."""
    body = re.search(rf"CREATE TABLE {table} \((.*?)\n\);", store_module._SCHEMA, re.S)
    assert body is not None, table
    m = re.search(rf"{column} TEXT NOT NULL CHECK \({column} IN \(([^)]*)\)\)", body.group(1))
    assert m is not None, (table, column)
    return {v.strip().strip("'") for v in m.group(1).split(",")}


@pytest.mark.parametrize(
    ("table", "column", "literal"),
    [
        ("runs", "state", RunState),
        ("rounds", "state", RoundState),
        ("metrics", "kind", MetricsKind),
    ],
)
def test_typed_states_are_exactly_what_the_schema_allows(
    table: str, column: str, literal: object
) -> None:
    assert set(get_args(literal)) == _check_values(table, column)


def test_the_schema_refuses_a_state_outside_the_literal(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_run("r1", "{}", 1, "ckpt-0", "d0")
    store.close()
    db = sqlite3.connect(tmp_path / "state.db")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        db.execute("UPDATE runs SET state='paused' WHERE run_id='r1'")
    db.close()


def test_a_run_its_rounds_and_metrics_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = Store(path)
    store.upsert_silo("silo-a", 10, "1.0", 5)
    store.upsert_silo("silo-b", 30, "1.0", 6)
    store.create_run("r1", '{"rounds": 1}', 10, "ckpt-0", "d0")
    attempt = store.open_round("r1", 1, 11)
    assert attempt == 1
    assert store.open_round("r1", 1, 12) == 2  # opened again: a new attempt
    store.seal_round("r1", 1, 2, [("silo-a", 0, 0.25, 10), ("silo-b", 1, 0.75, 30)])
    store.record_update("r1", 1, 2, "silo-a", "ab" * 32, 13, '{"kind": "UPDATE"}')
    store.complete_round("r1", 1, 2, "ckpt-1", "d1", 14)
    store.put_metrics("r1", 1, "silo-a", "train", {"loss": 0.5})
    store.put_metrics("r1", 1, "silo-a", "train", {"loss": 0.25})  # a re-run round reports again
    store.finish_run("r1", "completed", "", 15)
    store.close()

    again = Store(path)
    run = again.run("r1")
    assert (run.state, run.completed_rounds, run.finished_ms) == ("completed", 1, 15)
    rr = again.round_row("r1", 1)
    assert rr is not None and (rr.state, rr.attempt, rr.checkpoint_digest) == ("complete", 2, "d1")
    parts = again.participants("r1", 1)
    assert {(p.silo_id, p.attempt, p.reported_ms is not None) for p in parts} == {
        ("silo-a", 2, True),
        ("silo-b", 2, False),
    }
    assert again.metrics("r1", kind="train") == {(1, "silo-a", "train"): {"loss": 0.25}}
    assert [s.silo_id for s in again.silos()] == ["silo-a", "silo-b"]
    assert again.running_run_ids() == [] and again.latest_run_id() == "r1"
    again.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    db.close()


def test_refusals_name_the_run(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.create_run("r1", "{}", 1, "ckpt-0", "d0")
    with pytest.raises(ConfigError, match="'r1' exists already"):
        store.create_run("r1", "{}", 2, "ckpt-0", "d0")
    with pytest.raises(NotFound, match="'nope'"):
        store.run("nope")
    store.close()
