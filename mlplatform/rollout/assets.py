"""The staged rollout in the graph: thin glue over ``stages`` (the history), ``judge`` (the
verdict) and the MLflow aliases.

    model_evaluation (the offline gate) -> shadow -> canary -> champion   (or rejected / rolled back)

- The gate puts a version that passes into the **shadow** when there is a champion already
  (``RolloutPolicy.staged``; unstaged, or the first model, it becomes champion at once, as before).
- ``predictions/flight_delay`` scores every flight with the champion and with the shadow and
  canary versions (a row per version, ``stage`` per row); the server answers a stable share of
  flights with the canary and scores every request with the shadow off the request path.
- ``monitoring/online_evaluation`` runs when a day's labels land: per candidate, the flights it and
  the champion both scored while it was in its stage, judged by ``judge.judge`` (DeLong's test over
  the window so far, carriers, serving errors and latency from the inference log). A shadow that is
  not worse after ``shadow_days`` enters the canary; a canary is promoted, rolled back, rejected,
  or waits (for more labels, or for an approval: ``approve_canary_job``).

Every move is a row of ``monitoring.rollout_history`` first; the MLflow aliases follow it
(``champion``, ``challenger`` for the shadow, ``canary``), and a promotion records a
materialization of ``champion_model`` with the version, which the next predictions read.
"""


import datetime as dt
import json
from dataclasses import asdict
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetMaterialization,
    Config,
    ConfigurableResource,
    Failure,
    MaterializeResult,
    MetadataValue,
    OpExecutionContext,
    asset,
    job,
    op,
)
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.automation import on_new_data
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import Window, daily_partitions, single_run, window_of
from mlplatform.retention import inference_log_sql
from mlplatform.rollout import judge as j
from mlplatform.rollout import stages
from mlplatform.rollout.stages import CANARY, CHAMPION, REJECTED, ROLLED_BACK, SHADOW
from mlplatform.settings import Settings
from mlplatform.training import promotion
from mlplatform.training.tracking import CHAMPION as CHAMPION_ALIAS
from mlplatform.training.tracking import (
    CANARY_ALIAS,
    CANARY_SHARE_TAG,
    SHADOW_ALIAS,
    MlflowTracking,
    TrainedModel,
    training_window,
)
from mlplatform.warehouse import create_tables, has_table, in_one_transaction

OWNERS = ["team:ml-platform"]
# the MLflow alias of each stage (``challenger`` stays the latest trained version, whatever its stage)
ALIASES = {CHAMPION: CHAMPION_ALIAS, SHADOW: SHADOW_ALIAS, CANARY: CANARY_ALIAS}
RULE = j.CanaryRule()


class RolloutPolicy(ConfigurableResource):
    """How a new version reaches traffic (``MLPLATFORM_ROLLOUT_*``, ``MLPLATFORM_CANARY_SHARE``;
    the defaults are ``judge.CanaryRule``'s)."""

    staged: bool = Field(True, description="A version the gate passes goes through shadow and canary (False: "
                         "it becomes champion at once).")
    shadow_days: int = Field(1, description="Days of labels a shadow must have, not worse than the champion, "
                             "before it takes a canary share.")
    canary_share: float = Field(RULE.share, description="Share of flights the canary answers.")
    min_labelled_flights: int = Field(RULE.min_labelled_flights, description="Labelled flights before a canary "
                                      "is promoted.")
    min_days: int = Field(RULE.min_days, description="Days of labels before a canary is promoted.")
    max_days: int = Field(RULE.max_days, description="Days of labels after which a canary not shown better is "
                          "rejected.")
    level: float = Field(RULE.level, description="Significance level over the whole window (each daily look: "
                         "level / max_days).")
    approval_required: bool = Field(RULE.approval_required, description="A passing canary waits for a named "
                                    "person's approval (approve_canary_job, `mlplatform rollout approve`).")
    inference_log: str = Field(description="The server's inference log: the canary's serving errors and latency.")

    def rule(self) -> j.CanaryRule:
        return j.CanaryRule(share=self.canary_share, min_labelled_flights=self.min_labelled_flights,
                            min_days=self.min_days, max_days=self.max_days, level=self.level,
                            approval_required=self.approval_required)


def rollout_policy_resource(settings: Settings) -> RolloutPolicy:
    return RolloutPolicy(**settings.rollout, inference_log=str(settings.inference_log))


# --- moves: the history first, then the aliases -----------------------------------------------

