"""Online features: the dbt macro that builds ``features.flight_features``, run on request.

``compile_online_features`` compiles ``dbt_project/analyses/online_features.sql`` (the
``flight_features()`` macro applied to a table ``online_requests``) with dbt itself, so the SQL
the server runs is the SQL of the offline feature table, not a copy. ``Snapshot`` copies the
tables that SQL reads from the warehouse into an in-memory DuckDB database: requests never
wait for a pipeline run holding the warehouse's write lock. Taking a snapshot holds a read lock
for the copy (about 0.1 s for the year), which writers wait out (DuckDBResource and the dbt
profile retry the connection).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from mlplatform import keys, lake
from mlplatform.settings import DBT_PROJECT_DIR, LAKE_TARGET, Settings, dbt_executable, dbt_variables
from mlplatform.sql import sql_literal

ANALYSIS = "online_features"
INTRADAY_ANALYSIS = "online_intraday_features"  # the rt_ features alone, as the stream moves them
REQUESTS_TABLE = "online_requests"
EVENTS_RELATION = "stg_departure_events"  # the streamed departures, which the server also tails live
# what a client tells us about a flight; the last two are looked up in the schedule when absent
REQUEST_COLUMNS = [
    "flight_date", "carrier", "flight_number", "origin", "dest", "sched_dep_time", "tailnum",
    "sched_arr_time", "distance_miles",
]


class WarehouseUnavailable(RuntimeError):
    """The warehouse cannot be read: missing, not built yet, or locked by a writer."""


@dataclass(frozen=True)
class Relation:
    database: str
    schema: str
    name: str

    @property
    def sql(self) -> str:
        return f'"{self.database}"."{self.schema}"."{self.name}"'


@dataclass(frozen=True)
class CompiledFeatures:
    sql: str
    relations: tuple[Relation, ...]  # the warehouse tables the SQL reads
    intraday_sql: str  # the same macro's rt_ features alone (flight_id, prediction_time, rt_...)


# dbt target paths of the online-feature compile, within a home: the server's and the skew
# check's (apart, so that the two never write one manifest at the same time)
SERVING_TARGET = Path("serving") / "dbt-target"
SKEW_CHECK_TARGET = Path("dbt") / "online-check-target"


def compile_online_features(settings: Settings, target_dir: Path) -> CompiledFeatures:
    """Compile the online-features analyses with dbt (about 3 s; needs no warehouse connection).

    ``target_dir`` is dbt's target path for this compile: keep it apart from the one Dagster's
    dbt runs use, so the two never write one manifest at the same time. A compile is reused
    while no dbt project file changed and the warehouse path is the same."""
    manifest_path = target_dir / "manifest.json"
    sql_path = target_dir / "compiled" / "mlplatform" / "analyses" / f"{ANALYSIS}.sql"
    intraday_path = sql_path.with_name(f"{INTRADAY_ANALYSIS}.sql")
    stamp = target_dir / f"{ANALYSIS}.warehouse"
    newest = max(
        p.stat().st_mtime for p in DBT_PROJECT_DIR.rglob("*")
        if p.suffix in {".sql", ".yml", ".yaml", ".csv"} and "target" not in p.parts and "logs" not in p.parts
    )
    fresh = (
        sql_path.exists() and intraday_path.exists() and manifest_path.exists() and stamp.exists()
        and stamp.read_text() == settings.database
        and min(p.stat().st_mtime for p in (sql_path, intraday_path, manifest_path)) > newest
    )
    if not fresh:
        env = {
            **os.environ,
            **settings.as_env(),
            **dbt_variables(settings.database, settings.duckdb_memory_limit),
            "DBT_TARGET_PATH": str(target_dir),
            "DBT_LOG_PATH": str(target_dir / "logs"),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        command = [dbt_executable(), "compile", "--select", ANALYSIS, INTRADAY_ANALYSIS, "--no-populate-cache",
                   "--quiet", *(["--target", LAKE_TARGET] if settings.lake_catalog else [])]
        done = subprocess.run(command, cwd=DBT_PROJECT_DIR, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"dbt compile of {ANALYSIS} failed:\n{done.stdout}\n{done.stderr}")
        stamp.write_text(settings.database)
    manifest = json.loads(manifest_path.read_text())
    node = manifest["nodes"][f"analysis.mlplatform.{ANALYSIS}"]
    relations = []
    for unique_id in node["depends_on"]["nodes"]:
        dep = manifest["nodes"][unique_id]
        relations.append(Relation(dep["database"], dep["schema"], dep.get("alias") or dep["name"]))
    return CompiledFeatures(sql=sql_path.read_text(), relations=tuple(relations),
                            intraday_sql=intraday_path.read_text())


def requests_frame(flights: list[dict], as_of: dt.datetime | None = None,
                   stream_clock: dt.datetime | None = None) -> pd.DataFrame:
    """The ``online_requests`` table for a list of flights (dicts of REQUEST_COLUMNS). Rows are
    identified by their position: a batch may ask about one flight twice. ``as_of`` (naive UTC)
    is the instant the intraday features are asked for; without it they are as of the earlier of
    ``stream_clock`` (the latest event time seen) and each flight's prediction time
    (``macros/flight_features.sql``)."""
    frame = pd.DataFrame.from_records(flights, columns=REQUEST_COLUMNS)
    frame.insert(0, "flight_id", [str(i) for i in range(len(frame))])
    frame["flight_date"] = pd.to_datetime(frame["flight_date"]).dt.date
    for column in ("flight_number", "sched_dep_time", "sched_arr_time"):
        frame[column] = pd.array(frame[column], dtype="Int64")
    frame["distance_miles"] = pd.to_numeric(frame["distance_miles"], errors="coerce").astype("float64")
    for column in ("carrier", "origin", "dest", "tailnum"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    frame["as_of"] = pd.Series([as_of] * len(frame), dtype="datetime64[us]")
    frame["stream_clock"] = pd.Series([stream_clock] * len(frame), dtype="datetime64[us]")
    return frame


def compute_features(conn: duckdb.DuckDBPyConnection, sql: str, requests: pd.DataFrame) -> pd.DataFrame:
    """Run the compiled feature SQL for ``requests`` on ``conn``; rows in the requests' order."""
    conn.register(REQUESTS_TABLE, requests)
    try:
        out = conn.execute(sql).df()
    finally:
        conn.unregister(REQUESTS_TABLE)
    return out.set_index(out["flight_id"].astype(int)).sort_index().reset_index(drop=True)


