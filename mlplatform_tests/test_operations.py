"""Operations: concurrent runs on one DuckDB warehouse, and a run killed in the middle.

The runs are real processes on a real Dagster instance (SQLite storage under the test's
DAGSTER_HOME, with the `dagster.yaml` that `mlplatform init` writes), as the daemon or a
backfill would start them.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time

import duckdb
import pytest

from mlplatform_tests.conftest import WORLD_DAYS, clone_world, source_rows

LANE = "system"

D = dt.date
RUN_JOB = """
import sys
from dagster import DagsterInstance
from mlplatform.definitions import load_defs
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings
job, start, end = sys.argv[1], sys.argv[2], sys.argv[3]
tags = {RANGE_START_TAG: start, RANGE_END_TAG: end} if start != "-" else {}
settings = Settings.from_env()
with DagsterInstance.from_config(str(settings.dagster_home)) as instance:
    result = load_defs(settings).resolve_job_def(job).execute_in_process(instance=instance, tags=tags,
                                                                          raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def start_job(home, job: str, start: D | None = None, end: D | None = None, nice: int = 0) -> subprocess.Popen:
    """A run of `job` in its own process (and process group), as a launched run would be; its
    output goes to ``proc.log_path``. ``nice``: a lower CPU priority for the process."""
    args = [*(["nice", "-n", str(nice)] if nice else []),
            sys.executable, "-c", RUN_JOB, job, str(start) if start else "-", str(end or start) if start else "-"]
    log = (home.home / "logs")
    log.mkdir(parents=True, exist_ok=True)
    path = log / f"{job}-{start}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(args, env={**os.environ, **home.as_env()}, stdout=path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = path
    return proc


def wait(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def reader(home):
    """A read-only connection that waits for a writer: after a SIGKILL of a run's process group
    its dbt child may hold the warehouse's lock a moment longer than the run's own process."""
    from mlplatform.resources import WarehouseReader

    return WarehouseReader(database=str(home.warehouse), max_wait_seconds=30).get_connection()


def day_counts(home, table: str, column: str) -> dict[D, int]:
    with reader(home) as conn:
        return dict(conn.execute(f"SELECT {column}, count(*) FROM {table} GROUP BY 1").fetchall())


def duplicates(home, table: str, key: str) -> int:
    with reader(home) as conn:
        return conn.execute(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}").fetchone()[0]


@pytest.fixture
def ops_home(home, reference_world):
    """A copy of the reference world: its warehouse and its Dagster instance (one run, the
    reference_job's, SUCCESS), with the dagster.yaml and warehouse_writer pool limit that
    `mlplatform init` writes."""
    return clone_world(reference_world, home)


def test_four_concurrent_runs_on_different_partitions_all_succeed(ops_home):
    """Four daily runs at once: all succeed, every row lands once, and the warehouse-writing
    steps of different runs never overlapped (the pool held them apart)."""
    from dagster import DagsterEventType, DagsterInstance

    home = ops_home
    days = [D(2013, 1, 7), D(2013, 1, 8), D(2013, 1, 9), D(2013, 1, 10)]
    # at a lower priority, all four: a run blocked by the pool busy-waits in Dagster's step loop
    # (dagster 1.13: InstanceConcurrencyContext.interval_to_next_pending_claim_check is never
    # above 0), ~a core each, which would take the cores from the suite's other tests. Started a
    # second apart (they still all run at once, queued by the pool): Dagster 1.13's claim of a
    # pool slot is not atomic on SQLite (SqlEventLogStorage._claim_concurrency_slot selects a free
    # slot, then updates it by id; SQLite ignores FOR UPDATE), so two claims within the same few
    # milliseconds can both win. Seen once, at nice 19, two runs' raw_flights claiming 10 ms
    # apart; DuckDB's file lock then held the second writer back (retry_while_locked), and every
    # row still landed once. README, "Concurrency on one DuckDB file".
    procs = []
    for day in days:
        procs.append(start_job(home, "daily_job", day, nice=10))
        time.sleep(1)
    codes = [wait(p) for p in procs]
    assert codes == [0, 0, 0, 0], [p.args[-2:] for p, c in zip(procs, codes) if c]

    flights = day_counts(home, "raw.flights", "_partition_date")
    assert flights == {day: len(source_rows("flights", day)) for day in days}
    features = day_counts(home, "features.flight_features", "flight_date")
    assert features == flights
    assert duplicates(home, "features.flight_features", "flight_id") == 0

    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        runs = instance.get_runs()
        daily = [r for r in runs if r.job_name == "daily_job"]
        assert len(daily) == 4 and all(r.is_success for r in daily)
        intervals = []
        for run in daily:
            started = {}
            for entry in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START,
                                                                DagsterEventType.STEP_SUCCESS}):
                if entry.dagster_event.event_type == DagsterEventType.STEP_START:
                    started[entry.step_key] = entry.timestamp
                else:
                    intervals.append((started[entry.step_key], entry.timestamp, run.run_id, entry.step_key))
    logs = "".join(p.log_path.read_text() for p in procs)
    assert "blocked by limit for pool warehouse_writer" in logs  # the runs did compete for the warehouse
    writer_steps = [i for i in intervals if i[3] in ("raw_flights", "raw_weather", "dbt_daily")]
    assert len(writer_steps) == 12
    writer_steps.sort()
    for (s1, e1, r1, k1), (s2, e2, r2, k2) in zip(writer_steps, writer_steps[1:]):
        assert e1 <= s2 + 0.05, f"{k1} of {r1} overlapped {k2} of {r2}"


