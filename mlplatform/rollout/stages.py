"""The stages a model version goes through, recorded in the warehouse: plain functions.

    offline gate -> shadow -> canary -> champion        (or rejected, or rolled back)

Every move is a row of ``monitoring.rollout_history``: the version, the stage it enters, when,
who or what decided (the gate, the canary's judge, a sensor, a named person), why, and the
evidence (the judge's metrics and test). ``monitoring.rollout_stages`` is the stage each version
is in now, and ``stage_at`` answers "at what stage was version V at time T", so "which version
answered flight F, and at what stage" is a join of the inference log or the predictions on it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass

from mlplatform.warehouse import create_tables, has_table

SHADOW, CANARY, CHAMPION, REJECTED, ROLLED_BACK, RETIRED = (
    "shadow", "canary", "champion", "rejected", "rolled_back", "retired")
# where a version may go from each stage (None: a version the history has never seen)
MOVES = {
    None: {SHADOW, REJECTED, CHAMPION},   # the offline gate: into the shadow or rejected (champion: only the first)
    SHADOW: {CANARY, REJECTED},
    CANARY: {CHAMPION, ROLLED_BACK, REJECTED},
    CHAMPION: {RETIRED},                  # replaced by a newer champion
    REJECTED: set(),
    ROLLED_BACK: set(),
    RETIRED: set(),
}

# No sequence, no key: the DDL runs on a DuckDB file and on a DuckLake alike (which has neither);
# a move's number is the history's last one plus one, taken in the move's transaction.
HISTORY_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.rollout_history (
    move        BIGINT NOT NULL,    -- the order of moves
    moved_at    TIMESTAMP NOT NULL,
    model_name  VARCHAR NOT NULL,
    version     VARCHAR NOT NULL,
    stage       VARCHAR NOT NULL,   -- shadow | canary | champion | rejected | rolled_back | retired
    previous    VARCHAR,            -- the stage it left (NULL: none)
    decided_by  VARCHAR NOT NULL,   -- 'gate', 'judge', 'sensor', or a person's name
    reason      VARCHAR NOT NULL,
    evidence    JSON,
    dagster_run_id VARCHAR
);
CREATE VIEW IF NOT EXISTS monitoring.rollout_stages AS
SELECT model_name, version, arg_max(stage, move) AS stage, max(moved_at) AS since, max(move) AS last_move
FROM monitoring.rollout_history GROUP BY model_name, version;
-- a row per model, updated by every move: two moves at once conflict and one of them fails
CREATE TABLE IF NOT EXISTS monitoring.rollout_lock (model_name VARCHAR NOT NULL, moves BIGINT NOT NULL);
"""


class InvalidMove(ValueError):
    """A stage change the rollout does not allow (e.g. a rejected version into the canary)."""


@dataclass(frozen=True)
class Move:
    moved_at: dt.datetime
    version: str
    stage: str
    previous: str | None
    decided_by: str
    reason: str


def ensure_tables(conn) -> None:
    """The history's tables (writers call it; readers of a warehouse without them get nothing)."""
    create_tables(conn, HISTORY_DDL)


def _recorded(conn) -> bool:
    return has_table(conn, "monitoring", "rollout_history")


def current_stage(conn, model_name: str, version: str) -> str | None:
    if not _recorded(conn):
        return None
    row = conn.execute("SELECT stage FROM monitoring.rollout_stages WHERE model_name = ? AND version = ?",
                       [model_name, version]).fetchone()
    return row[0] if row else None


def versions_in(conn, model_name: str, stage: str) -> list[str]:
    """The versions in ``stage`` now, the most recent move first."""
    if not _recorded(conn):
        return []
    return [r[0] for r in conn.execute(
        "SELECT version FROM monitoring.rollout_stages WHERE model_name = ? AND stage = ? ORDER BY last_move DESC",
        [model_name, stage]).fetchall()]


