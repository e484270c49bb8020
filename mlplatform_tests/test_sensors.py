"""Sensors evaluated with build_sensor_context on a real (ephemeral) Dagster instance."""

from __future__ import annotations

import pytest

import datetime as dt
from dataclasses import replace
import json
import os
import time

import duckdb
from dagster import (
    AssetMaterialization,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    RunRequest,
    SkipReason,
    build_sensor_context,
)

from mlplatform.ingest import sensors as landing
from mlplatform.ingest.sensors import landing_sensor
from mlplatform.monitoring import sensors
from mlplatform.monitoring.sensors import retraining_decision, retraining_sensor
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.training.tracking import TRAIN_END_TAG, TRAIN_START_TAG
from mlplatform_tests.conftest import D

LANE = "unit"

MODEL = "flight_delay"


def tick(sensor, instance, cursor):
    """One tick of a sensor (a factory of the settings) built with the environment's settings."""
    from mlplatform.definitions import load_defs
    from mlplatform.settings import Settings

    settings = Settings.from_env()
    return sensor(settings)(build_sensor_context(instance=instance, cursor=cursor, definitions=load_defs(settings)))


DAILY_FEATURES = {"raw_flights", "raw_weather", "staging/stg_flights", "staging/stg_weather", "marts/fct_flights",
                  "marts/agg_daily_route_stats", "features/flight_features",
                  # the day's streamed events: what still waits is consumed, then reconciled with the file
                  "raw_flight_events", "staging/stg_departure_events"}
NEEDS_CHAMPION = {"predictions/flight_delay", "monitoring/feature_profiles", "monitoring/drift_report",
                  "monitoring/model_performance", "monitoring/online_evaluation"}


def test_landing_sensor_requests_changed_days_once(home):
    with DagsterInstance.ephemeral() as instance:
        first = tick(landing_sensor, instance, None)
        assert not first.run_requests and "first tick: recorded" in first.skip_reason.skip_message
        quiet = tick(landing_sensor, instance, first.cursor)
        assert not quiet.run_requests and "no new or changed" in quiet.skip_reason.skip_message

        # a corrected file for Jan 2 and new files for Jan 3's weather and flights
        day2 = home.landing / "flights" / "2013-01-02.csv"
        day2.write_text(day2.read_text().replace(",UA,1545,", ",UA,1546,", 1) + "")
        os.utime(day2, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        for kind in ("flights", "weather"):
            path = home.landing / kind / "2013-01-03.csv"
            path.write_text(path.read_text())
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
        changed = tick(landing_sensor, instance, quiet.cursor)
        (request,) = changed.run_requests  # two contiguous days: one ranged run
        assert request.tags[RANGE_START_TAG] == "2013-01-02"
        assert request.tags[RANGE_END_TAG] == "2013-01-03"
        # one run through the daily graph: with no champion yet, up to the features
        assert {k.to_user_string() for k in request.asset_selection} == DAILY_FEATURES

        # while its run has not finished, the same files start no second run
        again = tick(landing_sensor, instance, changed.cursor)
        assert not again.run_requests and "1 run(s) not finished" in again.skip_reason.skip_message

        # the run fails: the files are asked for again, under a new run key, up to MAX_ATTEMPTS times
        cursor, previous = again.cursor, request
        for attempt in range(2, landing.MAX_ATTEMPTS + 1):
            launch(instance, previous, DagsterRunStatus.FAILURE)
            retry = tick(landing_sensor, instance, cursor)
            (previous,) = retry.run_requests
            assert previous.run_key.endswith(f":{attempt}") and previous.tags == request.tags
            cursor = retry.cursor
        # ... then it waits for the file to be delivered again, and says so
        launch(instance, previous, DagsterRunStatus.FAILURE)
        gave_up = tick(landing_sensor, instance, cursor)
        assert not gave_up.run_requests
        assert (f"flights/2013-01-02.csv: {landing.MAX_ATTEMPTS} failed runs (last: {previous.run_key}); waiting for "
                "it to be delivered again") in gave_up.skip_reason.skip_message
        for path in [day2, *(home.landing / kind / "2013-01-03.csv" for kind in ("flights", "weather"))]:
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 3_000_000))  # delivered again
        redelivered = tick(landing_sensor, instance, gave_up.cursor)
        (second,) = redelivered.run_requests
        assert (second.tags[RANGE_START_TAG], second.tags[RANGE_END_TAG]) == ("2013-01-02", "2013-01-03")

        # it succeeds: the files count as ingested, nothing more is requested
        launch(instance, second, DagsterRunStatus.SUCCESS)
        done = tick(landing_sensor, instance, redelivered.cursor)
        assert not done.run_requests and "not finished" not in done.skip_reason.skip_message
        assert "flights/2013-01-02.csv" in json.loads(done.cursor)["ingested"]
        assert json.loads(done.cursor)["failed"] == {}

        # with a champion, a landed day's run goes on to its predictions and monitoring
        from mlplatform import keys

        instance.report_runless_asset_event(AssetMaterialization(keys.CHAMPION_MODEL))
        os.utime(day2, ns=(time.time_ns(), time.time_ns() + 4_000_000))
        (with_champion,) = tick(landing_sensor, instance, done.cursor).run_requests
        assert {k.to_user_string() for k in with_champion.asset_selection} == DAILY_FEATURES | NEEDS_CHAMPION


