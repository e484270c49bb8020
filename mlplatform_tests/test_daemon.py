"""The closed loop under a real ``dagster-daemon`` on the real code location: drifted days landed
after a backfilled history retrain exactly once, and a backfill of old history retrains never.

History is built in-process against the same instance directory the daemon uses (as a user's
backfills from the UI would be recorded); from then on the daemon's landing sensor, automation
sensor and retraining sensor do the work, at short intervals set through their environment
variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from benchmarks.run import landed_state

from mlplatform.monitoring.drifted import land_drifted_days
from mlplatform.monitoring.sensors import REQUESTED_BY_TAG, SENSOR_NAME, TRIGGER_TAG, WINDOWS_TAG
from mlplatform.settings import REPO_ROOT
from mlplatform_tests.conftest import D, failures, run_job

LANE = "system"


INTERVAL = "5"  # the sensor and asset daemons loop every 5 s at most: shorter intervals buy nothing
INTERVALS = {
    "MLPLATFORM_LANDING_SENSOR_INTERVAL_SECONDS": INTERVAL,
    "MLPLATFORM_AUTOMATION_INTERVAL_SECONDS": INTERVAL,
    "MLPLATFORM_RETRAINING_SENSOR_INTERVAL_SECONDS": INTERVAL,
    "FRESHNESS_DAEMON_INTERVAL_SECONDS": INTERVAL,  # Dagster's: how often its daemon evaluates freshness policies
}
DRIFTED = [D(2013, 2, 7), D(2013, 2, 8), D(2013, 2, 9)]
# inside the champion's training window (2013-01-01..01-30): a backfill of their monitoring (the
# reports of a range, what once set a range's shared "degraded" flag on every day of it)
OLD = (D(2013, 1, 10), D(2013, 1, 12))
DONE = (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED)


def sensor_ticks(instance, name: str):
    """The daemon's ticks of sensor ``name``, newest first (none before its first tick)."""
    for state in instance.all_instigator_state():
        if state.instigator_name == name:
            return instance.get_ticks(state.instigator_origin_id, state.selector_id)
    return []


