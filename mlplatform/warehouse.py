"""Small helpers over the DuckDB warehouse shared by the asset layers."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Iterable

from dagster import MetadataValue, TableColumn, TableSchema

from mlplatform import lake

if TYPE_CHECKING:
    import duckdb


def column_schema(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> TableSchema:
    rows = conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
        [schema, table],
    ).fetchall()
    return TableSchema(columns=[TableColumn(name, kind) for name, kind in rows])


def table_metadata(conn: duckdb.DuckDBPyConnection, schema: str, table: str, rows: int) -> dict:
    """Dagster's standard table metadata: name, column schema and the rows this run wrote."""
    return {
        "dagster/table_name": f"warehouse.{schema}.{table}",
        "dagster/column_schema": column_schema(conn, schema, table),
        "dagster/row_count": MetadataValue.int(rows),
    }


# Where writes are staged before they replace a window of days in one transaction (see replace_window).
STAGING_SCHEMA = "_loading"
# How long a connection waits for another process's lock on the warehouse (DuckDB has one writer
# at a time; a backfill hands the lock from one run to the next).
LOCK_WAIT_SECONDS = 600.0


def has_table(conn: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    """Whether ``schema.table`` exists (a table or a view)."""
    return conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                        [schema, table]).fetchone()[0] > 0