@pytest.mark.parametrize("table, written_by", [
    ("raw.flights", "flights"),  # the loader's transaction: 12 days deleted and re-inserted
    ("features.flight_features", "flight_features"),  # dbt's incremental model: delete + insert
])
def test_a_run_killed_mid_write_leaves_no_duplicate_and_no_missing_row(home, world, tmp_path, monkeypatch, table,
                                                                      written_by):
    """A ranged daily run re-writes 12 days that are already loaded (the world's, with the rest
    of its five weeks); it is SIGKILLed (the run and its dbt, the whole process group) inside a
    partition write's transaction, after every row is written and before COMMIT (fault
    injection: MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT). Every table still holds each day exactly
    once; the dead run is recovered; re-running completes."""
    from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context

    from mlplatform.operations import dead_run_sensor

    clone_world(world, home)
    start, end = D(2013, 1, 1), D(2013, 1, 12)
    loaded = [WORLD_DAYS[0] + dt.timedelta(days=i) for i in range((WORLD_DAYS[1] - WORLD_DAYS[0]).days + 1)]
    expected = {day: len(source_rows("flights", day)) for day in loaded}
    tables = [("raw.flights", "_partition_date"), ("staging.stg_flights", "flight_date"),
              ("features.flight_features", "flight_date")]
    assert all(day_counts(home, t, c) == expected for t, c in tables)

    paused = tmp_path / f"paused-{written_by}"
    monkeypatch.setenv("MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT", f"{written_by}={paused}")
    proc = start_job(home, "daily_job", start, end)
    deadline = time.monotonic() + 180
    while not paused.exists():
        assert proc.poll() is None, proc.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{written_by} never reached its commit"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # inside the open transaction
    proc.wait()
    monkeypatch.delenv("MLPLATFORM_FAULT_PAUSE_BEFORE_COMMIT")

    for t, c in tables:  # the interrupted write left the previous, complete days
        assert day_counts(home, t, c) == expected, t
    assert duplicates(home, "raw.flights", "(_partition_date, _source_row)") == 0
    assert duplicates(home, "features.flight_features", "flight_id") == 0

    # the killed run is STARTED and holds the warehouse_writer slot its step claimed: every later
    # warehouse step would wait for it. The dead_run_sensor (ticked here as the daemon would)
    # marks it failed and frees the slot.
    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        killed = [r for r in instance.get_runs() if r.status == DagsterRunStatus.STARTED]
        assert len(killed) == 1
        assert instance.event_log_storage.get_concurrency_info("warehouse_writer").claimed_slots
        result = dead_run_sensor(build_sensor_context(instance=instance))
        assert killed[0].run_id in result.skip_message
        assert instance.get_run_by_id(killed[0].run_id).status == DagsterRunStatus.FAILURE
        pool = instance.event_log_storage.get_concurrency_info("warehouse_writer")
        assert not pool.claimed_slots and not pool.pending_steps

    assert wait(start_job(home, "daily_job", start, end)) == 0
    for t, c in tables:
        assert day_counts(home, t, c) == expected, t
    assert duplicates(home, "features.flight_features", "flight_id") == 0


