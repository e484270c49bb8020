"""The closed loop, end to end, on a real Dagster instance (``mlplatform loop-demo``).

1. replay January-March 2013 and build the graph for it; train a champion;
2. land drifted days (real April days with shifted distributions);
3. the landing sensor sees them and requests their ingestion; the daily, prediction and
   monitoring jobs run for them (what declarative automation does under the daemon);
4. the drift report detects the drift; the retraining sensor requests ``training_job``;
5. the challenger is evaluated and the gate promotes or rejects it.

Every run is recorded in DAGSTER_HOME, so all of it shows in the UI (runs, sensor-triggered run
tags, the drift report's plots, the gate's check).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from pathlib import Path
from typing import TextIO

from dagster import DagsterInstance, RunRequest, build_sensor_context

from mlplatform.keys import TRIGGER_TAG, WINDOWS_TAG
from mlplatform.monitoring.drifted import land_drifted_days
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG, days_between
from mlplatform.pipeline import QUIET, status_of
from mlplatform.settings import Settings

# Three months of training data: smaller steps and larger leaves than the year's default.
DEMO_TRAINING = {"learning_rate": 0.05, "max_iter": 60, "min_samples_leaf": 100, "eval_days": 14,
                 "validation_days": 14}


LOG: list[Path] = []  # where the runs' own output (dbt's, the steps') goes: the demo prints its story


def run_logged(defs, instance, job: str, out: TextIO, start=None, end=None, run_config=None, tags=None):
    tags = {**(tags or {}), **({RANGE_START_TAG: str(start), RANGE_END_TAG: str(end)} if start else {})}
    config = {**QUIET, **(run_config or {})}
    with open(LOG[0], "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        result = defs.resolve_job_def(job).execute_in_process(instance=instance, tags=tags, run_config=config,
                                                              raise_on_error=False)
    status, rejected = status_of(result)
    span = f" {start}..{end}" if start else ""
    print(f"  {job}{span}: {status}" + (f" ({rejected})" if rejected else ""), file=out)
    if not result.success:
        raise SystemExit(f"{job} failed; see run {result.run_id} in the UI")
    return result


def training_config() -> dict:
    return {"ops": {"flight_delay_model": {"config": DEMO_TRAINING}}}


def run_loop(settings: Settings, out: TextIO = sys.stdout, drift_start: dt.date = dt.date(2013, 4, 1),
             days: int = 5, severity: float = 1.0) -> bool:
    from mlplatform.definitions import load_defs
    from mlplatform.ingest.landing import replay
    from mlplatform.ingest.sensors import landing_sensor
    from mlplatform.monitoring.sensors import retraining_baseline, retraining_decision

    defs = load_defs(settings)
    instance = DagsterInstance.from_config(str(settings.dagster_home))
    landing = landing_sensor(settings)
    LOG[:] = [settings.home / "logs" / f"loop-demo-{dt.datetime.now():%Y%m%dT%H%M%S}.log"]
    LOG[0].parent.mkdir(parents=True, exist_ok=True)
    print(f"dbt and step output: {LOG[0]}", file=out)
    start, end = dt.date(2013, 1, 1), drift_start - dt.timedelta(days=1)
    print(f"1. replay and build {start}..{end}, train a champion", file=out)
    replay(settings.landing, start, end)
    landing_cursor = landing(build_sensor_context(instance=instance, cursor=None, definitions=defs)).cursor
    run_logged(defs, instance, "reference_job", out)
    run_logged(defs, instance, "daily_job", out, start, end)
    run_logged(defs, instance, "training_job", out, run_config=training_config())
    run_logged(defs, instance, "predictions_job", out, start, end)
    run_logged(defs, instance, "monitoring_job", out, end - dt.timedelta(days=6), end)

    retrain_cursor = retraining_baseline(instance)  # the sensors start watching here
    targets = days_between(drift_start, drift_start + dt.timedelta(days=days - 1))
    print(f"2. land {days} drifted days {targets[0]}..{targets[-1]} (real days, severity {severity})", file=out)
    land_drifted_days(settings.landing, targets, targets, severity)

    print("3. landing sensor", file=out)
    result = landing(build_sensor_context(instance=instance, cursor=landing_cursor, definitions=defs))
    for request in result.run_requests or []:
        first, last = request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]
        print(f"  requested ingestion of {first}..{last} (run key {request.run_key[:60]}...)", file=out)
        for job in ("daily_job", "predictions_job", "monitoring_job"):
            run_logged(defs, instance, job, out, first, last, tags={TRIGGER_TAG: "landing"})

    print("4. drift", file=out)
    import duckdb

    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT drift_date, count(*) FILTER (WHERE drifted) AS drifted, count(*) AS features, "
            "string_agg(feature, ', ' ORDER BY value DESC) FILTER (WHERE drifted) AS worst "
            "FROM monitoring.drift WHERE metric = 'psi' AND judged AND drift_date >= ? GROUP BY 1 ORDER BY 1",
            [end - dt.timedelta(days=2)],
        ).fetchall()
    for day, drifted, features, worst in rows:
        print(f"  {day}: {drifted}/{features} judged features drifted (PSI){': ' + worst[:100] if worst else ''}",
              file=out)

    print("5. retraining sensor", file=out)
    outcome, _ = retraining_decision(instance, retrain_cursor, time.time(), settings)
    if not isinstance(outcome, RunRequest):
        print(f"  no retraining: {outcome.skip_message}", file=out)
        return False
    print(f"  retraining requested: {outcome.tags[TRIGGER_TAG][:200]}", file=out)
    print(f"  {outcome.tags[WINDOWS_TAG]}", file=out)
    # the run the sensor asks for (its windows put the drifted days in training), with the demo's
    # hyperparameters
    windows = outcome.run_config["ops"]["flight_delay_model"]["config"]
    config = {"ops": {"flight_delay_model": {"config": {**DEMO_TRAINING, **windows}}}}
    result = run_logged(defs, instance, "training_job", out, run_config=config, tags=outcome.tags)
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        decision = conn.execute(
            "SELECT challenger_version, champion_version, decision, reason FROM monitoring.model_promotions "
            "ORDER BY decided_at DESC LIMIT 1"
        ).fetchone()
    print(f"6. gate: version {decision[0]} vs champion {decision[1]}: {decision[2]}: {decision[3]}", file=out)
    return result is not None
