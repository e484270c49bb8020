"""Sensors of the model's loop: retraining on drift or degradation, and run-failure alerts.
(The landing zone's sensor is ``mlplatform.ingest.sensors``.)

``retraining_sensor`` starts ``training_job`` (train, evaluate, gated promotion) when days after
the champion's training window drifted or the champion did worse on them. Its rule:

* **Signals are days**, read from each day's own row in the warehouse, never from a range's
  shared metadata: ``monitoring.drift_days.drift_detected`` and
  ``monitoring.model_performance.degraded``. A day counts when both of its reports exist and were
  made against the current champion (its reference profile, its predictions), when it is after
  the champion's training window (the version's tags ``mlplatform.train_start``/``_end``) and when its
  reports judged it (enough labelled flights: the monitoring assets' config decides, and says
  why not in ``monitoring.drift_days.note``).
  Backfilled history inside the champion's window is never a signal.
* **A signal is consumed** by a training run that reached the gate's decision (a row of
  ``monitoring.model_promotions``, promoted or rejected) with the day in its data (from its
  training start to its evaluation end); a consumed day does not ask again. A promoted
  challenger is the new champion: days are then judged against its window and reference.
* **The cooldown** (``MLPLATFORM_RETRAIN_COOLDOWN_SECONDS``, 6 h) counts only from a promotion
  made by a retraining this sensor requested. A rejected, failed or manual training sets none,
  so it never blocks the retraining that drift asks for. Nothing is requested while a training
  run is queued or running, nor when no day after the champion's training window is labelled.
* **A failed retraining is not repeated** for exactly the same signals (the skip names the run;
  re-execute it from the UI); a new signal day asks anew.
* **The retraining trains on the signal days**: the request's run config makes the evaluation
  window the later half of the labelled days from the first signal day on (the gate needs
  held-out days after the champion's window, and training is what comes before evaluation),
  so the earlier signal days are training data. When the signal is the last labelled day alone
  it is the evaluation window, and the run's tag ``mlplatform/retrain_windows`` says so; when
  that would leave the challenger exactly the champion's training data, the sensor waits for a
  later labelled day instead.

Every skip names the days, the signal and the reason (the sensor's tick list in the UI). Each
tick decides from the warehouse and the registry as they are, not from a cursor of reports
seen: a restart, a lost cursor or a re-made report changes nothing.

``alert_on_run_failure``: every failed run becomes a row of ``monitoring.alerts`` and a log
line, and is POSTed to ``MLPLATFORM_ALERT_WEBHOOK`` when that is set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
import urllib.request
from dataclasses import dataclass, field

from dagster import (
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

from mlplatform.ingest.sensors import contiguous_ranges
from mlplatform import keys
from mlplatform.keys import REQUESTED_BY_TAG, RUN_KEY_TAG, TRIGGER_TAG, WINDOWS_TAG
from mlplatform.settings import Settings
from mlplatform.training import model as m
from mlplatform.training.tracking import CHAMPION, TRAIN_START_TAG, MlflowTracking, tracking_from, training_window
from mlplatform.warehouse import connect, create_tables, has_table, is_locked

SENSOR_NAME = "retraining_sensor"
IN_PROGRESS = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
               DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
DRIFT_REPORT = keys.DRIFT_REPORT.to_user_string()
PERFORMANCE_REPORT = keys.MODEL_PERFORMANCE.to_user_string()


# --- retraining ---------------------------------------------------------------------------

def days_text(days) -> str:
    """[2013-02-07, 2013-02-08, 2013-02-10] -> '2013-02-07..2013-02-08, 2013-02-10'."""
    ranges = contiguous_ranges([str(d) for d in days])
    text = ", ".join(a if a == b else f"{a}..{b}" for a, b in ranges[:6])
    return text + (f" and {len(ranges) - 6} more range(s)" if len(ranges) > 6 else "")


@dataclass
class Reports:
    """What the warehouse says about the days after the champion's training window."""
    last_labelled: dt.date | None
    drift: dict = field(default_factory=dict)        # day -> description, drifted days only
    degraded: dict = field(default_factory=dict)     # day -> description, degraded days only
    drift_days: set = field(default_factory=set)     # days with a drift report against the champion
    performance_days: set = field(default_factory=set)
    unjudged: dict = field(default_factory=dict)     # day -> why its report does not judge it (too few flights)
    decisions: list = field(default_factory=list)    # (version, decision, decided_at, applied_at, eval_end, run_id)


