"""The closed loop on real days: drift detected -> retraining requested -> challenger gated."""

from __future__ import annotations

import duckdb
from dagster import DagsterEventType, RunRequest, build_sensor_context

from mlplatform.definitions import load_defs
from mlplatform.keys import TRIGGER_TAG
from mlplatform.monitoring.drifted import land_drifted_days
from mlplatform.ingest.sensors import landing_sensor
from mlplatform.monitoring.sensors import retraining_sensor
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.pipeline import status_of
from mlplatform.settings import Settings
from mlplatform_tests.conftest import D, failures, run_job

LANE = "integration"


def check(result, name):
    return next(e.event_specific_data for e in result.all_events
                if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION and e.event_specific_data.check_name == name)


def query(home, sql, params=None):
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute(sql, params or []).fetchall()


def test_drift_triggers_retraining_through_the_gate(champion_home, champion_instance):
    """From the trained world (a champion trained on 2013-01-01..01-30, its predictions, the
    monitoring of its evaluation week): ordinary days are quiet, drifted days are detected, and
    the retraining the sensor asks for goes through the gate."""
    home, instance = champion_home, champion_instance
    settings = Settings.from_env()
    defs = load_defs(settings)
    assert (home.profiles / "reference" / "flight_delay-v1.bin").exists()

    # ordinary real days against the champion's reference: no drift, no degradation
    quiet = run_job(instance, "monitoring_job", D(2013, 1, 31), D(2013, 2, 6))
    assert quiet.success, failures(quiet)
    assert check(quiet, "drifted_share_ok").passed
    assert check(quiet, "performance_ok").passed
    assert query(home, "SELECT count(DISTINCT drift_date) FROM monitoring.drift")[0][0] == 7
    assert query(home, "SELECT count(*) FROM monitoring.model_performance WHERE rows > 500")[0][0] == 7

    # the sensors start watching: what happened so far is history
    landing, retraining = landing_sensor(settings), retraining_sensor(settings)
    baseline = landing(build_sensor_context(instance=instance, cursor=None, definitions=defs)).cursor
    retrain_baseline = retraining(build_sensor_context(instance=instance, cursor=None)).cursor
    assert not retraining(build_sensor_context(instance=instance, cursor=retrain_baseline)).run_requests
    # the landing sensor sees three drifted days arrive and asks for one ranged run, through
    # every daily asset up to the drift verdict (there is a champion)
    targets = [D(2013, 2, 7), D(2013, 2, 8), D(2013, 2, 9)]
    land_drifted_days(home.landing, targets, targets, severity=1.0)
    (request,) = landing(build_sensor_context(instance=instance, cursor=baseline, definitions=defs)).run_requests
    start, end = request.tags[RANGE_START_TAG], request.tags[RANGE_END_TAG]
    assert (start, end) == ("2013-02-07", "2013-02-09")
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=request.asset_selection, tags=request.tags, raise_on_error=False)
    assert result.success, failures(result)
    drift = check(result, "drifted_share_ok")
    assert not drift.passed and "2013-02-07" in drift.description
    drifted = {f for (f,) in query(home, "SELECT DISTINCT feature FROM monitoring.drift WHERE drifted AND judged "
                                         "AND metric = 'psi' AND drift_date >= '2013-02-07'")}
    assert {"sched_dep_time", "sched_dep_hour"} <= drifted

    # the retraining sensor turns the drift into a training run, which goes through the gate
    tick = retraining(build_sensor_context(instance=instance, cursor=retrain_baseline))
    (retrain,) = tick.run_requests
    assert isinstance(retrain, RunRequest) and "drift_report[2013-02-0" in retrain.tags[TRIGGER_TAG]
    result = defs.resolve_job_def("training_job").execute_in_process(
        instance=instance, run_config=retrain.run_config, tags=retrain.tags, raise_on_error=False)
    assert result.success, failures(result)  # a rejection is a decision, not a failure
    assert check(result, "promotion_gate") is not None
    decisions = query(home, "SELECT challenger_version, champion_version, decision, reason, eval_start "
                            "FROM monitoring.model_promotions ORDER BY decided_at")
    assert len(decisions) == 2
    version, champion, decision, reason, eval_start = decisions[1]
    assert (version, champion, str(eval_start)) == ("2", "1", "2013-02-09")  # the drifted days before it train
    assert decision in ("promoted", "rejected") and reason
    assert status_of(result)[0] == ("SUCCESS" if decision == "promoted" else "CHALLENGER REJECTED")
    run = instance.get_run_by_id(result.run_id)
    assert run.tags[TRIGGER_TAG] == retrain.tags[TRIGGER_TAG]
    # nothing new happened: the sensor stays quiet
    assert not retraining(build_sensor_context(instance=instance, cursor=tick.cursor)).run_requests
