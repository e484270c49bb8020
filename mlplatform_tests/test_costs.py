"""Compute cost per asset (``mlplatform.monitoring.costs``): the measurement of a block of work
against what it really did, and real runs of ``daily_job`` and ``training_job`` whose steps'
figures (on their materializations, then rows of ``monitoring.asset_costs``) are checked against
Dagster's own step durations and the process's CPU, then summed by the report."""

import datetime as dt
import resource
import subprocess
import sys
import time

import duckdb
import pytest

from mlplatform import keys
from mlplatform.monitoring import costs
from mlplatform_tests.conftest import CHAMPION_TRAINING, failures, run_job

LANE = "integration"
MIB = 1024 * 1024


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.unit
def test_a_measurement_counts_the_process_and_the_children_it_waited_for():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with costs.Measurement() as own:
        block = bytearray(120 * MIB)
        block[::4096] = b"x" * len(block[::4096])  # resident, page by page
        busy(0.3)
        del block
    assert own.figures.seconds >= 0.3 and own.figures.cpu_seconds >= 0.29
    assert own.figures.peak_rss >= 120 * MIB
    with costs.Measurement() as child:
        subprocess.run([sys.executable, "-c", "import time; b = bytearray(80 * 2**20); b[::4096] = b'x' * len(b[::4096]);"
                        "e = time.process_time() + 0.3\nwhile time.process_time() < e: pass\ntime.sleep(0.3)"], check=True)
    assert child.figures.cpu_seconds >= 0.3  # (the child's, from RUSAGE_CHILDREN)
    assert child.figures.child_peak_rss >= 80 * MIB
    assert child.figures.peak_rss < own.figures.peak_rss - 60 * MIB  # the child's memory is not the process's
    # the process's own peak (wait4's ru_maxrss, what the benchmarks report) is not reset
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >= max(before, own.figures.peak_rss // 1024)


@pytest.mark.unit
def test_a_step_is_split_by_weights_or_in_equal_shares_and_adds_up():
    step = costs.Figures(10.0, 6.0, 100, 50)
    shares = costs.split(step, [3.0, 1.0])
    assert [s.seconds for s in shares] == [7.5, 2.5] and [s.cpu_seconds for s in shares] == [4.5, 1.5]
    assert all(s.peak_rss == 100 and s.child_peak_rss == 50 for s in shares)
    equal = costs.split(step, [3.0, None, 1.0])  # a share without its weight: equal shares
    assert [s.seconds for s in equal] == pytest.approx([10 / 3] * 3)
    assert costs.split(step, [0.0, 0.0]) == [costs.Figures(5.0, 3.0, 100, 50)] * 2


def step_durations(instance, run_id: str) -> dict[str, float]:
    return {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(run_id)}


def timed_run(instance, name, *args, **kwargs):
    """The run, and the CPU seconds of this process and its children while it ran."""
    cpu = lambda: sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)  # noqa: E731
                      for f in ("ru_utime", "ru_stime"))
    start = cpu()
    result = run_job(instance, name, *args, **kwargs)
    assert result.success, failures(result)
    return result, cpu() - start