def read_reports(conn, champion: str, train_end: dt.date, model_name: str) -> Reports:
    """The per-day verdicts of the champion's reports after ``train_end`` and the gate's decisions.
    Whether a day is judged at all is its report's decision (``judged``, and why not in
    ``monitoring.drift_days.note``): the thresholds live in the monitoring assets' config only."""
    last = conn.execute(f"SELECT max(flight_date) FROM {m.FEATURE_TABLE} WHERE {m.LABEL} IS NOT NULL").fetchone()[0]
    reports = Reports(last)
    if has_table(conn, "monitoring", "drift_days"):
        for day, detected, drifted, features, judged, note in conn.execute(
            "SELECT drift_date, drift_detected, drifted_features, judged_features, judged, note "
            "FROM monitoring.drift_days WHERE reference_version = ? AND drift_date > ?", [champion, train_end],
        ).fetchall():
            reports.drift_days.add(day)
            if not judged:
                reports.unjudged[day] = note
                continue
            if detected:
                reports.drift[day] = f"{DRIFT_REPORT}[{day}] drift ({drifted}/{features} features)"
    if has_table(conn, "monitoring", "model_performance"):
        for day, degraded, auc, expected, since in conn.execute(
            "SELECT performance_date, degraded, coalesce(window_roc_auc, roc_auc), expected_roc_auc, "
            "coalesce(window_start, performance_date) FROM monitoring.model_performance "
            # a day the report did not judge (too few flights) is reported, never degraded
            "WHERE model_version = ? AND performance_date > ?", [champion, train_end],
        ).fetchall():
            reports.performance_days.add(day)
            if degraded:
                reports.degraded[day] = (f"{PERFORMANCE_REPORT}[{day}] degraded "
                                         f"(ROC AUC {auc:.3f} over {since}..{day}, validation {expected:.3f})")
    if has_table(conn, "monitoring", "model_promotions"):
        reports.decisions = conn.execute(
            "SELECT challenger_version, decision, decided_at, applied_at, eval_end, dagster_run_id "
            "FROM monitoring.model_promotions WHERE model_name = ? ORDER BY decided_at", [model_name],
        ).fetchall()
    return reports


def open_warehouse(path: str, wait_seconds: float = 10.0):
    """A read-only connection, or None when writers kept the warehouse locked ``wait_seconds``
    (the sensor looks again on its next tick)."""
    try:
        return connect(path, read_only=True, max_wait=wait_seconds)
    except Exception as exc:  # noqa: BLE001
        if is_locked(exc):
            return None
        raise