def candidates(conn, model_name: str) -> dict[str, str]:
    """{stage: version} of the versions in the shadow and the canary now (at most one each: the
    latest to enter it)."""
    found = {}
    for stage in (SHADOW, CANARY):
        versions = versions_in(conn, model_name, stage)
        if versions:
            found[stage] = versions[0]
    return found


def move(conn, model_name: str, version: str, stage: str, decided_by: str, reason: str,
         evidence: dict | None = None, run_id: str | None = None, moved_at: dt.datetime | None = None,
         skip_stages: bool = False) -> Move:
    """Record ``version`` entering ``stage`` (refused with ``InvalidMove`` when its current stage
    does not lead there). Moving a version to champion retires the champion before it, in the
    same transaction; rolling a canary back changes nothing else. ``skip_stages``: a new version
    may become champion with a champion already there (an unstaged rollout)."""
    if not decided_by or not reason:
        raise ValueError("a stage change needs who or what decided it and why")
    ensure_tables(conn)
    moved_at = moved_at or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    # the model's lock row, committed before the move's transaction (inserted inside it, two
    # concurrent moves would each update only their own, invisible to the other)
    conn.execute("INSERT INTO monitoring.rollout_lock SELECT ?, 0 WHERE NOT EXISTS "
                 "(SELECT 1 FROM monitoring.rollout_lock WHERE model_name = ?)", [model_name, model_name])
    conn.execute("BEGIN TRANSACTION")
    try:
        conn.execute("UPDATE monitoring.rollout_lock SET moves = moves + 1 WHERE model_name = ?", [model_name])
        previous = current_stage(conn, model_name, version)
        if stage not in MOVES.get(previous, set()):
            raise InvalidMove(f"version {version} of {model_name} cannot go from {previous or 'nowhere'} to {stage}"
                              f" (from {previous or 'nowhere'}: {', '.join(sorted(MOVES.get(previous, ()))) or 'none'})")
        if previous is None and stage == CHAMPION and not skip_stages and versions_in(conn, model_name, CHAMPION):
            raise InvalidMove(f"version {version} of {model_name} cannot become champion without a shadow and a "
                              "canary: there is a champion already")
        if stage == CHAMPION:
            for older in versions_in(conn, model_name, CHAMPION):
                _insert(conn, moved_at, model_name, older, RETIRED, CHAMPION, decided_by,
                        f"replaced by version {version}", None, run_id)
        _insert(conn, moved_at, model_name, version, stage, previous, decided_by, reason, evidence, run_id)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return Move(moved_at, version, stage, previous, decided_by, reason)


def _insert(conn, moved_at, model_name, version, stage, previous, decided_by, reason, evidence, run_id) -> None:
    conn.execute("INSERT INTO monitoring.rollout_history (move, moved_at, model_name, version, stage, previous, "
                 "decided_by, reason, evidence, dagster_run_id) SELECT coalesce(max(move), 0) + 1, ?, ?, ?, ?, ?, ?, "
                 "?, ?, ? FROM monitoring.rollout_history",
                 [moved_at, model_name, version, stage, previous, decided_by, reason,
                  json.dumps(finite(evidence), default=str) if evidence is not None else None, run_id])


def finite(value):
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def stage_at(conn, model_name: str, version: str, when: dt.datetime) -> str | None:
    """The stage ``version`` was in at ``when`` (None: not yet in the history)."""
    if not _recorded(conn):
        return None
    row = conn.execute(
        "SELECT stage FROM monitoring.rollout_history WHERE model_name = ? AND version = ? AND moved_at <= ? "
        "ORDER BY moved_at DESC, move DESC LIMIT 1", [model_name, version, when]).fetchone()
    return row[0] if row else None


def history(conn, model_name: str, version: str | None = None) -> list[Move]:
    if not _recorded(conn):
        return []
    where, params = ("model_name = ?", [model_name]) if version is None else \
        ("model_name = ? AND version = ?", [model_name, version])
    return [Move(*r) for r in conn.execute(
        f"SELECT moved_at, version, stage, previous, decided_by, reason FROM monitoring.rollout_history "
        f"WHERE {where} ORDER BY move", params).fetchall()]