def apply_move(conn, mlflow: MlflowTracking, version: str, stage: str, decided_by: str, reason: str,
               evidence: dict | None = None, run_id: str | None = None, skip_stages: bool = False,
               share: float | None = None) -> stages.Move:
    """Record ``version`` entering ``stage`` in the history, then move the MLflow aliases to
    match it (the last side effect: the server follows the aliases). Entering the shadow replaces
    an older shadow (rejected); entering champion marks the gate's decision applied."""
    name = mlflow.registered_model
    if stages.current_stage(conn, name, version) == stage:  # moved already (a re-run): the aliases follow again
        moved = stages.history(conn, name, version)[-1]
        _follow(mlflow, moved, share)
        return moved
    if stage == SHADOW:
        for older in stages.versions_in(conn, name, SHADOW):
            if older != version:
                apply_move(conn, mlflow, older, REJECTED, decided_by, f"replaced in the shadow by version {version}",
                           run_id=run_id)
    moved = stages.move(conn, name, version, stage, decided_by, reason, evidence, run_id, skip_stages=skip_stages)
    if stage == CHAMPION:
        promotion.mark_applied(conn, name, version, moved.moved_at)
    _follow(mlflow, moved, share)
    return moved


def _follow(mlflow: MlflowTracking, moved: stages.Move, share: float | None) -> None:
    """The MLflow aliases after ``moved``."""
    client, name = mlflow.client(), mlflow.registered_model
    if moved.previous in ALIASES and moved.previous != CHAMPION:
        _drop_alias(client, name, ALIASES[moved.previous], moved.version)
    if moved.stage in ALIASES:
        mlflow.set_alias(ALIASES[moved.stage], moved.version)
    if moved.stage == CANARY:
        client.set_registered_model_tag(name, CANARY_SHARE_TAG, str(share if share is not None else RULE.share))


def _drop_alias(client, name: str, alias: str, version: str) -> None:
    """Remove ``alias`` if it still points at ``version``."""
    from mlflow.exceptions import MlflowException

    try:
        if str(client.get_model_version_by_alias(name, alias).version) == str(version):
            client.delete_registered_model_alias(name, alias)
    except MlflowException:
        pass  # no such alias


def champion_materialization(conn, mlflow: MlflowTracking, version: str, decided_by: str,
                             reason: str) -> AssetMaterialization:
    """``champion_model``'s materialization for a version the rollout promoted: its metadata is
    what ``champion_model`` itself writes (``TrainedModel``), so the predictions that follow
    score with it."""
    model_version = mlflow.client().get_model_version(mlflow.registered_model, version)
    train = training_window(model_version)
    gated = promotion.latest_decision(conn, mlflow.registered_model, version)
    if train is None or gated is None:
        raise Failure(f"version {version} was not trained and evaluated by training_job: it cannot be champion")
    trained = TrainedModel(version, model_version.run_id, train, Window(gated.eval_start, gated.eval_end))
    return AssetMaterialization(asset_key=keys.CHAMPION_MODEL, metadata={
        **trained.metadata(), "decided_by": decided_by, "reason": reason, **mlflow.run_link(model_version.run_id)})


# --- the online evaluation ---------------------------------------------------------------------

