"""The coordinator's durable records in SQLite (WAL, one writer): silos, runs, rounds, participants,
metrics.

Only the round engine writes, always under this object's lock, each change in one
transaction. Tensors never live here: global states are checkpoint files (checkpoints.py)
whose manifest digests are recorded here when a round completes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pf2lora.common.errors import ConfigError, NotFound
from pf2lora.common.state_io import make_dirs
from pf2lora.common.wire.tasks import MetricsKind

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# The values the schema's CHECK constraints allow (tests hold the two to each other), with
# MetricsKind (common/wire/tasks.py) for metrics.kind.
RunState = Literal["running", "completed", "stopped", "failed"]
RoundState = Literal["open", "complete"]

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE silos (
    silo_id TEXT PRIMARY KEY,
    num_samples INTEGER NOT NULL,
    software_version TEXT NOT NULL,
    join_order INTEGER NOT NULL UNIQUE,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    config_json TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'completed', 'stopped', 'failed')),
    completed_rounds INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    finished_ms INTEGER,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE rounds (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('open', 'complete')),
    opened_ms INTEGER NOT NULL,
    completed_ms INTEGER,
    checkpoint TEXT,
    checkpoint_digest TEXT,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE participants (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    silo_id TEXT NOT NULL,
    client_index INTEGER NOT NULL,
    weight REAL NOT NULL,
    num_samples INTEGER NOT NULL,
    reported_ms INTEGER,
    manifest_digest TEXT,
    update_manifest TEXT,
    PRIMARY KEY (run_id, round, attempt, silo_id)
);
CREATE TABLE metrics (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    silo_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('train', 'evaluate')),
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, round, silo_id, kind, name)
);
CREATE TABLE round_stages (
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    stage TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL,
    silos TEXT NOT NULL,
    PRIMARY KEY (run_id, round, attempt, stage)
);
"""
# Schema 1 -> 2: the manifest of every accepted update (the audit compares it with the silo's
# record) and per-stage timings of every round attempt (secure-aggregation stages included).
_MIGRATE_1_TO_2 = (
    "ALTER TABLE participants ADD COLUMN update_manifest TEXT",
    _SCHEMA[_SCHEMA.index("CREATE TABLE round_stages") :].strip().rstrip(";"),
)


@dataclass(frozen=True)
class SiloRow:
    silo_id: str
    num_samples: int
    software_version: str
    join_order: int
    first_seen_ms: int
    last_seen_ms: int


@dataclass(frozen=True)
class RunRow:
    run_id: str
    config_json: str
    state: RunState
    completed_rounds: int
    created_ms: int
    finished_ms: int | None
    reason: str


@dataclass(frozen=True)
class RoundRow:
    run_id: str
    round: int
    attempt: int
    state: RoundState
    opened_ms: int
    completed_ms: int | None
    checkpoint: str | None
    checkpoint_digest: str | None


@dataclass(frozen=True)
class ParticipantRow:
    run_id: str
    round: int
    attempt: int
    silo_id: str
    client_index: int
    weight: float
    num_samples: int
    reported_ms: int | None
    manifest_digest: str | None
    update_manifest: str | None = None  # JSON (common/wire/manifest_json.py): kind and tensors


@dataclass(frozen=True)
class StageRow:
    """One stage of a round attempt: when it ran and which silos completed it."""

    run_id: str
    round: int
    attempt: int
    stage: str
    started_ms: int
    ended_ms: int
    silos: tuple[str, ...]