def flight_id(flight: dict) -> str:
    """The warehouse's flight_id (stg_flights): '<date>_<carrier><number>_<origin>_<HHMM>'."""
    return keys.flight_id(flight["flight_date"], flight["carrier"], flight["flight_number"], flight["origin"],
                          flight["sched_dep_time"])


@dataclass(frozen=True)
class Streamed:
    """Departures the stream added to a snapshot: their event times and local days."""

    since: dt.datetime
    until: dt.datetime
    days: frozenset[dt.date]

    def __or__(self, other: "Streamed") -> "Streamed":
        return Streamed(min(self.since, other.since), max(self.until, other.until), self.days | other.days)


@dataclass
class Snapshot:
    """An in-memory copy of the tables the feature SQL reads, and what a request is checked against."""

    conn: duckdb.DuckDBPyConnection
    loaded_at: dt.datetime
    source_mtime: float
    carriers: frozenset[str]
    origins: frozenset[str]
    airports: frozenset[str]
    first_flight_date: dt.date | None
    last_flight_date: dt.date | None
    holidays: tuple[dt.date | None, dt.date | None]  # the holiday calendar's first and last day
    events: Relation | None = None  # the streamed departures the rt_ features read
    events_clock: dt.datetime | None = None  # the latest event time among them at load
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def served_dates(self) -> tuple[dt.date, dt.date] | None:
        """The flight dates the server predicts for: from the warehouse's first day of flights to
        the end of its holiday calendar (``days_to_holiday`` is computed from the calendar, so past
        it that feature would be wrong, not just missing), or to its last day of flights if that is
        later. None while the warehouse has no flights."""
        if self.first_flight_date is None:
            return None
        return self.first_flight_date, max(self.holidays[1] or self.last_flight_date, self.last_flight_date)

    def features(self, sql: str, requests: pd.DataFrame) -> pd.DataFrame:
        with self.lock:  # one DuckDB connection: one query at a time
            return compute_features(self.conn, sql, requests)

    def add_events(self, departures: pd.DataFrame) -> Streamed | None:
        """Streamed departures (``stg_departure_events``' columns) that reached the server after
        the warehouse copy: added to the snapshot's copy, each event once. Returns what the new
        ones span (the scheduled flights whose rt_ features they move are found from it), or
        None when every one was there already."""
        if self.events is None or not len(departures):
            return None
        with self.lock:
            self.conn.register("arrived", departures)
            try:
                new = (f"SELECT * FROM arrived a WHERE NOT EXISTS "
                       f"(SELECT 1 FROM {self.events.sql} e WHERE e.event_id = a.event_id) "
                       f"QUALIFY row_number() OVER (PARTITION BY a.event_id ORDER BY a.event_time) = 1")
                earliest, latest, days, n = self.conn.execute(
                    f"SELECT min(event_time), max(event_time), list(DISTINCT flight_date), count(*) FROM ({new})"
                ).fetchall()[0]
                if not n:
                    return None
                self.conn.execute(f"INSERT INTO {self.events.sql} BY NAME {new}")
                return Streamed(earliest, latest, frozenset(days))
            finally:
                self.conn.unregister("arrived")

    @classmethod
    def load(cls, warehouse, relations: tuple[Relation, ...]) -> "Snapshot":
        """A copy of ``relations`` from ``warehouse`` (``Settings.database``: a DuckDB file, or a
        DuckLake, read at its current snapshot)."""
        if not lake.is_lake(warehouse) and not Path(warehouse).exists():
            raise WarehouseUnavailable(f"warehouse not found: {warehouse} (run the pipeline first: make run)")
        conn, mtime = _attached(warehouse)
        conn.execute("SET TimeZone = 'UTC'")
        try:
            for database in sorted({r.database for r in relations}):
                conn.execute(f'ATTACH IF NOT EXISTS \':memory:\' AS "{database}"')
            for r in relations:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{r.database}"."{r.schema}"')
                try:
                    conn.execute(f'CREATE TABLE {r.sql} AS SELECT * FROM __warehouse__."{r.schema}"."{r.name}"')
                except duckdb.CatalogException as exc:
                    raise WarehouseUnavailable(
                        f"warehouse {warehouse} has no table {r.schema}.{r.name}: materialize the pipeline first"
                    ) from exc
            tables = {r.name: r for r in relations}
            carriers = _values(conn, f"SELECT carrier FROM {tables['stg_airlines'].sql}")
            origins = _values(conn, f"SELECT DISTINCT origin FROM {tables['stg_flights'].sql}")
            airports = _values(conn, f"SELECT faa FROM {tables['stg_airports'].sql}") | _values(
                conn, f"SELECT DISTINCT dest FROM {tables['stg_flights'].sql}"
            )
            holidays = conn.execute(
                f"SELECT min(holiday_date), max(holiday_date) FROM {tables['us_federal_holidays'].sql}"
            ).fetchone()
            first, last = conn.execute(
                f"SELECT min(flight_date), max(flight_date) FROM {tables['stg_flights'].sql}"
            ).fetchone()
            events = tables.get(EVENTS_RELATION)
            events_clock = conn.execute(f"SELECT max(event_time) FROM {events.sql}").fetchall()[0][0] if events else None
        finally:
            conn.execute("DETACH __warehouse__")
        return cls(conn, dt.datetime.now(dt.timezone.utc), mtime, frozenset(carriers), frozenset(origins),
                   frozenset(airports), first, last, holidays, events, events_clock)

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def _values(conn, sql: str) -> set[str]:
    return {row[0] for row in conn.execute(sql).fetchall() if row[0] is not None}


