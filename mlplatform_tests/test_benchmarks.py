"""The benchmark code runs (CI's smoke of `make bench`): no timing is asserted here."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import duckdb
import pandas as pd
import pytest
from dagster import DagsterInstance

from benchmarks import run as bench
from benchmarks.synthetic import KEY, generate
from mlplatform.ingest.contracts import FLIGHTS
from mlplatform.ingest.load import load

LANE = "system"


@pytest.mark.unit
def test_synthetic_growth_has_distinct_keys_and_passes_the_contract(replayed, tmp_path):
    source = tmp_path / "source"
    (source / "flights").mkdir(parents=True)
    for day in ("2013-01-01", "2013-01-02"):
        shutil.copy(replayed / "flights" / f"{day}.csv", source / "flights")
    written = generate(source, tmp_path / "big", factor=3, seed=1)
    real = sum(len(pd.read_csv(p)) for p in (source / "flights").glob("*.csv"))
    assert written == 3 * real
    big = pd.read_csv(tmp_path / "big" / "flights" / "2013-01-01.csv")
    assert not big.duplicated(KEY).any()
    original = pd.read_csv(source / "flights" / "2013-01-01.csv")
    copy = big.iloc[len(original):2 * len(original)].reset_index(drop=True)
    assert (copy["arr_delay"] != original["arr_delay"]).mean() > 0.5  # jittered
    assert copy["arr_delay"].isna().sum() == original["arr_delay"].isna().sum()  # cancellations kept
    with duckdb.connect() as conn:
        results = load(conn, FLIGHTS, tmp_path / "big", [dt.date(2013, 1, 1), dt.date(2013, 1, 2)])
    assert sum(r.loaded for r in results) == written and sum(r.quarantined for r in results) == 0


def test_bench_smoke_writes_the_figures_of_the_year(tmp_path, monkeypatch):
    """`benchmarks/run.py --smoke` (four weeks, once) fills results.json and results.md; its
    `mlplatform run` prints the summary of every job. The serving figure has its own smoke test
    (test_serving), growth runs the same code as the full year, the floor and the profiles are the
    next test's (two workers share the smoke), and landing-to-verdict's reading of the daemon's
    instance (`landed_state`) is asserted in test_daemon, on the daemon that test runs anyway."""
    out = tmp_path / "out"
    monkeypatch.delenv("MLPLATFORM_HOME", raising=False)
    assert bench.main(["--smoke", "--skip", "serving,growth,dagster_floor,profile,landing_to_verdict,cluster",
                       "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    year = results["full_year"]
    assert year["flights"] == year["runs"][0]["rows"]["features"] == year["runs"][0]["rows"]["predictions"] > 10_000
    assert year["pipeline_s"] > 0 and year["baseline_s"] > 0 and year["ratio"] > 0
    assert year["slowest_steps_s"] and all(v >= 0 for v in year["slowest_steps_s"].values())
    # memory per step, from the sampled timeline: the dbt step's child is dbt
    peaks = year["step_peak_rss_gib"]
    assert peaks and all(p["process"] > 0.05 for p in peaks.values())
    assert peaks["daily_job.dbt_daily"]["child"] > 0.05
    # the baseline's features are the pipeline's, value for value
    query = "SELECT * FROM features.flight_features ORDER BY flight_id"
    with duckdb.connect(str(tmp_path / "work" / "baseline" / "warehouse.duckdb"), read_only=True) as conn:
        baseline = conn.sql(query).df()
    with duckdb.connect(str(tmp_path / "work" / "pipeline-1x" / "warehouse.duckdb"), read_only=True) as conn:
        pipeline = conn.sql(query).df()
    pd.testing.assert_frame_equal(baseline, pipeline)
    # `mlplatform run`'s summary: every job succeeded on four weeks, per asset its rows, seconds and checks
    summary = (tmp_path / "work" / "pipeline-1x-0.log").read_text()
    for job in ("reference_job", "daily_job", "training_job", "predictions_job", "monitoring_job"):
        assert f"{job} 2013-01-01..2013-01-28: SUCCESS" in summary, summary
    raw_flights = next(line for line in summary.splitlines() if line.strip().startswith("raw_flights "))
    assert int(raw_flights.split()[1]) > 800 and (" 8/8 passed" in raw_flights or " 7/8 passed; " in raw_flights)
    assert all(asset in summary for asset in ("features/flight_features", "predictions/flight_delay",
                                              "monitoring/drift_report"))
    with DagsterInstance.from_config(str(tmp_path / "work" / "pipeline-1x" / "dagster")) as instance:
        assert {r.job_name for r in instance.get_runs()} == {"reference_job", "daily_job", "training_job",
                                                             "predictions_job", "monitoring_job"}
    day = results["one_day"]
    assert day["seconds"] > 0 and set(day["per_job_s"]) == {"daily_job", "predictions_job", "monitoring_job"}
    assert "daily_job.dbt_daily" in day["per_step_s"] and 0 < day["dbt_process_s"]["start_s"] < day["dbt_process_s"]["build_s"]
    assert results["whylogs"]["one_row_profile_ms"] > 0
    assert results["whylogs"]["rows"] == year["flights"] and results["whylogs"]["one_profile_rows_per_s"] > 0
    stream = results["stream"]
    assert stream["one_day"]["events"] > 1800 and stream["one_day"]["platform"]["events_per_s"] > 0
    assert stream["one_day"]["plain"]["events_per_s"] > 0 and stream["freshness"]["samples"] == 5
    assert results["code_location"]["seconds"] > 0 and "dagster" in results["code_location"]["slowest_imports_s"]
    assert "profile" not in results and "dagster_floor" not in results and "landing_to_verdict" not in results
    text = (out / "results.md").read_text()
    assert "| Full year vs plain script |" in text and "Machine:" in text
    assert text.count("**What dominates") == 2  # the dbt process, whylogs (the floor's is the next test's)


def test_bench_smoke_profiles_and_measures_the_floor(tmp_path, monkeypatch):
    """`--only profile,dagster_floor`: neither needs the full year's home, so it is not built."""
    out = tmp_path / "out"
    monkeypatch.delenv("MLPLATFORM_HOME", raising=False)
    assert bench.main(["--smoke", "--only", "profile,dagster_floor", "--workdir", str(tmp_path / "work"),
                       "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"profile", "dagster_floor"} and "full_year" not in results
    floor = results["dagster_floor"]
    assert floor["ms_per_partition"] > 0 and floor["ms_per_partition_sync_off"] > 0
    # pyinstrument's profiles of the full year and one day, where Dagster's event storage shows
    tree, flat = ((out / "profiles" / name).read_text() for name in ("full_year.txt", "full_year.flat.txt"))
    assert "run_range" in tree and "store_event" in tree and "SqliteEventLogStorage.store_event" in flat
    assert "dbt_daily" in (out / "profiles" / "one_day.txt").read_text()
    assert not (tmp_path / "work" / "pipeline-1x").exists()


@pytest.mark.unit
def test_bench_refuses_an_unknown_figure(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(["--only", "speed", "--workdir", str(tmp_path)])