def wait_for(what: str, condition, timeout: float, log: Path, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; daemon log tail:\n{tail}")


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def retrainings(instance):
    return instance.get_runs(RunsFilter(job_name="training_job", tags={REQUESTED_BY_TAG: SENSOR_NAME}))


@contextmanager
def running_daemon(home, log: Path):
    """``dagster-daemon run`` on the code location with this test's home; stopped, with every
    process it started (its code server, run workers), on the way out."""
    env = {**os.environ, **home.as_env(), **INTERVALS}
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever is left of its process group (run workers) goes too
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


def test_the_daemon_retrains_once_on_drift_and_never_on_old_history(champion_home, tmp_path):
    """History as a user backfills it from the UI (the trained world: five weeks of days, a
    champion trained on 2013-01-01..01-30, its predictions, the monitoring of its evaluation
    week), in the instance the daemon uses."""
    home = champion_home
    log = tmp_path / "daemon.log"
    began = time.time()
    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        history_seconds = time.time() - began

        with running_daemon(home, log) as daemon:
            daemon_began = time.time()
            # the landing sensor's first tick records the landing zone as it is: history
            wait_for("the landing sensor's first tick", lambda: sensor_ticks(instance, "landing_sensor"), 120, log)

            # a backfill of old history's reports, after the sensors started: days inside the champion's window
            result = run_job(instance, "monitoring_job", *OLD)
            assert result.success, failures(result)

            # drifted days arrive as the upstream delivers them
            land_drifted_days(home.landing, DRIFTED, DRIFTED, severity=1.0)
            landed = time.time()

            (run,) = wait_for("a retraining run", lambda: retrainings(instance), 420, log, every=2)
            started = time.time() - landed
            finished = wait_for("the retraining to end",
                                lambda: (r := instance.get_run_by_id(run.run_id)).status in DONE and r, 600, log, 2)

            settled = time.time()
            wait_for("two retraining ticks after the old history and the retraining",
                     lambda: len([t for t in sensor_ticks(instance, SENSOR_NAME) if t.timestamp > settled]) >= 2,
                     120, log)

            runs = retrainings(instance)
            assert [r.run_id for r in runs] == [run.run_id], "exactly one retraining"
            # what `make bench`'s landing-to-verdict figure reads from a daemon's instance: the
            # landed day's drift verdict after it landed, and the landing sensor's ticks
            state = landed_state(instance, DRIFTED[-1], landed)
            assert state["verdict_at"] is not None and landed < state["verdict_at"] < time.time(), state
            assert state["landing_ticks"] >= 2 and landed_state(instance, DRIFTED[-1], time.time())["verdict_at"] is None
            trigger = run.tags[TRIGGER_TAG]
            for day in DRIFTED:
                assert f"monitoring/drift_report[{day}] drift" in trigger, trigger
            assert "2013-01-" not in trigger, trigger  # old history is no signal
            assert "signal days in training: 2013-02-07..2013-02-08" in run.tags[WINDOWS_TAG], run.tags[WINDOWS_TAG]
            assert instance.get_run_by_id(run.run_id).run_config["ops"]["flight_delay_model"]["config"] == {
                "eval_end": "2013-02-09", "eval_days": 1}
            # the sensor explains itself on its tick list: which days, what signal, why it skipped
            skips = {t.skip_reason for t in sensor_ticks(instance, SENSOR_NAME) if t.skip_reason}
            assert ("no drift or degradation on the 7 judged day(s) (2013-01-31..2013-02-06) after the training "
                    "window of champion v1 (trained on 2013-01-01..2013-01-30)") in skips, skips
            assert (f"training run {run.run_id} is in progress; waiting: 3 signal day(s) 2013-02-07..2013-02-09"
                    in skips), skips
            # the daily assets' freshness policies, evaluated by the daemon: fresh after today's runs
            from mlplatform.automation import MUST_BE_FRESH

            fresh = wait_for("the daemon's freshness evaluations", lambda: len(
                states := instance.get_freshness_state_records(list(MUST_BE_FRESH))) == len(MUST_BE_FRESH) and states,
                60, log)
            assert {key: record.freshness_state.value for key, record in fresh.items()} == {
                key: "PASS" for key in MUST_BE_FRESH}
            took, daemon_seconds = time.time() - began, time.time() - daemon_began
    # every process the daemon started (its code server, the run workers) is gone
    wait_for("the daemon's process group to end", lambda: not group_alive(daemon.pid), 15, log)
    # each day's own verdict, as the monitoring assets wrote it (the daemon is stopped: no writer)
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        drift = {(day, version): (judged, detected, note) for day, version, judged, detected, note in conn.execute(
            "SELECT drift_date, reference_version, judged, drift_detected, note FROM monitoring.drift_days"
        ).fetchall()}
        performance = {(day, version): judged for day, version, judged in conn.execute(
            "SELECT performance_date, model_version, judged FROM monitoring.model_performance").fetchall()}
    # the old days' reports (re-made by automation, against whichever champion was current then)
    # are not judged: those days are inside its training window
    old = [verdict for (day, _), verdict in drift.items() if day == OLD[0]]
    assert old and all(v[:2] == (False, False) and v[2].startswith("inside the model's training window")
                       for v in old), old
    assert all(drift[(day, "1")][:2] == (True, True) for day in DRIFTED), drift
    assert drift[(D(2013, 2, 6), "1")] == (True, False, "")
    # realised performance: not judged inside the window, nor on the first days after it (too few
    # flights in their trailing window), judged on the rest
    assert [judged for (day, _), judged in performance.items() if day == OLD[0]] in ([False], [False, False])
    assert (performance[(D(2013, 2, 1), "1")], performance[(D(2013, 2, 6), "1")],
            performance[(DRIFTED[0], "1")]) == (False, True, True), performance
    print(f"history in-process {history_seconds:.0f}s; daemon {daemon_seconds:.0f}s; drifted files landed -> "
          f"retraining started {started:.0f}s; retraining ended {finished.status.value}; total {took:.0f}s")

