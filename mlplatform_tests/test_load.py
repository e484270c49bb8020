"""Loading landing files into raw and quarantine, on real days in a real DuckDB."""

from __future__ import annotations

import pandas as pd
import pytest

from mlplatform.ingest import checks
from mlplatform.ingest.contracts import AIRLINES, FLIGHTS, PLANES, WEATHER
from mlplatform.ingest.landing import MissingLandingFile, deliver_together
from mlplatform.ingest.load import RejectedFiles, load
from mlplatform_tests.conftest import D, source_rows

LANE = "unit"

DAYS = [D(2013, 1, 1), D(2013, 1, 2), D(2013, 1, 3)]


def raw_content(conn, table="raw.flights"):
    return conn.execute(f"SELECT * EXCLUDE (_ingested_at) FROM {table} ORDER BY ALL").df()


def test_real_days_load_exactly_the_source_rows(home, warehouse):
    results = load(warehouse, FLIGHTS, home.landing, DAYS)
    for day, result in zip(DAYS, results):
        expected = source_rows("flights", day)
        assert (result.day, result.loaded, result.quarantined) == (day, len(expected), 0)
        got = warehouse.execute(
            "SELECT carrier, flight, origin, sched_dep_time, arr_delay FROM raw.flights "
            "WHERE _partition_date = ? ORDER BY ALL", [day]
        ).df()
        want = expected[["carrier", "flight", "origin", "sched_dep_time", "arr_delay"]].sort_values(
            ["carrier", "flight", "origin", "sched_dep_time", "arr_delay"]).reset_index(drop=True)
        assert got["flight"].tolist() == want["flight"].tolist()
        assert got["arr_delay"].fillna(-9999).tolist() == want["arr_delay"].fillna(-9999).tolist()


def test_reloading_replaces_the_partition(home, warehouse):
    load(warehouse, FLIGHTS, home.landing, DAYS)
    first = raw_content(warehouse)
    load(warehouse, FLIGHTS, home.landing, DAYS[1:2])
    load(warehouse, FLIGHTS, home.landing, DAYS)
    again = raw_content(warehouse)
    pd.testing.assert_frame_equal(first, again)
    assert checks.key_unique(warehouse, FLIGHTS, DAYS[0], DAYS[-1]).passed


def test_real_wind_outlier_is_quarantined_with_reason(home, warehouse):
    (result,) = load(warehouse, WEATHER, home.landing, [D(2013, 2, 12)])
    assert (result.loaded, result.quarantined, result.by_rule) == (71, 1, {"range_wind_speed": 1})
    rule, reason, source_row = warehouse.execute(
        "SELECT _rule, _reason, _source_row FROM quarantine.weather"
    ).fetchone()
    assert rule == "range_wind_speed" and "1048.36" in reason and source_row > 1


def test_dst_repeated_local_hour_keeps_both_readings(home, warehouse):
    """01:00 local on 2013-11-03 occurs twice; the UTC time_hour tells them apart."""
    (result,) = load(warehouse, WEATHER, home.landing, [D(2013, 11, 3)])
    assert result.quarantined == 0 and result.loaded == len(source_rows("weather", D(2013, 11, 3)))
    rows = warehouse.execute(
        "SELECT origin, time_hour FROM raw.weather WHERE hour = 1 ORDER BY origin, time_hour"
    ).fetchall()
    assert [(o, t.hour) for o, t in rows] == [(o, h) for o in ("EWR", "JFK", "LGA") for h in (5, 6)]
    assert checks.key_unique(warehouse, WEATHER, D(2013, 11, 3), D(2013, 11, 3)).passed


def test_missing_weather_day_is_an_empty_delivery_and_the_count_check_warns(home, warehouse):
    results = load(warehouse, WEATHER, home.landing, [D(2013, 12, 30), D(2013, 12, 31)])
    assert [r.missing for r in results] == [False, True]
    outcome = checks.row_count_sane(warehouse, WEATHER, D(2013, 12, 30), D(2013, 12, 31))
    assert not outcome.passed and "2013-12-31: no rows" in outcome.description