def launch(instance, request, status):
    """A run as the daemon would launch it for a request, ended with ``status``."""
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id=request.run_key.replace(":", "-").replace(".", "-"),
                                status=status, tags={**request.tags, "dagster/run_key": request.run_key}))


def test_contiguous_ranges():
    assert landing.contiguous_ranges(["2013-01-05", "2013-01-01", "2013-01-02", "2013-01-02"]) == [
        ("2013-01-01", "2013-01-02"), ("2013-01-05", "2013-01-05")]


# --- retraining: real warehouse tables (features built by the real jobs), a real MLflow registry ---

def register(home, train: tuple[D, D], eval_end: D, alias: str | None = None) -> str:
    """A model version with the training window and evaluation end the training asset tags."""
    client = sensors.tracking_from(home).client()
    if not client.search_registered_models(f"name = '{MODEL}'"):
        client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=str(home.home / "no-artifacts"), tags={
        TRAIN_START_TAG: str(train[0]), TRAIN_END_TAG: str(train[1]), "eval_end": str(eval_end)}).version
    if alias:
        client.set_registered_model_alias(MODEL, alias, version)
    return str(version)


def report_days(home, version: str, days: list[D], drifted=(), degraded=(), drift=True, performance=True,
                min_labelled=200):
    """Each day's rows of monitoring.drift_days and monitoring.model_performance, as the
    monitoring assets write them (their verdict functions, the real labelled counts)."""
    import pandas as pd

    from mlplatform.monitoring import drift as d
    from mlplatform.monitoring.assets import drift_verdict, labelled_flights, replace_days

    with duckdb.connect(str(home.warehouse)) as conn:
        labelled = labelled_flights(conn, min(days), max(days))
        verdicts, performance_rows = [], []
        for day in days:
            share = 0.5 if day in drifted else 0.0
            report = pd.DataFrame({"feature": ["a", "b"], "metric": "psi", "value": [1.0 if share else 0.0, 0.0],
                                   "threshold": 0.25, "drifted": [bool(share), False], "judged": True})
            # the asset judges against its own reference's window: day - 1 stands for "after it"
            verdicts.append(drift_verdict(day, report, labelled[day], day - dt.timedelta(days=1), d.Thresholds(),
                                          min_labelled) | {"reference_version": version})
            auc = 0.55 if day in degraded else 0.74
            performance_rows.append({"performance_date": day, "model_version": version, "rows": labelled[day],
                                     "roc_auc": auc, "log_loss": 0.6, "window_start": day - dt.timedelta(days=6),
                                     "window_rows": 7 * labelled[day], "window_roc_auc": auc,
                                     "expected_roc_auc": 0.74, "judged": labelled[day] >= min_labelled,
                                     "degraded": day in degraded and labelled[day] >= min_labelled})
        if drift:
            replace_days(conn, "monitoring.drift_days", "drift_date", pd.DataFrame(verdicts), min(days), max(days))
        if performance:
            replace_days(conn, "monitoring.model_performance", "performance_date", pd.DataFrame(performance_rows),
                         min(days), max(days))


def decide(home, version: str, promoted: bool, window: tuple[D, D], run_id: str | None, champion: str | None = None):
    from mlplatform.training import promotion

    with duckdb.connect(str(home.warehouse)) as conn:
        promotion.record(conn, MODEL, promotion.Evaluation(version, {"roc_auc": 0.7, "log_loss": 0.6}),
                         None, promotion.Decision(promoted, "test"), window, run_id)
        if promoted:
            promotion.mark_applied(conn, MODEL, version)
    if promoted:
        sensors.tracking_from(home).set_alias("champion", version)


def decision(instance, home, now=None, cooldown=3600):
    return retraining_decision(instance, {}, now or time.time(), replace(home, retrain_cooldown_seconds=cooldown))