def test_slots_of_runs_that_ended_are_freed(ops_home):
    """A launched run whose process dies is marked failed by Dagster's code server, which does
    not free the pool slot it held: recovery frees the slots of every run that has ended."""
    from dagster import DagsterInstance

    from mlplatform.operations import recover_dead_runs

    with DagsterInstance.from_config(str(ops_home.dagster_home)) as instance:
        (finished,) = instance.get_runs()  # the fixture's reference_job, SUCCESS
        instance.event_log_storage.claim_concurrency_slot("warehouse_writer", finished.run_id, "raw_flights")
        assert instance.event_log_storage.get_concurrency_info("warehouse_writer").claimed_slots
        assert recover_dead_runs(instance) == []  # nothing to mark failed...
        assert not instance.event_log_storage.get_concurrency_info("warehouse_writer").claimed_slots  # ...but freed


def test_readers_wait_for_a_writer_then_read(home):
    """A read-only connection waits, with backoff, while another process writes, and gives up
    with DuckDB's lock error after max_wait_seconds."""
    from mlplatform.resources import WarehouseReader

    with duckdb.connect(str(home.warehouse)) as conn:
        conn.execute("CREATE TABLE t AS SELECT 42 AS x")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('locked', flush=True); "
         "time.sleep(float(sys.argv[2]))", str(home.warehouse), "2"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(duckdb.IOException, match="lock"):
            with WarehouseReader(database=str(home.warehouse), max_wait_seconds=0.3).get_connection():
                pass
        began = time.monotonic()
        with WarehouseReader(database=str(home.warehouse)).get_connection() as conn:
            assert conn.execute("SELECT x FROM t").fetchone() == (42,)
            with pytest.raises(duckdb.Error):
                conn.execute("CREATE TABLE u AS SELECT 1")  # read-only
        assert time.monotonic() - began > 0.5  # it waited for the writer
    finally:
        holder.kill()
        holder.wait()


def test_warehouse_connections_keep_to_the_memory_limit(home, monkeypatch):
    """Every DuckDB connection of the platform runs under MLPLATFORM_DUCKDB_MEMORY_LIMIT (DuckDB's
    own default is 80% of the machine): the writers' and readers' resources, and dbt's profile as
    the dbt resource starts dbt."""
    import os
    import subprocess

    from mlplatform.resources import warehouse_reader_resource, warehouse_resource
    from mlplatform.settings import DBT_PROJECT_DIR, Settings, dbt_executable
    from mlplatform.settings import dbt_variables

    monkeypatch.setenv("MLPLATFORM_DUCKDB_MEMORY_LIMIT", "300MB")
    settings = Settings.from_env()
    limit = "SELECT current_setting('memory_limit')"
    with warehouse_resource(settings).process_config_and_initialize().get_connection() as conn:
        assert conn.execute(limit).fetchone()[0] == "286.1 MiB"
        conn.execute("CREATE TABLE t AS SELECT 1 AS x")
    with warehouse_reader_resource(settings).process_config_and_initialize().get_connection() as conn:
        assert conn.execute(limit).fetchone()[0] == "286.1 MiB"
    done = subprocess.run(
        [dbt_executable(), "show", "--inline", limit, "--output", "json", "--quiet", "--profiles-dir", str(DBT_PROJECT_DIR),
         "--target-path", str(home.home / "dbt-show")],
        cwd=DBT_PROJECT_DIR, capture_output=True, text=True,
        env={**os.environ, **dbt_variables(settings.warehouse, settings.duckdb_memory_limit)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "286.1 MiB" in done.stdout