def test_missing_flights_day_is_a_clear_failure(home, warehouse):
    (home.landing / "flights" / "2013-01-02.csv").unlink()
    with pytest.raises(RejectedFiles) as info:
        load(warehouse, FLIGHTS, home.landing, DAYS)
    assert isinstance(info.value.errors[0], MissingLandingFile)
    assert "no landing file for flights for 2013-01-02" in str(info.value)
    assert "flights/2013-01-02.csv" in str(info.value)


def corrupt(path, line_no: int, column: str, value: str) -> None:
    """Set one field of a landing CSV (line numbers as in the file, header = 1)."""
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[line_no - 1].split(",")
    fields[header.index(column)] = value
    lines[line_no - 1] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")


def test_every_source_row_ends_in_raw_or_quarantine_never_both(home, warehouse):
    day = D(2013, 1, 2)
    path = home.landing / "flights" / f"{day}.csv"
    lines = path.read_text().splitlines()
    # a repeat of line 6 (duplicate key), appended at the end
    path.write_text("\n".join(lines + [lines[5]]) + "\n")
    corrupt(path, 3, "dep_delay", "99999")        # out of range
    corrupt(path, 4, "day", "3")                   # belongs to another day
    corrupt(path, 5, "carrier", "")                # key column null
    corrupt(path, 7, "origin", "ewr")              # bad format
    corrupt(path, 8, "sched_dep_time", "1275")     # not an HHMM time
    corrupt(path, 9, "time_hour", "2013-01-02T23:00:00Z")  # not the row's local hour
    total = len(path.read_text().splitlines()) - 1

    (result,) = load(warehouse, FLIGHTS, home.landing, [day])
    assert result.rows == total
    assert result.by_rule == {
        "range_dep_delay": 1, "wrong_partition": 1, "key_not_null": 1, "format_origin": 1,
        "schedule_matches_hour": 1, "local_time_hour": 1, "duplicate_key": 1,
    }
    raw = {r for (r,) in warehouse.execute("SELECT _source_row FROM raw.flights").fetchall()}
    quarantined = dict(warehouse.execute("SELECT _source_row, _rule FROM quarantine.flights").fetchall())
    assert raw.isdisjoint(quarantined)
    assert raw | set(quarantined) == set(range(2, total + 2))
    assert quarantined[total + 1] == "duplicate_key"   # the repeat, not the first occurrence
    reason = warehouse.execute("SELECT _reason FROM quarantine.flights WHERE _rule='duplicate_key'").fetchone()[0]
    assert "repeats the row at line 6" in reason
    # re-loading the same day does not duplicate anything in either table
    load(warehouse, FLIGHTS, home.landing, [day])
    assert warehouse.execute("SELECT count(*) FROM quarantine.flights").fetchone()[0] == 7
    assert warehouse.execute("SELECT count(*) FROM raw.flights").fetchone()[0] == total - 7
    assert checks.rules_hold(warehouse, FLIGHTS, day, day).passed


def test_one_unreadable_file_rejects_the_run_and_writes_nothing(home, warehouse):
    load(warehouse, FLIGHTS, home.landing, DAYS)
    before = raw_content(warehouse)
    bad = home.landing / "flights" / "2013-01-03.csv"
    corrupt(bad, 10, "dep_delay", "late")
    (home.landing / "flights" / "2013-01-01.csv").write_text("")
    with pytest.raises(RejectedFiles) as info:
        load(warehouse, FLIGHTS, home.landing, DAYS)
    message = str(info.value)
    assert "2 landing file(s) rejected" in message
    assert "2013-01-01.csv, line 1: file is empty" in message
    assert "2013-01-03.csv, line 10, column 'dep_delay': 'late' is not a number" in message
    pd.testing.assert_frame_equal(before, raw_content(warehouse))
    assert bad.exists()  # rejected files stay in the landing zone