EVALUATION_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.online_evaluation (
    evaluation_date   DATE NOT NULL,     -- the last labelled day of the window
    model_name        VARCHAR NOT NULL,
    version           VARCHAR NOT NULL,
    stage             VARCHAR NOT NULL,  -- the stage it was judged in: shadow | canary
    champion_version  VARCHAR NOT NULL,
    window_start      DATE,
    days              INTEGER NOT NULL,  -- labelled days it and the champion scored in that stage
    flights           BIGINT NOT NULL,
    roc_auc           DOUBLE, champion_roc_auc DOUBLE,
    log_loss          DOUBLE, champion_log_loss DOUBLE,
    calibration_error DOUBLE, champion_calibration_error DOUBLE,
    day_roc_auc       DOUBLE, champion_day_roc_auc DOUBLE,   -- the evaluation day's flights alone
    p_value           DOUBLE,            -- DeLong's test of the AUC difference over the window
    action            VARCHAR NOT NULL,  -- promote | rollback | wait | reject | await_approval | to_canary
    reason            VARCHAR NOT NULL,
    evidence          JSON,
    dagster_run_id    VARCHAR
);
"""
TO_CANARY = "to_canary"


def paired_scores(conn, champion: str, version: str, stage: str, end: dt.date):
    """The labelled flights up to ``end`` that ``version`` scored in ``stage`` and the champion
    scored too: flight_date, carrier, label, champion, candidate."""
    from mlplatform.training import model as m

    return conn.execute(
        f"SELECT f.flight_date, f.carrier, f.{m.LABEL}::INT AS label, c.delay_probability AS champion, "
        "v.delay_probability AS candidate "
        "FROM predictions.flight_delay v JOIN predictions.flight_delay c USING (flight_id) "
        f"JOIN {m.FEATURE_TABLE} f USING (flight_id) "
        "WHERE v.model_version = ? AND v.stage = ? AND c.model_version = ? AND c.stage = 'champion' "
        f"AND f.flight_date <= ? AND f.{m.LABEL} IS NOT NULL ORDER BY f.flight_date, flight_id",
        [version, stage, champion, end]).df()


# the inference log's records as DuckDB reads them (mlplatform.serving.service writes them; a
# finished day is Parquet: mlplatform.retention)
LOG_COLUMNS = {"ts": "TIMESTAMPTZ", "request_id": "VARCHAR", "flight_id": "VARCHAR", "model_name": "VARCHAR",
               "model_version": "VARCHAR", "stage": "VARCHAR", "delay_probability": "DOUBLE", "latency_ms": "DOUBLE",
               "batch_size": "INTEGER", "error": "VARCHAR"}


def served_view(conn, log_dir: Path) -> bool:
    """``monitoring.served``: the server's inference log as a view of the warehouse (which version
    answered flight F, at what stage, and the shadow's score), when there is a log."""
    query = inference_log_sql(log_dir, LOG_COLUMNS)
    if query is None:
        return False
    conn.execute("CREATE SCHEMA IF NOT EXISTS monitoring")
    conn.execute(f"CREATE OR REPLACE VIEW monitoring.served AS {query}")
    return True


def serving_stats(log_dir: Path, versions: list[str], since: dt.datetime) -> dict[str, j.ServingStats] | None:
    """Requests, errors and p99 latency per answering version in the inference log since
    ``since`` (None without a log)."""
    import duckdb

    query = inference_log_sql(log_dir, LOG_COLUMNS)
    if query is None:
        return None
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT model_version, count(*), count(*) FILTER (WHERE error IS NOT NULL), "
            f"coalesce(quantile_cont(latency_ms, 0.99), 0) FROM ({query}) WHERE ts >= ? "
            "AND coalesce(stage, 'champion') <> 'shadow' GROUP BY model_version",
            [since.replace(tzinfo=dt.timezone.utc)]).fetchall()
    finally:
        con.close()
    found = {str(v): j.ServingStats(int(n), int(e), float(p)) for v, n, e, p in rows}
    return {v: found.get(v, j.ServingStats(0, 0, 0.0)) for v in versions}


def evaluate(conn, mlflow: MlflowTracking, policy: RolloutPolicy, champion: str, version: str, stage: str,
             end: dt.date, log_dir: Path) -> tuple[j.Verdict, dict]:
    """The verdict on a candidate as of ``end`` and the row of ``monitoring.online_evaluation``."""
    rule = policy.rule()
    frame = paired_scores(conn, champion, version, stage, end)
    days = int(frame["flight_date"].nunique())
    serving = None
    entered = [mv.moved_at for mv in stages.history(conn, mlflow.registered_model, version) if mv.stage == stage]
    if stage == CANARY and entered:
        stats = serving_stats(log_dir, [champion, version], entered[-1])
        serving = (stats[champion], stats[version]) if stats else None
    if stage == SHADOW:  # the shadow answers nobody: judged for being worse only, then into the canary
        rule = j.CanaryRule(**{**asdict(rule), "approval_required": False})
    verdict = j.judge(frame["label"], frame["carrier"], frame["champion"].to_numpy(), frame["candidate"].to_numpy(),
                      days, rule, serving)
    if stage == SHADOW and verdict.action not in (j.ROLLBACK,):
        if days >= policy.shadow_days and len(frame):
            verdict = j.Verdict(TO_CANARY, f"{days} day(s) in the shadow and not worse: takes "
                                f"{policy.canary_share:.0%} of the traffic ({verdict.reason})", verdict.evidence)
        else:
            verdict = j.Verdict(j.WAIT, f"in the shadow for {days} labelled day(s) of {policy.shadow_days}",
                                verdict.evidence)
    today = frame[frame["flight_date"] == frame["flight_date"].max()] if len(frame) else frame
    ours, theirs = verdict.evidence.get("champion") or {}, verdict.evidence.get("canary") or {}
    row = {
        "evaluation_date": end, "model_name": mlflow.registered_model, "version": version, "stage": stage,
        "champion_version": champion, "window_start": frame["flight_date"].min() if len(frame) else None,
        "days": days, "flights": len(frame),
        "roc_auc": theirs.get("roc_auc"), "champion_roc_auc": ours.get("roc_auc"),
        "log_loss": theirs.get("log_loss"), "champion_log_loss": ours.get("log_loss"),
        "calibration_error": theirs.get("calibration_error"),
        "champion_calibration_error": ours.get("calibration_error"),
        "day_roc_auc": _auc(today["label"], today["candidate"]) if len(today) else None,
        "champion_day_roc_auc": _auc(today["label"], today["champion"]) if len(today) else None,
        "p_value": (verdict.evidence.get("delong") or {}).get("p_value"),
        "action": verdict.action, "reason": verdict.reason,
        "evidence": json.dumps(stages.finite(verdict.evidence), default=str),
    }
    return verdict, row