def is_locked(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is another process holding DuckDB's file lock."""
    import duckdb

    while exc is not None:
        if isinstance(exc, duckdb.IOException) and "lock" in str(exc).lower():
            return True
        exc = exc.__cause__
    return False


def retry_while_locked(fn, max_wait: float = LOCK_WAIT_SECONDS):
    """``fn()``, again with backoff (0.1 s doubling to 5 s) while another process holds the
    warehouse's lock, for at most ``max_wait`` seconds: the one retry policy of every connection
    to the warehouse (the resources, the sensors, the serving snapshot)."""
    delay, waited = 0.1, 0.0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - anything but a lock is raised at once
            if not is_locked(exc) or waited >= max_wait:
                raise
        time.sleep(delay)
        waited += delay
        delay = min(delay * 2, 5.0)


def connect(path, read_only: bool = False, max_wait: float = LOCK_WAIT_SECONDS, config: dict | None = None):
    """A DuckDB connection to the warehouse, waiting out another process's lock. A file written
    by a newer DuckDB (mlplatform used duckdb 2.0 before it pinned 1.5.5 for DuckLake) is an
    error that names it and says how to rebuild it."""
    import duckdb

    if lake.is_lake(path):  # no file lock: DuckLake's commits are optimistic (see in_one_transaction)
        return lake.connect_lake(str(path)[len(lake.LAKE_PREFIX):], config=config)
    try:
        return retry_while_locked(lambda: duckdb.connect(str(path), read_only=read_only, config=config or {}),
                                  max_wait)
    except duckdb.IOException as exc:
        if "newer version of DuckDB" not in str(exc):
            raise
        raise RuntimeError(
            f"{path} was written by a newer DuckDB than this environment's {duckdb.__version__}, which cannot read "
            "it (mlplatform pins duckdb 1.5.5, the newest with the DuckLake extension's wheel). The landing zone is "
            "the system of record: move the file aside and rebuild it with `mlplatform run --start FIRST_DAY --end "
            "LAST_DAY --full-refresh`."
        ) from exc


def on_lake(conn: duckdb.DuckDBPyConnection) -> bool:
    """Whether this connection's warehouse is a DuckLake (no keys, optimistic commits)."""
    kind = conn.execute("SELECT type FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return bool(kind) and kind[0] == "ducklake"


def staging_schema(conn: duckdb.DuckDBPyConnection) -> str:
    """Where this connection stages writes: ``_loading`` in the warehouse file, or in the
    connection's own memory when the warehouse is a DuckLake (a staging table there would be
    Parquet files and catalog rows, shared by every worker staging the same table)."""
    return f"memory.{STAGING_SCHEMA}" if on_lake(conn) else STAGING_SCHEMA


@contextlib.contextmanager
def staging_table(conn: duckdb.DuckDBPyConnection, name: str, ddl):
    """``<staging schema>.<name>`` made by ``ddl(schema)`` (a ``CREATE TABLE`` of that name in
    that schema), outside any transaction, and dropped on the way out, also when a run is killed
    (the next one replaces it). Writes go there first, then into their table in one transaction
    (``in_one_transaction``): DuckDB holds a transaction's small appends in memory until it
    commits (1.5 GB for a year of predictions in the 10x benchmark), not one large insert."""
    schema = staging_schema(conn)
    staging = f"{schema}.{name}"
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    conn.execute(f"DROP TABLE IF EXISTS {staging}")
    conn.execute(ddl(schema))
    try:
        yield staging
    finally:
        conn.execute(f"DROP TABLE IF EXISTS {staging}")


# How long a write refused by DuckLake as a conflict (another worker committed to the same table
# first) is tried again, with backoff, before the step fails
CONFLICT_WAIT_SECONDS = 120.0


def retry_on_conflict(fn, max_wait: float = CONFLICT_WAIT_SECONDS):
    """``fn()``, again with backoff (0.05 s doubling to 2 s, jittered) while DuckLake refuses its
    commit as a conflict (``lake.is_conflict``: the transaction was rolled back whole, so running
    it again is safe). On a DuckDB file there are no conflicts: ``fn()`` once."""
    import random

    delay, waited = 0.05, 0.0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - anything but a conflict is raised at once
            if not lake.is_conflict(exc) or waited >= max_wait:
                raise
        pause = delay * random.uniform(0.5, 1.5)
        time.sleep(pause)
        waited += pause
        delay = min(delay * 2, 2.0)


def create_tables(conn: duckdb.DuckDBPyConnection, ddl: str) -> None:
    """Run ``CREATE SCHEMA/TABLE IF NOT EXISTS`` statements: on a DuckLake two workers creating
    the same table at once conflict, and the second finds it made when it tries again."""
    retry_on_conflict(lambda: conn.execute(ddl))


def in_one_transaction(conn: duckdb.DuckDBPyConnection, statements, before_commit=None) -> list:
    """``statements`` (SQL, or (SQL, parameters)) in one transaction: all of them or none, run
    again whole when a DuckLake refuses the commit as a conflict (``retry_on_conflict``).
    ``before_commit`` runs inside it, after every write (fault injection for the crash tests).
    Returns what each statement answered first (an INSERT's or DELETE's row count)."""
    statements = list(statements)

    def attempt() -> list:
        conn.execute("BEGIN TRANSACTION")
        try:
            answers = []
            for statement in statements:
                sql, params = (statement, None) if isinstance(statement, str) else statement
                cursor = conn.execute(sql, params) if params is not None else conn.execute(sql)
                first = cursor.fetchone() if cursor.description else None
                answers.append(first[0] if first else None)
            if before_commit:
                before_commit()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):  # a refused COMMIT has already rolled back
                conn.execute("ROLLBACK")
            raise
        return answers

    return retry_on_conflict(attempt)


def replace_window(conn: duckdb.DuckDBPyConnection, table: str, date_column: str, start, end,
                   batches: Iterable, before_commit=None) -> int:
    """Replace the rows of ``table`` (``schema.name``) dated start..end with ``batches``, data
    frames with the table's columns (any subset), in one transaction; returns the rows written
    (staged first: ``staging_table``)."""
    name = table.split(".")[-1]
    rows = 0
    with staging_table(conn, name, lambda schema: f"CREATE TABLE {schema}.{name} AS SELECT * FROM {table} LIMIT 0") \
            as staging:
        for batch in batches:
            if len(batch):
                columns = ", ".join(f'"{c}"' for c in batch.columns)
                conn.register("batch", batch)
                conn.execute(f"INSERT INTO {staging} ({columns}) SELECT {columns} FROM batch")
                conn.unregister("batch")
                rows += len(batch)
        in_one_transaction(conn, [
            (f"DELETE FROM {table} WHERE {date_column} BETWEEN ? AND ?", [start, end]),
            f"INSERT INTO {table} SELECT * FROM {staging}",
        ], before_commit)
    return rows
