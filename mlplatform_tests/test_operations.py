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

from mlplatform.cli import init_home
from mlplatform_tests.conftest import source_rows

pytestmark = pytest.mark.slow

D = dt.date
RUN_JOB = """
import sys
from dagster import DagsterInstance
from mlplatform.definitions import defs
job, start, end = sys.argv[1], sys.argv[2], sys.argv[3]
tags = {"dagster/asset_partition_range_start": start, "dagster/asset_partition_range_end": end} if start != "-" else {}
with DagsterInstance.get() as instance:
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, tags=tags, raise_on_error=False)
sys.exit(0 if result.success else 1)
"""


def start_job(home, job: str, start: D | None = None, end: D | None = None) -> subprocess.Popen:
    """A run of `job` in its own process (and process group), as a launched run would be; its
    output goes to ``proc.log_path``."""
    args = [sys.executable, "-c", RUN_JOB, job, str(start) if start else "-", str(end or start) if start else "-"]
    log = (home.home / "logs")
    log.mkdir(parents=True, exist_ok=True)
    path = log / f"{job}-{start}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(args, env={**os.environ, **home.as_env()}, stdout=path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = path
    return proc


def wait_for_log(proc: subprocess.Popen, marker: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in proc.log_path.read_text():
            return
        assert proc.poll() is None, f"the run ended before {marker!r}:\n{proc.log_path.read_text()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} in {timeout}s")


def wait(proc: subprocess.Popen, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def day_counts(home, table: str, column: str) -> dict[D, int]:
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return dict(conn.execute(f"SELECT {column}, count(*) FROM {table} GROUP BY 1").fetchall())


def duplicates(home, table: str, key: str) -> int:
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}").fetchone()[0]


@pytest.fixture
def ops_home(home):
    init_home(home)  # dagster.yaml with the warehouse_writer pool limit, as `make` writes it
    assert wait(start_job(home, "reference_job")) == 0
    return home


def test_four_concurrent_runs_on_different_partitions_all_succeed(ops_home):
    """Four daily runs at once: all succeed, every row lands once, and the warehouse-writing
    steps of different runs never overlapped (the pool held them apart)."""
    from dagster import DagsterEventType, DagsterInstance

    home = ops_home
    days = [D(2013, 1, 7), D(2013, 1, 8), D(2013, 1, 9), D(2013, 1, 10)]
    procs = [start_job(home, "daily_job", day) for day in days]
    codes = [wait(p) for p in procs]
    assert codes == [0, 0, 0, 0], [p.args[-2:] for p, c in zip(procs, codes) if c]

    flights = day_counts(home, "raw.flights", "_partition_date")
    assert flights == {day: len(source_rows("flights", day)) for day in days}
    features = day_counts(home, "features.flight_features", "flight_date")
    assert features == flights
    assert duplicates(home, "features.flight_features", "flight_id") == 0

    with DagsterInstance.get() as instance:
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
    writer_steps = [i for i in intervals if i[3] in ("raw_flights", "raw_weather", "dbt_daily")]
    assert len(writer_steps) == 12
    writer_steps.sort()
    for (s1, e1, r1, k1), (s2, e2, r2, k2) in zip(writer_steps, writer_steps[1:]):
        assert e1 <= s2 + 0.05, f"{k1} of {r1} overlapped {k2} of {r2}"


@pytest.mark.parametrize("marker, delay", [
    ('Started execution of step "raw_flights"', 0.05),  # the loader reading and writing 12 days
    ('Yielded output "staging__stg_flights"', 0.3),  # dbt done with its first model, writing the next
])
def test_a_run_killed_mid_write_leaves_no_duplicate_and_no_missing_row(ops_home, marker, delay):
    """SIGKILL the run's whole process group (the run and its dbt) while it writes (the loader's
    transaction, then dbt's models) in a ranged daily run; every table holds each day whole or
    not at all; once the dead run is recovered, re-running completes it."""
    home = ops_home
    start, end = D(2013, 1, 1), D(2013, 1, 12)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    expected = {day: len(source_rows("flights", day)) for day in days}

    proc = start_job(home, "daily_job", start, end)
    wait_for_log(proc, marker)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before it could be killed: kill earlier"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # the killed run is STARTED and holds the warehouse_writer slot its step claimed: every later
    # warehouse step would wait for it. The dead_run_sensor (ticked here as the daemon would)
    # marks it failed and frees the slot.
    from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context

    from mlplatform.operations import dead_run_sensor

    with DagsterInstance.get() as instance:
        killed = [r for r in instance.get_runs() if r.status == DagsterRunStatus.STARTED]
        assert len(killed) == 1
        result = dead_run_sensor(build_sensor_context(instance=instance))
        assert killed[0].run_id in result.skip_message
        assert instance.get_run_by_id(killed[0].run_id).status == DagsterRunStatus.FAILURE
        pool = instance.event_log_storage.get_concurrency_info("warehouse_writer")
        assert not pool.claimed_slots and not pool.pending_steps

    if home.warehouse.exists():
        for table, column in (("raw.flights", "_partition_date"), ("staging.stg_flights", "flight_date"),
                              ("features.flight_features", "flight_date")):
            try:
                counts = day_counts(home, table, column)
            except duckdb.CatalogException:
                continue  # not created yet when the kill came
            assert all(counts[d] == expected[d] for d in counts), (table, counts)
        try:
            assert duplicates(home, "raw.flights", "(_partition_date, _source_row)") == 0
        except duckdb.CatalogException:
            pass

    assert wait(start_job(home, "daily_job", start, end)) == 0
    assert day_counts(home, "raw.flights", "_partition_date") == expected
    assert day_counts(home, "features.flight_features", "flight_date") == expected
    assert duplicates(home, "raw.flights", "(_partition_date, _source_row)") == 0
    assert duplicates(home, "features.flight_features", "flight_id") == 0


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