@pytest.mark.integration
def test_retraining_reads_days_after_the_champions_window(features_home):
    home = features_home  # labelled days 2013-01-01..02-06
    with DagsterInstance.ephemeral() as instance:
        outcome, _ = decision(instance, home)
        assert isinstance(outcome, SkipReason) and "no champion" in outcome.skip_message

        # a champion trained on every labelled day: there is nothing newer to retrain on
        register(home, (D(2013, 1, 1), D(2013, 2, 6)), D(2013, 2, 6), alias="champion")
        outcome, _ = decision(instance, home)
        assert "no labelled day after the training window of champion v1" in outcome.skip_message

        # a champion trained on January 1-20; a backfill reported January and its range "drifted"
        # inside the window (as a range's shared flag did): no signal, whatever the rows say
        register(home, (D(2013, 1, 1), D(2013, 1, 20)), D(2013, 1, 27))  # version 2, promoted by hand
        decide(home, "2", True, (D(2013, 1, 21), D(2013, 1, 27)), None)
        january = [D(2013, 1, 1) + dt.timedelta(days=i) for i in range(27)]
        report_days(home, "2", january, drifted=january, degraded=january)
        with duckdb.connect(str(home.warehouse)) as conn:  # rows as a home made before days were judged has
            conn.execute("UPDATE monitoring.model_performance SET judged = NULL")
        outcome, _ = decision(instance, home)
        assert isinstance(outcome, SkipReason)
        # the days after the window are the champion's own evaluation window: the gate saw them
        assert "already in the data of the training of v2 (promoted)" in outcome.skip_message
        report_days(home, "2", january)  # (the days re-reported, quiet)

        # quiet days after the window: nothing to do, and the skip says which days were judged
        february = [D(2013, 1, 28) + dt.timedelta(days=i) for i in range(10)]  # 01-28..02-06
        report_days(home, "2", february)
        outcome, _ = decision(instance, home)
        assert "no drift or degradation on the 17 judged day(s) (2013-01-21..2013-02-06)" in outcome.skip_message

        # a day its reports did not judge (too few labelled flights for their config) is no signal,
        # and the skip says why: the threshold lives in the monitoring assets' config only
        report_days(home, "2", february, drifted=february, degraded=february, min_labelled=10_000)
        outcome, _ = decision(instance, home)
        assert "not judged (fewer than 10000 labelled flights): 2013-01-28..2013-02-06" in outcome.skip_message
        assert "no drift or degradation on the 7 judged day(s) (2013-01-21..2013-01-27)" in outcome.skip_message
        report_days(home, "2", february)

        # drift on 02-01 and 02-02: its drift report alone waits for the day's performance report
        report_days(home, "2", [D(2013, 2, 1), D(2013, 2, 2)], drifted=[D(2013, 2, 1), D(2013, 2, 2)],
                    performance=False)
        with duckdb.connect(str(home.warehouse)) as conn:
            conn.execute("DELETE FROM monitoring.model_performance WHERE performance_date IN ('2013-02-01', '2013-02-02')")
        outcome, _ = decision(instance, home)
        assert "waiting for both reports of 2013-02-01..2013-02-02" in outcome.skip_message
        report_days(home, "2", [D(2013, 2, 1), D(2013, 2, 2)], drifted=[D(2013, 2, 1), D(2013, 2, 2)],
                    degraded=[D(2013, 2, 2)])
        outcome, cursor = decision(instance, home)  # (version 2's promotion by hand set no cooldown)
        assert isinstance(outcome, RunRequest), outcome
        trigger = outcome.tags["mlplatform/trigger"]
        assert trigger.startswith("monitoring/drift_report[2013-02-01] drift (1/2 features); "
                                  "monitoring/drift_report[2013-02-02] drift"), trigger
        assert ("monitoring/model_performance[2013-02-02] degraded (ROC AUC 0.550 over 2013-01-27..2013-02-02, "
            "validation 0.740)") in trigger
        assert "[2013-01" not in trigger  # no January day is a signal
        # it trains on the signal days: the evaluation window is after them (02-04..02-06)
        assert outcome.run_config == {"ops": {"flight_delay_model": {"config": {"eval_end": "2013-02-06",
                                                                                 "eval_days": 3}}}}
        assert "signal days in training: 2013-02-01..2013-02-02" in outcome.tags[sensors.WINDOWS_TAG]
        assert cursor["last_request"]["run_key"] == outcome.run_key

        # while the training runs, nothing more is asked for
        instance.add_run(DagsterRun(job_name="training_job", run_id="retrain-1", status=DagsterRunStatus.STARTED,
                                    tags={**outcome.tags, "dagster/run_key": outcome.run_key}))
        waiting, _ = decision(instance, home)
        assert "training run retrain-1 is in progress; waiting: 2 signal day(s) 2013-02-01..2013-02-02" in (
            waiting.skip_message)

        # it fails: the same signals do not start it again (the skip names the run)
        instance.delete_run("retrain-1")
        instance.add_run(DagsterRun(job_name="training_job", run_id="retrain-1", status=DagsterRunStatus.FAILURE,
                                    tags={**outcome.tags, "dagster/run_key": outcome.run_key}))
        failed, _ = decision(instance, home)
        assert "(run retrain-1) ended FAILURE: re-execute it" in failed.skip_message

        # a new signal day asks again, at once; a rejected retraining covering it consumes it and
        # sets no cooldown: the next drift is asked for right away
        report_days(home, "2", [D(2013, 2, 3)], drifted=[D(2013, 2, 3)])
        again, _ = decision(instance, home)
        assert isinstance(again, RunRequest) and again.run_key != outcome.run_key
        instance.add_run(DagsterRun(job_name="training_job", run_id="retrain-2", status=DagsterRunStatus.SUCCESS,
                                    tags={**again.tags, "dagster/run_key": again.run_key}))
        register(home, (D(2013, 1, 1), D(2013, 2, 3)), D(2013, 2, 4))  # version 3
        decide(home, "3", False, (D(2013, 2, 4), D(2013, 2, 4)), "retrain-2")
        consumed, _ = decision(instance, home)
        assert "already in the data of the training of v3 (rejected)" in consumed.skip_message

        # a retraining the sensor requested is promoted: the cooldown holds what comes after it
        instance.add_run(DagsterRun(job_name="training_job", run_id="retrain-3", status=DagsterRunStatus.SUCCESS,
                                    tags={"mlplatform/requested_by": "retraining_sensor"}))
        register(home, (D(2013, 1, 1), D(2013, 1, 31)), D(2013, 2, 3))  # version 4
        decide(home, "4", True, (D(2013, 2, 1), D(2013, 2, 3)), "retrain-3")
        report_days(home, "4", february[4:], drifted=[D(2013, 2, 5)])  # 02-01..02-06, judged against v4
        cooling, _ = decision(instance, home)
        assert "cooldown: the retraining run retrain-3 promoted v4" in cooling.skip_message
        assert "waiting: 1 signal day(s) 2013-02-05" in cooling.skip_message
        after, _ = decision(instance, home, now=time.time() + 3600)
        assert isinstance(after, RunRequest) and "[2013-02-05] drift" in after.tags["mlplatform/trigger"]