def test_the_steps_of_real_runs_are_measured_recorded_once_and_reported(features_home, instance):
    week = (dt.date(2013, 2, 7), dt.date(2013, 2, 13))
    daily, daily_cpu = timed_run(instance, "daily_job", *week)
    training, training_cpu = timed_run(instance, "training_job", run_config={
        "ops": {"flight_delay_model": {"config": CHAMPION_TRAINING}}})

    # the figures are on the materializations: a range is one step, its figures on every day's event
    events = instance.fetch_materializations(keys.RAW_FLIGHTS, limit=10).records
    assert len(events) == 7 and len({e.partition_key for e in events}) == 7
    metadata = events[0].asset_materialization.metadata
    assert metadata[costs.PARTITIONS].value == "2013-02-07..2013-02-13" and metadata[costs.PARTITION_COUNT].value == 7
    assert metadata[costs.SECONDS].value > 0 and metadata[costs.CPU_SECONDS].value > 0
    assert metadata[costs.PEAK_RSS].value > 50  # MiB: a Python process with pandas and DuckDB
    assert {e.asset_materialization.metadata[costs.SECONDS].value for e in events} == {metadata[costs.SECONDS].value}
    dbt = instance.fetch_materializations(keys.FEATURES, limit=1).records[0].asset_materialization.metadata
    assert dbt[costs.CHILD_PEAK_RSS].value > 50  # dbt, a child process
    assert 0 < dbt[costs.SECONDS].value < dbt[costs.STEP_SECONDS].value  # a share of dbt_daily's step

    first, price = run_job(instance, "cost_report_job"), 2.0
    assert first.success, failures(first)
    again = run_job(instance, "cost_report_job", run_config={"ops": {"monitoring__asset_costs": {"config": {
        "price_per_cpu_hour": price}}}})
    assert again.success, failures(again)
    with duckdb.connect(str(features_home.warehouse), read_only=True) as conn:
        rows = conn.execute("SELECT * FROM monitoring.asset_costs").df()
        since = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
        report = costs.summarize(conn, price, since)
    # a row per run and asset, also after the report ran twice (and read the same events again)
    assert not rows.duplicated(["run_id", "asset_key"]).any()
    assert (rows[["seconds", "cpu_seconds", "peak_rss_mib"]] > 0).all().all()
    daily_steps = {"raw_flights", "raw_weather", "raw_flight_events", "dbt_daily"}
    training_steps = {"flight_delay_model", "model_evaluation", "champion_model", "monitoring__reference_profile"}
    for result, cpu, steps in [(daily, daily_cpu, daily_steps), (training, training_cpu, training_steps)]:
        mine = rows[rows.run_id == result.run_id]
        stats = instance.get_run_stats(result.run_id)
        assert set(mine.step_key) == steps  # (the first model is judged against a baseline, and promoted)
        durations = step_durations(instance, result.run_id)
        for step, part in mine.groupby("step_key"):
            # a step's rows add up to it, within Dagster's own duration of the step
            assert part.seconds.sum() == pytest.approx(part.step_seconds.iloc[0], abs=1e-3 * len(part))
            assert part.cpu_seconds.sum() == pytest.approx(part.step_cpu_seconds.iloc[0], abs=1e-3 * len(part))
            assert part.step_seconds.iloc[0] <= durations[step]
        run_seconds = stats.end_time - stats.start_time
        # the steps are most of the run, and never more; their CPU is within the process's
        assert 0.5 * run_seconds < mine.groupby("step_key").step_seconds.first().sum() <= run_seconds
        assert mine.cpu_seconds.sum() <= cpu + 1e-3
    daily_rows = rows[rows.run_id == daily.run_id]
    assert set(daily_rows.partitions) == {"2013-02-07..2013-02-13"} and set(daily_rows.partition_count) == {7}
    assert keys.FEATURES.to_user_string() in set(daily_rows.asset_key)
    assert set(rows[rows.run_id == training.run_id].group_name) == {"training", "monitoring"}
    assert set(rows[rows.asset_key == "raw_flights"].group_name) == {"ingest"}
    # the report's sums are the rows', at the price asked for
    measured = rows[rows.cost_date.dt.date >= since]
    by_asset = measured.groupby("asset_key").cpu_seconds.sum()
    assert report["asset"].set_index("asset_key").cpu_seconds.to_dict() == pytest.approx(by_asset.to_dict())
    assert report["group"].set_index("group_name").seconds.to_dict() == pytest.approx(
        measured.groupby(measured.group_name.fillna("(none)")).seconds.sum().to_dict())
    assert report["day"].cpu_seconds.sum() == pytest.approx(measured.cpu_seconds.sum())
    assert report["asset"].cost.sum() == pytest.approx(measured.cpu_seconds.sum() / 3600 * price)
    shown = instance.fetch_materializations(keys.ASSET_COSTS, limit=1).records[0].asset_materialization.metadata
    assert shown["price_per_cpu_hour"].value == price and shown["rows_recorded"].value == len(rows)
    assert shown["total_cost"].value == pytest.approx(shown["total_cpu_seconds"].value / 3600 * price, rel=1e-3)
    top = report["asset"].asset_key.iloc[0]
    assert f"| {top} |" in shown["most_expensive"].value and "| training |" in shown["by_group"].value