def retraining_windows(signal_days: list[dt.date], last_labelled: dt.date, champion_end: dt.date) -> tuple[dict, str] | None:
    """(TrainingConfig overrides, a note on where the signal days went), or None when the
    challenger would train on exactly the champion's data. The evaluation window is the later
    half of the labelled days from the first signal day on; training is everything before it."""
    first = min(signal_days)
    eval_days = max(1, ((last_labelled - first).days + 1) // 2)
    eval_start = last_labelled - dt.timedelta(days=eval_days - 1)
    train_end = eval_start - dt.timedelta(days=1)
    if train_end <= champion_end:
        return None
    trained = [d for d in signal_days if d <= train_end]
    evaluated = [d for d in signal_days if d > train_end]
    note = f"training up to {train_end}, evaluation {eval_start}..{last_labelled}"
    if trained:
        note += f"; signal days in training: {days_text(trained)}"
    if evaluated:
        note += (f"; signal days in the evaluation window: {days_text(evaluated)} (the last labelled days: the gate "
                 f"needs held-out days after the champion's window, and training comes before evaluation)")
    return {"eval_end": str(last_labelled), "eval_days": eval_days}, note


def _training_starts(tracking: MlflowTracking, versions) -> dict[str, dt.date | None]:
    client, out = tracking.client(), {}
    for version in set(versions):
        model_version = client.get_model_version(tracking.registered_model, version)
        window = training_window(model_version)
        out[version] = window.start if window else None
    return out


def _utc_seconds(when: dt.datetime) -> float:
    return when.replace(tzinfo=dt.timezone.utc).timestamp()


def retraining_baseline(instance) -> dict:
    """The sensor's starting cursor. The decision reads the warehouse's state on every tick, so
    there is nothing to record: history inside the champion's window is never a signal."""
    return {}


def retraining_decision(instance, cursor: dict, now: float, settings: Settings) -> tuple[RunRequest | SkipReason, dict]:
    """What the retraining sensor does on a tick (see the module's docstring), and its next cursor."""
    cooldown = settings.retrain_cooldown_seconds
    tracking = tracking_from(settings)
    cursor = dict(cursor or {})
    champion = tracking.version_by_alias(CHAMPION)
    if champion is None:
        return SkipReason("no champion model yet: nothing to judge new days against"), cursor
    version = str(champion.version)
    window = training_window(champion)
    if window is None:
        return SkipReason(f"champion v{version} has no tag {TRAIN_START_TAG} (its training window): new days cannot be "
                          "told from its training data; register it through training_job"), cursor
    train_start, train_end = window
    conn = open_warehouse(settings.database) if settings.has_warehouse else None
    if conn is None:
        return SkipReason("the warehouse is busy (a run is writing) or absent: looking again next tick"), cursor
    with conn:
        reports = read_reports(conn, version, train_end, tracking.registered_model)
    champion_text = f"champion v{version} (trained on {train_start}..{train_end})"
    if reports.last_labelled is None or reports.last_labelled <= train_end:
        return SkipReason(f"no labelled day after the training window of {champion_text}; last labelled day "
                          f"{reports.last_labelled or 'none'}: nothing new to retrain on"), cursor
    reported = reports.drift_days & reports.performance_days
    waiting = (reports.drift_days | reports.performance_days) - reported - set(reports.unjudged)
    judged = reported - set(reports.unjudged)
    signals = {d: [t for t in (reports.drift.get(d), reports.degraded.get(d)) if t] for d in judged}
    signals = {d: texts for d, texts in signals.items() if texts}
    notes = []
    if waiting:
        notes.append(f"waiting for both reports of {days_text(sorted(waiting))}")
    for why in sorted(set(reports.unjudged.values())):
        days = sorted(d for d, note in reports.unjudged.items() if note == why)
        notes.append(f"not judged ({why}): {days_text(days)}")
    suffix = f"; {'; '.join(notes)}" if notes else ""
    if not signals:
        span = f" ({days_text(sorted(judged))})" if judged else ""
        return SkipReason(f"no drift or degradation on the {len(judged)} judged day(s){span} after the training "
                          f"window of {champion_text}{suffix}"), cursor

    starts = _training_starts(tracking, [d[0] for d in reports.decisions])
    covered = {}
    for challenger, decision, _, _, eval_end, _ in reports.decisions:
        for day in signals:
            if starts.get(challenger) and eval_end and starts[challenger] <= day <= eval_end:
                covered[day] = f"v{challenger} ({decision})"
    fresh = sorted(d for d in signals if d not in covered)
    described = "; ".join(t for d in sorted(signals) for t in signals[d])
    if not fresh:
        by = sorted(set(covered.values()))
        return SkipReason(f"{described[:300]}: already in the data of the training of {', '.join(by)}{suffix}"), cursor
    what = "; ".join(t for d in fresh for t in signals[d])
    short = f"{len(fresh)} signal day(s) {days_text(fresh)}"

    active = instance.get_runs(RunsFilter(job_name="training_job", statuses=IN_PROGRESS), limit=1)
    if active:
        return SkipReason(f"training run {active[0].run_id} is in progress; waiting: {short}"), cursor
    promoted_by_sensor = [
        (_utc_seconds(applied or decided), challenger, run_id)
        for challenger, decision, decided, applied, _, run_id in reports.decisions
        if decision == "promoted" and run_id and (run := instance.get_run_by_id(run_id)) is not None
        and run.tags.get(REQUESTED_BY_TAG) == SENSOR_NAME
    ]
    if promoted_by_sensor and now - max(promoted_by_sensor)[0] < cooldown:
        when, challenger, run_id = max(promoted_by_sensor)
        return SkipReason(f"cooldown: the retraining run {run_id} promoted v{challenger} {int(now - when)}s ago "
                          f"(cooldown {int(cooldown)}s, MLPLATFORM_RETRAIN_COOLDOWN_SECONDS); waiting: {short}"), cursor
    windows = retraining_windows(fresh, reports.last_labelled, train_end)
    if windows is None:
        return SkipReason(f"{short}: the last labelled day, right after the champion's window; a challenger would "
                          f"train on the champion's own data and be judged on it: waiting for a later labelled day"
                          ), cursor
    overrides, note = windows
    key = f"retrain:v{version}:{days_text(fresh)[:60]}:{hashlib.sha1(what.encode()).hexdigest()[:10]}"
    previous = instance.get_runs(RunsFilter(tags={RUN_KEY_TAG: key}), limit=1)
    if previous and previous[0].status in (DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        return SkipReason(f"the retraining for {short} (run {previous[0].run_id}) ended "
                          f"{previous[0].status.value}: re-execute it from the UI; a new signal day asks again"), cursor
    request = RunRequest(
        run_key=key,
        run_config={"ops": {"flight_delay_model": {"config": overrides}}},
        tags={TRIGGER_TAG: what[:1000], REQUESTED_BY_TAG: SENSOR_NAME, WINDOWS_TAG: note[:1000]},
    )
    return request, {**cursor, "last_request": {"run_key": key, "at": now}}


def retraining_sensor(settings: Settings):
    """The sensor, deciding with ``retraining_decision`` against these settings."""

    @sensor(
        name=SENSOR_NAME,
        job_name="training_job",
        minimum_interval_seconds=settings.retraining_sensor_interval_seconds,
        default_status=DefaultSensorStatus.RUNNING,
        description="Starts training_job (train, evaluate, gated promotion) when days after the champion's training "
        "window drifted or its realised performance on them degraded, read day by day from monitoring.drift_days "
        "and monitoring.model_performance (days their reports judged). A day is consumed by a training run whose "
        "data covered it, promoted or rejected; the cooldown counts only from a promotion this sensor's retraining "
        "made, so a rejected retraining never blocks the next; never while a training run is in progress. The run "
        "trains on the signal days (its evaluation window is the later half of the labelled days from the first "
        "signal day; tag mlplatform/retrain_windows).",
    )
    def _retraining(context: SensorEvaluationContext):
        cursor = json.loads(context.cursor) if context.cursor else retraining_baseline(context.instance)
        outcome, cursor = retraining_decision(context.instance, cursor, time.time(), settings)
        if isinstance(outcome, SkipReason):
            return SensorResult(skip_reason=outcome, cursor=json.dumps(cursor))
        return SensorResult(run_requests=[outcome], cursor=json.dumps(cursor))

    return _retraining


# --- alerts -------------------------------------------------------------------------------

ALERTS_DDL = """
CREATE SCHEMA IF NOT EXISTS monitoring;
CREATE TABLE IF NOT EXISTS monitoring.alerts (
    raised_at TIMESTAMP, kind VARCHAR, job_name VARCHAR, run_id VARCHAR, message VARCHAR, delivered_to VARCHAR
);
-- (alerts from Prometheus, through Alertmanager: their labels and state; homes made before get the column)
ALTER TABLE monitoring.alerts ADD COLUMN IF NOT EXISTS details JSON;
"""
RUN_FAILURE = "run_failure"


def record_alert(warehouse_path: str, job_name: str, run_id: str, message: str, webhook: str | None,
                 kind: str = RUN_FAILURE, details: dict | None = None) -> str | None:
    """Store the alert, and POST it to the webhook when there is one. Returns a delivery error.
    ``kind``: a failed run, or ``prometheus:<alertname>`` for an alert rule's (``job_name`` is
    then what it is about, ``run_id`` Alertmanager's fingerprint, ``details`` its labels)."""
    error = None
    if webhook:
        body = json.dumps({"kind": kind, "job": job_name, "run_id": run_id, "message": message,
                           **({"details": details} if details else {})}, default=str).encode()
        request = urllib.request.Request(webhook, data=body, headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=5).close()
        except OSError as exc:
            error = f"webhook failed: {exc}"

    def store() -> None:
        with connect(warehouse_path, max_wait=60) as conn:  # one writer at a time: wait for it
            create_tables(conn, ALERTS_DDL)
            conn.execute(
                "INSERT INTO monitoring.alerts (raised_at, kind, job_name, run_id, message, delivered_to, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [dt.datetime.now(dt.timezone.utc).replace(tzinfo=None), kind, job_name, run_id, message[:4000],
                 webhook if webhook and not error else None, json.dumps(details, default=str) if details else None],
            )

    try:
        store()
    except Exception as exc:  # noqa: BLE001
        if not is_locked(exc):
            raise
        return "; ".join(filter(None, [error, f"alert not stored, the warehouse stayed locked: {exc}"]))
    return error


def alert_on_run_failure(settings: Settings):
    """Every failed run: a row of ``monitoring.alerts``, an error in the log, and a POST to the
    webhook of these settings (``MLPLATFORM_ALERT_WEBHOOK``) when there is one."""

    @run_failure_sensor(name="alert_on_run_failure", default_status=DefaultSensorStatus.RUNNING,
                        description="Records every failed run in monitoring.alerts (and a webhook, if set).")
    def _alert(context: RunFailureSensorContext):
        message = context.failure_event.message or "run failed"
        steps = [e.step_key for e in context.get_step_failure_events()]
        if steps:
            message = f"{message} (failed steps: {', '.join(steps)})"
        context.log.error("run %s of %s failed: %s", context.dagster_run.run_id, context.dagster_run.job_name, message)
        error = record_alert(settings.database, context.dagster_run.job_name, context.dagster_run.run_id,
                             message, settings.alert_webhook)
        if error:
            context.log.warning(error)

    return _alert


def sensors(settings: Settings) -> list:
    return [retraining_sensor(settings), alert_on_run_failure(settings)]