def test_retraining_windows_put_the_signal_days_in_training():
    windows = sensors.retraining_windows
    # drift on the last three days: the first two train, the last one evaluates
    config, note = windows([D(2013, 2, 7), D(2013, 2, 8), D(2013, 2, 9)], D(2013, 2, 9), D(2013, 1, 30))
    assert config == {"eval_end": "2013-02-09", "eval_days": 1}
    assert "signal days in training: 2013-02-07..2013-02-08" in note
    assert "in the evaluation window: 2013-02-09 (the last labelled days" in note
    # drift a week before the last labelled day: it trains, the later days evaluate
    config, note = windows([D(2013, 2, 3)], D(2013, 2, 16), D(2013, 1, 30))
    assert config == {"eval_end": "2013-02-16", "eval_days": 7} and "evaluation window" not in note
    # the last labelled day alone drifted: it is the evaluation window, and the note says why
    config, note = windows([D(2013, 2, 9)], D(2013, 2, 9), D(2013, 1, 30))
    assert config == {"eval_end": "2013-02-09", "eval_days": 1}
    assert "training up to 2013-02-08" in note and "signal days in training" not in note
    # ... unless training would then be the champion's own data: wait for a later day
    assert windows([D(2013, 1, 31)], D(2013, 1, 31), D(2013, 1, 30)) is None


@pytest.mark.integration
def test_retraining_sensor_definition(features_home):
    home = features_home
    with DagsterInstance.ephemeral() as instance:
        register(home, (D(2013, 1, 1), D(2013, 1, 20)), D(2013, 1, 27), alias="champion")
        days = [D(2013, 2, 4), D(2013, 2, 5), D(2013, 2, 6)]
        report_days(home, "1", days, drifted=days[1:])
        result = tick(retraining_sensor, instance, None)  # the state of the warehouse decides, from the first tick
        (request,) = result.run_requests
        assert request.tags["mlplatform/requested_by"] == "retraining_sensor"
        assert request.run_key.startswith("retrain:v1:2013-02-05..2013-02-06:")
        definition = retraining_sensor(home)
        assert definition.minimum_interval_seconds == home.retraining_sensor_interval_seconds == 60
        assert "cooldown counts only from a promotion" in definition.description


def test_failed_runs_become_alerts(home):
    error = sensors.record_alert(str(home.warehouse), "daily_job", "run-1", "step raw_flights failed", None)
    assert error is None
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT job_name, run_id, message FROM monitoring.alerts").fetchall() == [
            ("daily_job", "run-1", "step raw_flights failed")]
    # an unreachable webhook is reported, and the alert is still stored
    error = sensors.record_alert(str(home.warehouse), "daily_job", "run-2", "x", "http://127.0.0.1:9/alerts")
    assert error and "webhook failed" in error
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM monitoring.alerts").fetchone()[0] == 2
