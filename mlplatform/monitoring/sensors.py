"""Sensors of the model's loop: retraining on drift or degradation, and run-failure alerts.
(The landing zone's sensor is ``mlplatform.ingest.sensors``.)

* ``retraining_sensor``: a drift report with drift, or a performance report with a degraded
  day, materialized since the last tick starts ``training_job`` (train, evaluate, gate),
  at most once per cooldown and never while a training run is in progress. Its first tick
  records the reports so far as seen.
* ``alert_on_run_failure``: every failed run becomes a row of ``monitoring.alerts`` and a log
  line, and is POSTed to ``MLPLATFORM_ALERT_WEBHOOK`` when that is set.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.request

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    run_failure_sensor,
    sensor,
)

from mlplatform.settings import Settings

DRIFT_KEY = AssetKey(["monitoring", "drift_report"])
PERFORMANCE_KEY = AssetKey(["monitoring", "model_performance"])
RETRAIN_COOLDOWN_SECONDS = int(os.getenv("MLPLATFORM_RETRAIN_COOLDOWN_SECONDS", str(6 * 3600)))


# --- retraining ---------------------------------------------------------------------------

def _new_signals(instance, key: AssetKey, flag: str, after: int | None) -> tuple[list[str], int | None]:
    """Materializations of ``key`` after storage id ``after`` whose metadata ``flag`` is true."""
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, after_storage_id=after), limit=1000, ascending=True
    ).records
    latest = max((r.storage_id for r in records), default=after)
    signals = []
    for record in records:
        materialization = record.asset_materialization
        value = materialization.metadata.get(flag) if materialization else None
        if getattr(value, "value", value) is True:
            signals.append(f"{key.to_user_string()}[{materialization.partition or '-'}] {flag}")
    return signals, latest


def retraining_baseline(instance) -> dict:
    """A cursor that treats every report so far as seen (history does not retrain)."""
    _, drift_id = _new_signals(instance, DRIFT_KEY, "drift_detected", None)
    _, perf_id = _new_signals(instance, PERFORMANCE_KEY, "degraded", None)
    return {"drift": drift_id, "performance": perf_id, "pending": []}


MAX_PENDING = 50


def retraining_decision(instance, cursor: dict, now: float, cooldown: float) -> tuple[RunRequest | SkipReason, dict]:
    """What the retraining sensor does on a tick, and its next cursor."""
    drift, drift_id = _new_signals(instance, DRIFT_KEY, "drift_detected", cursor.get("drift"))
    perf, perf_id = _new_signals(instance, PERFORMANCE_KEY, "degraded", cursor.get("performance"))
    pending = (cursor.get("pending", []) + drift + perf)[-MAX_PENDING:]
    seen = {**cursor, "drift": drift_id, "performance": perf_id}
    if not pending:
        return SkipReason("no drift or degradation since the last tick"), {**seen, "pending": []}
    active = instance.get_runs(
        RunsFilter(job_name="training_job", statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED,
                                                      DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]),
        limit=1,
    )
    if active:
        return SkipReason(f"training run {active[0].run_id} is in progress; {len(pending)} signal(s) wait"), {
            **seen, "pending": pending}
    last = cursor.get("last_request")
    if last is not None and now - last < cooldown:
        return SkipReason(f"cooldown: last retraining requested {int(now - last)}s ago (cooldown {int(cooldown)}s); "
                          f"{len(pending)} signal(s) wait"), {**seen, "pending": pending}
    request = RunRequest(
        run_key=f"retrain:{drift_id}:{perf_id}",
        tags={"mlplatform/trigger": "; ".join(pending)[:1000]},
    )
    return request, {**seen, "pending": [], "last_request": now}


@sensor(
    name="retraining_sensor",
    job_name="training_job",
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Starts training_job (train, evaluate, gated promotion) on drift or degraded performance, "
    "with a cooldown, never while a training run is in progress.",
)
def retraining_sensor(context: SensorEvaluationContext):
    if not context.cursor:
        cursor = retraining_baseline(context.instance)
        return SensorResult(skip_reason=SkipReason("first tick: earlier reports recorded as seen"),
                            cursor=json.dumps(cursor))
    cursor = json.loads(context.cursor)
    outcome, cursor = retraining_decision(context.instance, cursor, time.time(), RETRAIN_COOLDOWN_SECONDS)
    if isinstance(outcome, SkipReason):
        return SensorResult(skip_reason=outcome, cursor=json.dumps(cursor))
    return SensorResult(run_requests=[outcome], cursor=json.dumps(cursor))


# --- alerts -------------------------------------------------------------------------------

ALERTS_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.alerts (
    raised_at TIMESTAMP, kind VARCHAR, job_name VARCHAR, run_id VARCHAR, message VARCHAR, delivered_to VARCHAR
);
"""


def record_alert(warehouse_path: str, job_name: str, run_id: str, message: str, webhook: str | None) -> str | None:
    """Store the alert, and POST it to the webhook when there is one. Returns a delivery error."""
    import duckdb

    error = None
    if webhook:
        body = json.dumps({"kind": "run_failure", "job": job_name, "run_id": run_id, "message": message}).encode()
        request = urllib.request.Request(webhook, data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError as exc:
            error = f"webhook failed: {exc}"
    for attempt in range(10):  # the warehouse has one writer at a time; wait for it
        try:
            with duckdb.connect(warehouse_path) as conn:
                conn.execute(ALERTS_DDL)
                conn.execute(
                    "INSERT INTO monitoring.alerts VALUES (?, 'run_failure', ?, ?, ?, ?)",
                    [dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), job_name, run_id, message[:4000],
                     webhook if webhook and not error else None],
                )
            return error
        except duckdb.IOException as exc:
            last = exc
            time.sleep(min(2 ** attempt * 0.1, 5))
    return "; ".join(filter(None, [error, f"alert not stored, the warehouse stayed locked: {last}"]))


@run_failure_sensor(name="alert_on_run_failure", default_status=DefaultSensorStatus.RUNNING,
                    description="Records every failed run in monitoring.alerts (and a webhook, if set).")
def alert_on_run_failure(context: RunFailureSensorContext):
    message = context.failure_event.message or "run failed"
    steps = [e.step_key for e in context.get_step_failure_events()]
    if steps:
        message = f"{message} (failed steps: {', '.join(steps)})"
    context.log.error("run %s of %s failed: %s", context.dagster_run.run_id, context.dagster_run.job_name, message)
    error = record_alert(
        str(Settings.from_env().warehouse), context.dagster_run.job_name, context.dagster_run.run_id, message,
        os.getenv("MLPLATFORM_ALERT_WEBHOOK") or None,
    )
    if error:
        context.log.warning(error)


sensors = [retraining_sensor, alert_on_run_failure]