def _auc(labels, scores) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if labels.nunique() == 2 else None


def record_evaluation(conn, rows: list[dict], end: dt.date, model_name: str, run_id: str) -> None:
    """Replace ``end``'s rows of ``monitoring.online_evaluation`` (a re-run replaces, never adds)."""
    create_tables(conn, EVALUATION_DDL)
    inserts = []
    for row in rows:
        row = {**row, "dagster_run_id": run_id}
        inserts.append((f"INSERT INTO monitoring.online_evaluation ({', '.join(row)}) VALUES "
                        f"({', '.join('?' for _ in row)})", list(row.values())))
    in_one_transaction(conn, [("DELETE FROM monitoring.online_evaluation WHERE evaluation_date = ? AND model_name = ?",
                               [end, model_name]), *inserts])


MOVE_OF = {j.PROMOTE: CHAMPION, j.ROLLBACK: ROLLED_BACK, j.REJECT: REJECTED, TO_CANARY: CANARY}


def _daily_table(conn, model_name: str, version: str) -> str:
    rows = conn.execute(
        "SELECT evaluation_date, stage, days, flights, day_roc_auc, champion_day_roc_auc, roc_auc, champion_roc_auc, "
        "p_value, action FROM monitoring.online_evaluation WHERE model_name = ? AND version = ? "
        "ORDER BY evaluation_date", [model_name, version]).fetchall()
    fmt = lambda v: "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| day | stage | days | flights | day AUC | champion's | window AUC | champion's | p | action |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
                     + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


@asset(
    key=keys.ONLINE_EVALUATION,
    group_name="monitoring", partitions_def=daily_partitions, backfill_policy=single_run, owners=OWNERS,
    tags={"daily": ""}, pool=keys.WAREHOUSE_POOL,
    deps=[keys.FEATURES, keys.PREDICTIONS],
    kinds={"scikit-learn", "duckdb", "mlflow"},
    automation_condition=on_new_data(),
    description="When a day's labels land: the versions in the shadow and the canary against the champion on the "
    "same flights, over their window so far (ROC AUC, log loss, calibration, per carrier; DeLong's test), and the "
    "decision: into the canary, promoted, rolled back, rejected, waiting (or for an approval). Rows in "
    "monitoring.online_evaluation; moves in monitoring.rollout_history.",
)
@measured
def online_evaluation(context: AssetExecutionContext, warehouse: DuckDBResource, mlflow: MlflowTracking,
                      rollout: RolloutPolicy) -> MaterializeResult:
    from mlplatform.lineage import upstream_metadata

    _, end = window_of(context)
    name = mlflow.registered_model
    champion = str(upstream_metadata(context, keys.CHAMPION_MODEL, "no champion model yet")["model_version"])
    log_dir = Path(rollout.inference_log)
    metadata: dict = {"champion_version": champion}
    rows, decisions = [], []
    with warehouse.get_connection() as conn:
        stages.ensure_tables(conn)
        served_view(conn, log_dir)
        for stage, version in sorted(stages.candidates(conn, name).items(), key=lambda kv: kv[0] != CANARY):
            verdict, row = evaluate(conn, mlflow, rollout, champion, version, stage, end, log_dir)
            rows.append(row)
            decisions.append((stage, version, verdict))
        record_evaluation(conn, rows, end, name, context.run.run_id)
        for stage, version, verdict in decisions:
            context.log.info("%s version %s: %s: %s", stage, version, verdict.action, verdict.reason)
            metadata.update({
                f"{stage}_version": version, f"{stage}_action": verdict.action, f"{stage}_reason": verdict.reason,
                f"{stage}_table": MetadataValue.md(_daily_table(conn, name, version)),
            })
            row = next(r for r in rows if r["version"] == version)
            for column in ("day_roc_auc", "champion_day_roc_auc", "roc_auc", "champion_roc_auc", "p_value"):
                if row[column] is not None:
                    metadata[f"{stage}_{column}"] = MetadataValue.float(round(row[column], 5))
            target = MOVE_OF.get(verdict.action)
            if stage == SHADOW and target == ROLLED_BACK:
                target = REJECTED  # (it never took traffic)
            if target is None:
                continue
            if target == CANARY and stages.versions_in(conn, name, CANARY):
                context.log.info("version %s waits in the shadow: a canary is in progress", version)
                continue
            apply_move(conn, mlflow, version, target, "judge", verdict.reason, verdict.evidence, context.run.run_id,
                       share=rollout.canary_share)
            if target == CHAMPION:
                context.log_event(champion_materialization(conn, mlflow, version, "judge", verdict.reason))
    return MaterializeResult(metadata=metadata)