class Store:
    """One SQLite connection, used by one thread at a time (the lock); the single writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        make_dirs(self.path.parent)
        if not self.path.exists():  # owner-only from its first byte (SQLite copies the mode
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # to -wal)
        self._lock = threading.RLock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            # WAL: readers do not block the writer; synchronous=FULL: a committed round
            # survives power loss (the commit is what marks a round complete).
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA quick_check").fetchall()
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise ConfigError(
                f"{self.path} is not a readable SQLite database ({exc}): restore it, together "
                "with its -wal file, from your backup"
            ) from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._lock:
            has_meta = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            if not has_meta:
                with self._tx() as db:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                    )
                logger.info(
                    "created coordinator database %s (schema %d)", self.path, SCHEMA_VERSION
                )
                return
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(row["value"]) if row else -1
            if version == 1:
                with self._tx() as db:
                    for statement in _MIGRATE_1_TO_2:
                        db.execute(statement)
                    db.execute(
                        "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                    )
                logger.info(
                    "upgraded coordinator database %s from schema 1 to %d",
                    self.path,
                    SCHEMA_VERSION,
                )
                version = SCHEMA_VERSION
            if version != SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path}: database schema {version}, this pf2lora reads {SCHEMA_VERSION}; "
                    "use the matching pf2lora version or a new storage.state_dir"
                )

    # ---------------------------------------------------------------- silos
    def upsert_silo(self, silo_id: str, num_samples: int, version: str, now_ms: int) -> None:
        with self._tx() as db:
            row = db.execute("SELECT join_order FROM silos WHERE silo_id=?", (silo_id,)).fetchone()
            if row is None:
                order = db.execute(
                    "SELECT COALESCE(MAX(join_order), -1) + 1 FROM silos"
                ).fetchone()[0]
                db.execute(
                    "INSERT INTO silos VALUES (?, ?, ?, ?, ?, ?)",
                    (silo_id, num_samples, version, order, now_ms, now_ms),
                )
            else:
                db.execute(
                    "UPDATE silos SET num_samples=?, software_version=?, last_seen_ms=? WHERE "
                    "silo_id=?",
                    (num_samples, version, now_ms, silo_id),
                )

    def silos(self) -> list[SiloRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM silos ORDER BY join_order").fetchall()
        return [SiloRow(**dict(r)) for r in rows]

    def silo(self, silo_id: str) -> SiloRow | None:
        with self._lock:
            r = self._db.execute("SELECT * FROM silos WHERE silo_id=?", (silo_id,)).fetchone()
        return None if r is None else SiloRow(**dict(r))

    # ----------------------------------------------------------------- runs
    def create_run(
        self, run_id: str, config_json: str, now_ms: int, checkpoint: str, digest: str
    ) -> None:
        """Insert the run with its round 0 (the initial global state, already checkpointed)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise ConfigError(f"run_id={run_id!r} exists already; choose another id")
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs").fetchone()[0]
            db.execute(
                "INSERT INTO runs (run_id, seq, config_json, state, created_ms) "
                "VALUES (?, ?, ?, 'running', ?)",
                (run_id, seq, config_json, now_ms),
            )
            db.execute(
                "INSERT INTO rounds VALUES (?, 0, 0, 'complete', ?, ?, ?, ?)",
                (run_id, now_ms, now_ms, checkpoint, digest),
            )

    def run(self, run_id: str) -> RunRow:
        with self._lock:
            r = self._db.execute(
                "SELECT run_id, config_json, state, completed_rounds, created_ms, finished_ms, "
                "reason "
                "FROM runs WHERE run_id=?",
                (run_id,),
            ).fetchone()
        if r is None:
            raise NotFound(f"run {run_id!r} does not exist (see `pf2lora run status`)")
        return RunRow(**dict(r))

    def run_ids(self) -> list[str]:
        """Every run the database knows, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT run_id FROM runs ORDER BY seq").fetchall()
        return [str(r["run_id"]) for r in rows]

    def latest_run_id(self) -> str | None:
        with self._lock:
            r = self._db.execute("SELECT run_id FROM runs ORDER BY seq DESC LIMIT 1").fetchone()
        return None if r is None else str(r["run_id"])

    def running_run_ids(self) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id FROM runs WHERE state='running' ORDER BY seq"
            ).fetchall()
        return [str(r["run_id"]) for r in rows]

    def finish_run(self, run_id: str, state: RunState, reason: str, now_ms: int) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET state=?, reason=?, finished_ms=? WHERE run_id=?",
                (state, reason, now_ms, run_id),
            )

    # --------------------------------------------------------------- rounds
    def open_round(self, run_id: str, round_: int, now_ms: int) -> int:
        """(Re)open a round; returns its attempt number (1, then +1 per re-opening)."""
        with self._tx() as db:
            r = db.execute(
                "SELECT attempt, state FROM rounds WHERE run_id=? AND round=?", (run_id, round_)
            ).fetchone()
            if r is None:
                db.execute(
                    "INSERT INTO rounds (run_id, round, attempt, state, opened_ms) "
                    "VALUES (?, ?, 1, 'open', ?)",
                    (run_id, round_, now_ms),
                )
                return 1
            if r["state"] == "complete":
                raise AssertionError(f"round {round_} of {run_id} is complete already")
            attempt = int(r["attempt"]) + 1
            db.execute(
                "UPDATE rounds SET attempt=?, opened_ms=? WHERE run_id=? AND round=?",
                (attempt, now_ms, run_id, round_),
            )
            return attempt

    def seal_round(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        participants: Sequence[tuple[str, int, float, int]],
    ) -> None:
        """Record the participants (silo_id, client_index, weight, num_samples) of an attempt."""
        with self._tx() as db:
            db.executemany(
                "INSERT INTO participants (run_id, round, attempt, silo_id, client_index, weight, "
                "num_samples) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(run_id, round_, attempt, *p) for p in participants],
            )

    def record_update(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        silo_id: str,
        digest: str,
        now_ms: int,
        manifest_json: str | None = None,
    ) -> None:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE participants SET reported_ms=?, manifest_digest=?, update_manifest=? WHERE "
                "run_id=? AND round=? AND attempt=? AND silo_id=? AND reported_ms IS NULL",
                (now_ms, digest, manifest_json, run_id, round_, attempt, silo_id),
            )
            if cur.rowcount != 1:
                raise AssertionError(f"no open participant row for {silo_id} in round {round_}")

    def complete_round(
        self, run_id: str, round_: int, attempt: int, checkpoint: str, digest: str, now_ms: int
    ) -> None:
        """Mark a round complete (its checkpoint is on disk already): one transaction."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE rounds SET state='complete', completed_ms=?, checkpoint=?, "
                "checkpoint_digest=? WHERE run_id=? AND round=? AND attempt=? AND state='open'",
                (now_ms, checkpoint, digest, run_id, round_, attempt),
            )
            if cur.rowcount != 1:
                raise AssertionError(f"round {round_} attempt {attempt} of {run_id} is not open")
            db.execute("UPDATE runs SET completed_rounds=? WHERE run_id=?", (round_, run_id))

    def round_row(self, run_id: str, round_: int) -> RoundRow | None:
        with self._lock:
            r = self._db.execute(
                "SELECT * FROM rounds WHERE run_id=? AND round=?", (run_id, round_)
            ).fetchone()
        return None if r is None else RoundRow(**dict(r))

    def rounds(self, run_id: str) -> list[RoundRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run_id,)
            ).fetchall()
        return [RoundRow(**dict(r)) for r in rows]

    def participants(
        self, run_id: str, round_: int, attempt: int | None = None
    ) -> list[ParticipantRow]:
        query = "SELECT * FROM participants WHERE run_id=? AND round=?"
        args: tuple = (run_id, round_)
        if attempt is not None:
            query += " AND attempt=?"
            args += (attempt,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY attempt, silo_id", args).fetchall()
        return [ParticipantRow(**dict(r)) for r in rows]

    # --------------------------------------------------------------- stages
    def record_stage(
        self,
        run_id: str,
        round_: int,
        attempt: int,
        stage: str,
        started_ms: int,
        ended_ms: int,
        silos: Sequence[str],
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO round_stages VALUES (?, ?, ?, ?, ?, ?, ?)",
                (run_id, round_, attempt, stage, started_ms, ended_ms, json.dumps(sorted(silos))),
            )

    def stages(self, run_id: str, round_: int, attempt: int | None = None) -> list[StageRow]:
        query = "SELECT * FROM round_stages WHERE run_id=? AND round=?"
        args: tuple = (run_id, round_)
        if attempt is not None:
            query += " AND attempt=?"
            args += (attempt,)
        with self._lock:
            rows = self._db.execute(
                query + " ORDER BY attempt, started_ms, ended_ms", args
            ).fetchall()
        return [StageRow(**{**dict(r), "silos": tuple(json.loads(r["silos"]))}) for r in rows]

    # -------------------------------------------------------------- metrics
    def put_metrics(
        self,
        run_id: str,
        round_: int,
        silo_id: str,
        kind: MetricsKind,
        metrics: Mapping[str, float],
    ) -> None:
        """Insert or replace a silo's metrics of one round (a re-run round reports again)."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, round_, silo_id, kind, k, float(v)) for k, v in sorted(metrics.items())],
            )

    def metrics(
        self, run_id: str, kind: MetricsKind | None = None, round_: int | None = None
    ) -> dict[tuple[int, str, str], dict[str, float]]:
        """{(round, silo_id, kind): {name: value}}."""
        query = "SELECT * FROM metrics WHERE run_id=?"
        args: tuple = (run_id,)
        if kind is not None:
            query += " AND kind=?"
            args += (kind,)
        if round_ is not None:
            query += " AND round=?"
            args += (round_,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY round, silo_id, name", args).fetchall()
        out: dict[tuple[int, str, str], dict[str, float]] = {}
        for r in rows:
            out.setdefault((int(r["round"]), str(r["silo_id"]), str(r["kind"])), {})[
                str(r["name"])
            ] = float(r["value"])
        return out

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table except silos' last_seen (tests compare before/after)."""
        out: dict[str, list[tuple]] = {}
        with self._lock:
            for table in ("runs", "rounds", "participants", "metrics", "round_stages"):
                out[table] = [
                    tuple(r) for r in self._db.execute(f"SELECT * FROM {table} ORDER BY 1, 2")
                ]
            out["silos"] = [
                tuple(r)
                for r in self._db.execute(
                    "SELECT silo_id, num_samples, software_version, join_order FROM silos ORDER BY "
                    "1"
                )
            ]
        return out
