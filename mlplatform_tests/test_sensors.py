"""Sensors evaluated with build_sensor_context on a real (ephemeral) Dagster instance."""

from __future__ import annotations

import json
import os
import time

import duckdb
from dagster import (
    AssetKey,
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


def tick(sensor, instance, cursor):
    return sensor(build_sensor_context(instance=instance, cursor=cursor))


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
        assert set(request.asset_selection) == {AssetKey("raw_flights"), AssetKey("raw_weather")}

        # while its run has not finished, the same files start no second run
        again = tick(landing_sensor, instance, changed.cursor)
        assert not again.run_requests and "1 ingestion run(s) not finished" in again.skip_reason.skip_message

        # the run fails: the files are asked for again, under a new run key
        launch(instance, request, DagsterRunStatus.FAILURE)
        retry = tick(landing_sensor, instance, again.cursor)
        (second,) = retry.run_requests
        assert second.run_key != request.run_key and second.tags == request.tags

        # the retry succeeds: the files count as ingested, nothing more is requested
        launch(instance, second, DagsterRunStatus.SUCCESS)
        done = tick(landing_sensor, instance, retry.cursor)
        assert not done.run_requests and "not finished" not in done.skip_reason.skip_message
        assert "flights/2013-01-02.csv" in json.loads(done.cursor)["ingested"]


def launch(instance, request, status):
    """A run as the daemon would launch it for a request, ended with ``status``."""
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id=request.run_key.replace(":", "-").replace(".", "-"),
                                status=status, tags={**request.tags, "dagster/run_key": request.run_key}))


def test_contiguous_ranges():
    assert landing.contiguous_ranges(["2013-01-05", "2013-01-01", "2013-01-02", "2013-01-02"]) == [
        ("2013-01-01", "2013-01-02"), ("2013-01-05", "2013-01-05")]


def report_drift(instance, partition, detected=True):
    instance.report_runless_asset_event(AssetMaterialization(
        asset_key=AssetKey(["monitoring", "drift_report"]), partition=partition,
        metadata={"drift_detected": detected},
    ))


def test_retraining_sensor_signal_cooldown_and_in_progress(home):
    with DagsterInstance.ephemeral() as instance:
        outcome, cursor = retraining_decision(instance, {}, time.time(), cooldown=3600)
        assert isinstance(outcome, SkipReason) and "no drift" in outcome.skip_message

        report_drift(instance, "2013-04-01", detected=False)
        outcome, cursor = retraining_decision(instance, cursor, time.time(), cooldown=3600)
        assert isinstance(outcome, SkipReason)

        report_drift(instance, "2013-04-02")
        now = time.time()
        outcome, cursor = retraining_decision(instance, cursor, now, cooldown=3600)
        assert isinstance(outcome, RunRequest)
        assert "drift_report[2013-04-02] drift_detected" in outcome.tags["mlplatform/trigger"]

        # new drift inside the cooldown waits, and is remembered
        report_drift(instance, "2013-04-03")
        outcome, cursor = retraining_decision(instance, cursor, now + 60, cooldown=3600)
        assert isinstance(outcome, SkipReason) and "cooldown" in outcome.skip_message
        assert cursor["pending"] and "2013-04-03" in cursor["pending"][0]

        # a training run in progress blocks a request even after the cooldown
        run = instance.add_run(DagsterRun(job_name="training_job", run_id="r1", status=DagsterRunStatus.STARTED))
        outcome, cursor = retraining_decision(instance, cursor, now + 7200, cooldown=3600)
        assert isinstance(outcome, SkipReason) and "in progress" in outcome.skip_message
        instance.delete_run(run.run_id)

        outcome, cursor = retraining_decision(instance, cursor, now + 7200, cooldown=3600)
        assert isinstance(outcome, RunRequest) and "2013-04-03" in outcome.tags["mlplatform/trigger"]
        assert cursor["pending"] == []


def test_retraining_sensor_definition_keeps_its_cursor(home):
    with DagsterInstance.ephemeral() as instance:
        report_drift(instance, "2013-03-30")
        first = tick(retraining_sensor, instance, None)  # history does not retrain
        assert not first.run_requests and "first tick" in first.skip_reason.skip_message
        report_drift(instance, "2013-04-02")
        result = tick(retraining_sensor, instance, first.cursor)
        (request,) = result.run_requests
        assert "2013-03-30" not in request.tags["mlplatform/trigger"]
        assert request.run_key.startswith("retrain:")
        second = tick(retraining_sensor, instance, result.cursor)
        assert not second.run_requests
        assert json.loads(second.cursor)["last_request"] == json.loads(result.cursor)["last_request"]


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