def _attached(warehouse) -> tuple:
    """A new in-memory DuckDB with ``warehouse`` attached read-only as ``__warehouse__``, and
    what ``changed_at`` answers for the state attached."""
    if lake.is_lake(warehouse):
        conn = duckdb.connect(config=lake.extension_config(lake.install_extensions(lake.EXTENSION_DIR)))
    else:
        mtime = changed_at(warehouse)
        conn = duckdb.connect()
    try:
        conn.execute(f"ATTACH {sql_literal(warehouse)} AS __warehouse__ (READ_ONLY)")
        if lake.is_lake(warehouse):
            mtime = float(conn.execute("FROM ducklake_current_snapshot('__warehouse__')").fetchone()[0])
    except duckdb.Error as exc:
        conn.close()
        if "lock" in str(exc).lower():
            raise WarehouseUnavailable(f"warehouse busy: a writer holds {warehouse}; retrying ({exc})") from exc
        raise WarehouseUnavailable(f"warehouse unreadable: {warehouse} ({exc})") from exc
    return conn, mtime


def changed_at(warehouse) -> float:
    """Changes whenever the warehouse does: the file, or its write-ahead log; a DuckLake's
    current snapshot id."""
    if lake.is_lake(warehouse):
        conn, version = _attached(warehouse)
        conn.close()
        return version
    warehouse = Path(warehouse)
    wal = warehouse.with_name(warehouse.name + ".wal")
    return max(p.stat().st_mtime for p in (warehouse, wal) if p.exists())