def test_csv_and_parquet_for_the_same_day_is_ambiguous(home, warehouse):
    day = DAYS[0]
    pd.read_csv(home.landing / "flights" / f"{day}.csv").to_parquet(home.landing / "flights" / f"{day}.parquet")
    with pytest.raises(RejectedFiles, match="ambiguous"):
        load(warehouse, FLIGHTS, home.landing, [day])
    (home.landing / "flights" / f"{day}.csv").unlink()
    (result,) = load(warehouse, FLIGHTS, home.landing, [day])
    assert result.loaded == len(source_rows("flights", day))


def test_reference_snapshots_replace_whole_tables(home, warehouse):
    for _ in range(2):
        (airlines,) = load(warehouse, AIRLINES, home.landing)
        (planes,) = load(warehouse, PLANES, home.landing)
    assert airlines.loaded == 16 and planes.loaded == 3322
    assert warehouse.execute("SELECT count(*) FROM raw.airlines").fetchone()[0] == 16


def test_checks_fail_on_bad_raw_tables(home, warehouse):
    load(warehouse, FLIGHTS, home.landing, DAYS)
    start, end = DAYS[0], DAYS[-1]
    # a row appended behind the loader's back: duplicate key
    warehouse.execute("INSERT INTO raw.flights SELECT * FROM raw.flights LIMIT 1")
    assert not checks.key_unique(warehouse, FLIGHTS, start, end).passed
    # a value no rule allows, and a row in the wrong partition
    warehouse.execute("UPDATE raw.flights SET distance = -5, day = 9 WHERE flight = 1545 AND _partition_date = ?", [start])
    assert not checks.rules_hold(warehouse, FLIGHTS, start, end).passed
    assert not checks.rows_in_partition(warehouse, FLIGHTS, start, end).passed
    # the schema drifting from the contract
    warehouse.execute("ALTER TABLE raw.flights ALTER dep_delay TYPE VARCHAR")
    outcome = checks.schema_matches(warehouse, FLIGHTS)
    assert not outcome.passed and "dep_delay: VARCHAR instead of DOUBLE" in outcome.description


def test_null_spike_and_quarantine_share(home, warehouse):
    load(warehouse, FLIGHTS, home.landing, [D(2013, 1, d) for d in range(1, 12)])
    day = D(2013, 1, 11)
    assert checks.null_rate_spike(warehouse, FLIGHTS, day, day).passed
    assert checks.nulls_explained(warehouse, FLIGHTS, day, day).passed
    warehouse.execute("UPDATE raw.flights SET tailnum = NULL WHERE _partition_date = ?", [day])
    outcome = checks.null_rate_spike(warehouse, FLIGHTS, day, day)
    assert not outcome.passed and "2013-01-11 tailnum: 100% null" in outcome.description
    # tailnum is missing only on cancelled flights: on flights that departed, the day is blocked
    outcome = checks.nulls_explained(warehouse, FLIGHTS, day, day)
    assert not outcome.passed and "2013-01-11 tailnum: 100% null vs 0% trailing" in outcome.description
    assert checks.quarantine_share(warehouse, FLIGHTS, day, day, 0.05).passed
    warehouse.execute(
        "INSERT INTO quarantine.flights SELECT *, 'x', 'y' FROM raw.flights WHERE _partition_date = ? LIMIT 100", [day]
    )
    outcome = checks.quarantine_share(warehouse, FLIGHTS, day, day, 0.05)
    assert not outcome.passed and outcome.metadata["days_over_limit"] == ["2013-01-11"]


def test_a_delivery_of_several_files_writes_them_whole_and_skips_unchanged_ones(tmp_path):
    one, two = pd.DataFrame({"a": [1, 2]}), pd.DataFrame({"a": [3]})
    paths = [tmp_path / "flights" / "2013-02-07.csv", tmp_path / "weather" / "2013-02-07.csv"]
    assert deliver_together(list(zip([one, two], paths))) == paths
    assert [pd.read_csv(p)["a"].tolist() for p in paths] == [[1, 2], [3]]
    assert deliver_together([(one, paths[0]), (one, paths[1])]) == [paths[1]]  # the first is unchanged
    assert deliver_together([(two, paths[0])], overwrite=False) == []
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["2013-02-07.csv", "2013-02-07.csv", "flights", "weather"]
