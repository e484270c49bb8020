"""The champion/challenger gate and the record of its decisions. Plain functions.

Rule (configurable): the challenger's ROC AUC on the held-out window must beat the champion's
by at least ``min_auc_gain``, and no carrier with at least ``min_segment_rows`` flights in the
window may lose more than ``segment_tolerance`` of AUC. With no champion yet, the challenger
must beat a trivial baseline: the training delay rate predicted for every flight (AUC 0.5 and
that rate's log loss), by ``baseline_auc_margin`` of AUC and with a lower log loss.

Every decision is a row of ``monitoring.model_promotions``; ``monitoring.champion_history``
answers "which version was champion at time T".
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlplatform.warehouse import create_tables

if TYPE_CHECKING:
    from mlplatform.partitions import Window

PROMOTIONS_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.model_promotions (
    decided_at          TIMESTAMP NOT NULL,
    model_name          VARCHAR NOT NULL,
    challenger_version  VARCHAR NOT NULL,
    champion_version    VARCHAR,            -- NULL: there was no champion
    decision            VARCHAR NOT NULL,   -- 'promoted' | 'rejected'
    reason              VARCHAR NOT NULL,
    eval_start          DATE,
    eval_end            DATE,
    challenger_roc_auc  DOUBLE,
    champion_roc_auc    DOUBLE,
    challenger_log_loss DOUBLE,
    champion_log_loss   DOUBLE,
    details             JSON,               -- all metrics and per-carrier AUCs of both
    dagster_run_id      VARCHAR,
    applied_at          TIMESTAMP           -- when the champion alias was moved
);
CREATE OR REPLACE VIEW monitoring.champion_history AS
SELECT model_name, challenger_version AS version, applied_at AS champion_from,
       lead(applied_at) OVER (PARTITION BY model_name ORDER BY applied_at) AS champion_until
FROM monitoring.model_promotions
WHERE decision = 'promoted' AND applied_at IS NOT NULL;
"""


@dataclass(frozen=True)
class PromotionRule:
    min_auc_gain: float = 0.002
    segment_tolerance: float = 0.02
    min_segment_rows: int = 500
    baseline_auc_margin: float = 0.05


@dataclass
class Evaluation:
    version: str
    metrics: dict[str, float]
    segments: dict[str, float] = field(default_factory=dict)


@dataclass
class Decision:
    promote: bool
    reason: str


def baseline(positive_rate: float, eval_positive_rate: float) -> Evaluation:
    """The trivial model: predict the training delay rate for every flight."""
    p = min(max(positive_rate, 1e-6), 1 - 1e-6)
    y = eval_positive_rate
    log_loss = -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return Evaluation("baseline", {"roc_auc": 0.5, "log_loss": log_loss})


def decide(challenger: Evaluation, champion: Evaluation | None, base: Evaluation, rule: PromotionRule) -> Decision:
    auc = challenger.metrics["roc_auc"]
    if champion is None:
        target = base.metrics["roc_auc"] + rule.baseline_auc_margin
        if not auc >= target:
            return Decision(False, f"first model: ROC AUC {auc:.4f} below the baseline's {target:.4f}")
        if not challenger.metrics["log_loss"] < base.metrics["log_loss"]:
            return Decision(
                False,
                f"first model: log loss {challenger.metrics['log_loss']:.4f} not below the baseline's "
                f"{base.metrics['log_loss']:.4f}",
            )
        return Decision(True, f"first model: ROC AUC {auc:.4f} beats the trivial baseline (0.5 + {rule.baseline_auc_margin})")
    gain = auc - champion.metrics["roc_auc"]
    if not gain >= rule.min_auc_gain:
        return Decision(
            False,
            f"ROC AUC {auc:.4f} vs champion {champion.metrics['roc_auc']:.4f}: gain {gain:+.4f} "
            f"below the required {rule.min_auc_gain:+.4f}",
        )
    regressions = {
        segment: challenger.segments[segment] - champion_auc
        for segment, champion_auc in champion.segments.items()
        if segment in challenger.segments and challenger.segments[segment] - champion_auc < -rule.segment_tolerance
    }
    if regressions:
        worst = ", ".join(f"{s} {d:+.4f}" for s, d in sorted(regressions.items(), key=lambda kv: kv[1]))
        return Decision(False, f"ROC AUC gain {gain:+.4f}, but carriers regress beyond {rule.segment_tolerance}: {worst}")
    return Decision(True, f"ROC AUC {auc:.4f} beats champion {champion.metrics['roc_auc']:.4f} by {gain:+.4f}; no carrier regresses")


def record(conn, model_name: str, challenger: Evaluation, champion: Evaluation | None, decision: Decision,
           window: "Window", run_id: str | None, decided_at: dt.datetime | None = None) -> None:
    create_tables(conn, PROMOTIONS_DDL)
    decided_at = decided_at or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    details = {
        "challenger": {"metrics": challenger.metrics, "segments": challenger.segments},
        "champion": {"metrics": champion.metrics, "segments": champion.segments} if champion else None,
    }
    conn.execute(
        "INSERT INTO monitoring.model_promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
        [
            decided_at, model_name, challenger.version, champion.version if champion else None,
            "promoted" if decision.promote else "rejected", decision.reason, window[0], window[1],
            challenger.metrics.get("roc_auc"), champion.metrics.get("roc_auc") if champion else None,
            challenger.metrics.get("log_loss"), champion.metrics.get("log_loss") if champion else None,
            json.dumps(details), run_id,
        ],
    )


@dataclass(frozen=True)
class Recorded:
    """The latest row of ``monitoring.model_promotions`` about a version."""

    decision: str  # 'promoted' | 'rejected'
    decided_at: dt.datetime
    applied_at: dt.datetime | None  # when the champion alias moved to it (promoted ones)
    dagster_run_id: str | None
    reason: str
    eval_start: dt.date | None
    eval_end: dt.date | None

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def latest_decision(conn, model_name: str, version: str) -> Recorded | None:
    """The latest decision on ``version``, or None."""
    create_tables(conn, PROMOTIONS_DDL)
    row = conn.execute(
        "SELECT decision, decided_at, applied_at, dagster_run_id, reason, eval_start, eval_end "
        "FROM monitoring.model_promotions "
        "WHERE model_name = ? AND challenger_version = ? ORDER BY decided_at DESC LIMIT 1",
        [model_name, version],
    ).fetchone()
    return Recorded(*row) if row else None


def mark_applied(conn, model_name: str, version: str, applied_at: dt.datetime | None = None) -> None:
    applied_at = applied_at or dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    conn.execute(
        "UPDATE monitoring.model_promotions SET applied_at = ? WHERE model_name = ? AND challenger_version = ? "
        "AND decision = 'promoted' AND decided_at = (SELECT max(decided_at) FROM monitoring.model_promotions "
        "WHERE model_name = ? AND challenger_version = ?)",
        [applied_at, model_name, version, model_name, version],
    )


def champion_at(conn, model_name: str, when: dt.datetime) -> str | None:
    """The version that was champion at ``when``, from the warehouse alone."""
    create_tables(conn, PROMOTIONS_DDL)
    row = conn.execute(
        "SELECT version FROM monitoring.champion_history WHERE model_name = ? AND champion_from <= ? "
        "AND (champion_until IS NULL OR champion_until > ?)",
        [model_name, when, when],
    ).fetchone()
    return row[0] if row else None