# --- approval -----------------------------------------------------------------------------------

class Approval(Config):
    approver: str = Field(description="Who approves (a person's name: recorded in the rollout history).")
    reason: str = Field(description="Why.")
    version: str = Field("", description="The canary version (default: the one in the canary now).")


class NotAwaiting(Failure):
    """No canary awaits an approval (or not the version named)."""


def awaiting(conn, model_name: str, version: str = "") -> tuple[str, tuple]:
    """(the canary awaiting an approval, its latest verdict: action, reason, day), or ``NotAwaiting``
    saying why not."""
    canaries = stages.versions_in(conn, model_name, CANARY)
    version = version or (canaries[0] if canaries else "")
    if not version or version not in canaries:
        raise NotAwaiting(f"no canary to approve{f': version {version} is not in the canary' if version else ''} "
                          f"(in the canary: {', '.join(canaries) or 'none'})")
    exists = has_table(conn, "monitoring", "online_evaluation")
    latest = conn.execute("SELECT action, reason, evaluation_date FROM monitoring.online_evaluation WHERE model_name = ? "
                          "AND version = ? AND stage = 'canary' ORDER BY evaluation_date DESC LIMIT 1",
                          [model_name, version]).fetchone() if exists else None
    if latest is None or latest[0] != j.AWAIT_APPROVAL:
        raise NotAwaiting(f"version {version} is not awaiting an approval: its latest verdict is "
                          f"{f'{latest[0]} on {latest[2]} ({latest[1]})' if latest else 'none yet'}")
    return version, latest


def approve(conn, mlflow: MlflowTracking, approver: str, reason: str, version: str = "",
            run_id: str | None = None) -> stages.Move:
    """Promote the canary awaiting approval (its latest verdict ``await_approval``), as ``approver``."""
    approver, reason = approver.strip(), reason.strip()
    if not approver or not reason:
        raise Failure("an approval needs the approver's name and a reason")
    version, latest = awaiting(conn, mlflow.registered_model, version)
    return apply_move(conn, mlflow, version, CHAMPION, approver, f"approved: {reason} (verdict of {latest[2]}: "
                      f"{latest[1]})", {"approver": approver, "verdict": latest[1]}, run_id)


@op(description="Promote the canary that awaits an approval, recording the approver and the reason.",
    pool=keys.WAREHOUSE_POOL)
def approve_canary(context: OpExecutionContext, config: Approval, warehouse: DuckDBResource,
                   mlflow: MlflowTracking) -> None:
    with warehouse.get_connection() as conn:
        moved = approve(conn, mlflow, config.approver, config.reason, config.version, context.run.run_id)
        context.log_event(champion_materialization(conn, mlflow, moved.version, moved.decided_by, moved.reason))
    context.log.info("version %s is champion, approved by %s", moved.version, moved.decided_by)


@job(description="Approve the canary awaiting it (launch with the approver's name and a reason).")
def approve_canary_job():
    approve_canary()
