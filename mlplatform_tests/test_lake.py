"""The DuckLake warehouse of the distributed profile (issue 18): its DuckDB extensions come from
the locked wheels and are never downloaded, a window of days is replaced in one snapshot, and two
writers of one table never both commit."""

from __future__ import annotations

import datetime as dt

import duckdb
import pandas as pd
import psycopg2
import pytest

from mlplatform import lake
from mlplatform.sql import sql_literal
from mlplatform_tests.conftest import WORLD_DAYS

LANE = "integration"

D = dt.date


def test_the_extensions_come_from_the_wheels_and_are_never_downloaded(tmp_path):
    directory = lake.install_extensions(tmp_path / "ext")
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.duckdb_extension"))
    version = f"v{duckdb.__version__}"
    assert files == [f"{version}/{lake.platform()}/{name}.duckdb_extension"
                     for name in ("ducklake", "httpfs", "postgres_scanner")]
    assert lake.install_extensions(tmp_path / "ext") == directory  # again: nothing to do
    with duckdb.connect(config=lake.extension_config(directory)) as conn:
        conn.execute("LOAD ducklake")
        conn.execute("LOAD postgres")
        conn.execute("LOAD httpfs")
        loaded = dict(conn.execute("SELECT extension_name, install_path FROM duckdb_extensions() WHERE loaded "
                                   "AND extension_name IN ('ducklake', 'postgres_scanner', 'httpfs')").fetchall())
    assert set(loaded) == {"ducklake", "postgres_scanner", "httpfs"}
    assert all(path.startswith(str(directory)) for path in loaded.values()), loaded
    # where the files are not, autoinstall is off: an error that says so, never a download
    with duckdb.connect(config=lake.extension_config(tmp_path / "empty")) as conn:
        with pytest.raises(duckdb.IOException, match=r"ducklake\.duckdb_extension\" not found"):
            conn.execute("LOAD ducklake")


def test_a_window_is_replaced_in_one_snapshot_and_what_ducklake_refuses(tmp_path):
    """On a DuckLake (a DuckDB file as its catalog here), the platform's window replacement (delete
    the days, insert them again, one transaction) is one snapshot: a reader of the previous
    snapshot sees the old rows, never half of each. Constraints and INSERT OR IGNORE do not exist."""
    conn = lake.connect_lake(str(tmp_path / "catalog.ducklake"), tmp_path / "data", tmp_path / "ext")
    with conn:
        conn.execute("CREATE TABLE flights (flight_date DATE NOT NULL, flight_id VARCHAR, delay INTEGER)")
        conn.execute("INSERT INTO flights VALUES ('2013-01-01', 'a', 1), ('2013-01-01', 'b', 2), ('2013-01-02', 'c', 3)")
        before = conn.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0]
        conn.execute("BEGIN")
        conn.execute("DELETE FROM flights WHERE flight_date BETWEEN ? AND ?", [D(2013, 1, 1), D(2013, 1, 1)])
        conn.execute("INSERT INTO flights VALUES ('2013-01-01', 'a', 10)")
        conn.execute("COMMIT")
        after = conn.execute("SELECT max(snapshot_id) FROM ducklake_snapshots('lake')").fetchone()[0]
        assert after == before + 1
        assert conn.execute("SELECT flight_id, delay FROM flights ORDER BY 1").fetchall() == [("a", 10), ("c", 3)]
        old = conn.execute(f"SELECT flight_id, delay FROM flights AT (VERSION => {before}) ORDER BY 1").fetchall()
        assert old == [("a", 1), ("b", 2), ("c", 3)]
        # the data are Parquet files under the data path (small inserts may be inlined in the catalog first)
        conn.execute("CALL ducklake_flush_inlined_data('lake')")
        assert list((tmp_path / "data").rglob("*.parquet"))
        with pytest.raises(duckdb.Error, match="PRIMARY KEY/UNIQUE constraints are not supported"):
            conn.execute("CREATE TABLE keyed (id INTEGER PRIMARY KEY)")
        with pytest.raises(duckdb.BinderException, match="no UNIQUE/PRIMARY KEY constraints"):
            conn.execute("INSERT OR IGNORE INTO flights VALUES ('2013-01-02', 'c', 3)")


@pytest.mark.system
@pytest.mark.parametrize("days", [(D(2013, 1, 1), D(2013, 1, 1)), (D(2013, 1, 1), D(2013, 1, 2))],
                         ids=["same-partition", "different-partitions"])
def test_two_writers_of_one_table_never_both_commit(postgres, tmp_path, days):
    """Two writers (two DuckDB instances, as on two workers) replacing a day of the same table at
    once, on a DuckLake whose catalog is a real PostgreSQL: the second COMMIT is refused as a conflict (whichever days it
    wrote) and its transaction rolled back whole; done again, it commits. Each day ends with the
    rows of exactly one writer, once."""
    url = postgres.replace("postgresql+psycopg2://", "postgresql://")
    pg = psycopg2.connect(url)
    pg.autocommit = True  # (CREATE DATABASE runs outside a transaction)
    pg.cursor().execute("CREATE DATABASE lake")
    pg.close()
    host, port = url.split("@")[1].split("/")[0].split(":")
    catalog = f"postgres:dbname=lake host={host} port={port} user=postgres"
    opened = [lake.connect_lake(catalog, tmp_path / "data", tmp_path / "ext") for _ in days]
    first, second = opened
    try:
        first.execute("CREATE TABLE flights (flight_date DATE, writer VARCHAR)")
        first.execute("INSERT INTO flights VALUES ('2013-01-01', 'history'), ('2013-01-02', 'history')")

        def replace(conn, day, writer):
            conn.execute("BEGIN")
            conn.execute("DELETE FROM flights WHERE flight_date = ?", [day])
            conn.execute("INSERT INTO flights SELECT ?::DATE, ? FROM range(3)", [day, writer])

        replace(first, days[0], "first")
        replace(second, days[1], "second")
        first.execute("COMMIT")
        with pytest.raises(duckdb.TransactionException) as refused:
            second.execute("COMMIT")
        assert lake.is_conflict(refused.value), refused.value
        # nothing of the refused transaction is visible
        rows = first.execute("SELECT flight_date, writer, count(*) FROM flights GROUP BY ALL ORDER BY ALL").fetchall()
        assert rows == [(D(2013, 1, 1), "first", 3), (D(2013, 1, 2), "history", 1)]
        # run again (what a retried step does), it commits
        replace(second, days[1], "second")
        second.execute("COMMIT")
        rows = first.execute("SELECT flight_date, writer, count(*) FROM flights GROUP BY ALL ORDER BY ALL").fetchall()
        if days[0] == days[1]:
            assert rows == [(D(2013, 1, 1), "second", 3), (D(2013, 1, 2), "history", 1)]
        else:
            assert rows == [(D(2013, 1, 1), "first", 3), (D(2013, 1, 2), "second", 3)]
    finally:
        for conn in opened:
            conn.close()


# The first 4 KiB (the main header) of an empty database written by duckdb 2.0.0, gzipped: what a
# warehouse from before the 1.5.5 pin looks like to this DuckDB.
DUCKDB_2_HEADER = ("H4sICCZNEmsCA3c1LmR1Y2tkYgD7rPLI3afi01+XUGfv58wMRIEyIz0DPQPc8immJslJSanGKWn4zQk43vU6dgqbU/TrWobHzv32DK"
                   "NgFIyCUTAKRsEoGAWjYBSMglEwCkbBKKAJAAB+eAVOABAAAA==")


@pytest.mark.unit
def test_a_warehouse_from_a_newer_duckdb_is_named_with_how_to_rebuild_it(tmp_path):
    import base64
    import gzip

    from mlplatform.warehouse import connect

    path = tmp_path / "warehouse.duckdb"
    path.write_bytes(gzip.decompress(base64.b64decode(DUCKDB_2_HEADER)))
    with pytest.raises(RuntimeError, match="newer DuckDB") as error:
        connect(path, read_only=True, max_wait=0)
    assert str(path) in str(error.value) and "--full-refresh" in str(error.value)


def test_dbt_builds_and_replaces_windows_on_a_ducklake(world, tmp_path):
    """dbt-duckdb's `lake` target (profiles.yml): the project's models built on a DuckLake (a
    DuckDB file as its catalog here) from the world's raw tables, every day of the world at once,
    then a window of three days again (the daily models' delete-and-insert): the features equal
    the embedded warehouse's, row for row, and no day is duplicated."""
    import os
    import subprocess

    from mlplatform.settings import DBT_PROJECT_DIR, dbt_executable
    from mlplatform.transform.assets import WINDOW_ENV

    catalog, data = tmp_path / "catalog.ducklake", tmp_path / "data"
    extensions = lake.install_extensions(tmp_path / "ext")
    embedded = world / "warehouse.duckdb"
    with lake.connect_lake(str(catalog), data, extensions) as conn:
        conn.execute(f"ATTACH {sql_literal(embedded)} AS embedded (READ_ONLY)")
        conn.execute("CREATE SCHEMA raw")
        for table in ("flights", "weather", "flight_events", "airlines", "airports", "planes"):
            conn.execute(f"CREATE TABLE raw.{table} AS SELECT * FROM embedded.raw.{table}")
    env = {**os.environ, "MLPLATFORM_LAKE_CATALOG": str(catalog), "MLPLATFORM_LAKE_DATA_PATH": str(data),
           "MLPLATFORM_DUCKDB_EXTENSIONS": str(extensions), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}

    def build(selection: str, window=None) -> None:
        variables = dict(zip(WINDOW_ENV, map(str, window))) if window else {}
        result = subprocess.run([dbt_executable(), "build", "--target", "lake", "--select", selection,
                                 "--target-path", str(tmp_path / "target"), "--log-path", str(tmp_path / "logs")],
                                cwd=DBT_PROJECT_DIR, env={**env, **variables}, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-4000:]

    build("tag:reference")
    build("tag:daily", WORLD_DAYS)
    build("tag:daily", (D(2013, 1, 20), D(2013, 1, 22)))

    query = "SELECT * FROM {}.features.flight_features ORDER BY flight_id"
    with lake.connect_lake(str(catalog), data, extensions) as conn:
        conn.execute(f"ATTACH {sql_literal(embedded)} AS embedded (READ_ONLY)")
        on_lake, on_file = conn.sql(query.format("lake")).df(), conn.sql(query.format("embedded")).df()
        duplicated = conn.execute("SELECT count(*) - count(DISTINCT flight_id) FROM lake.features.flight_features").fetchone()[0]
    assert len(on_lake) > 20_000 and duplicated == 0
    pd.testing.assert_frame_equal(on_lake, on_file)


def test_the_rollout_history_runs_on_a_ducklake_and_two_moves_never_both_commit(tmp_path):
    """The staged rollout's history needs no sequence and no key: moves are numbered in their
    transaction, and a move made while another is open conflicts at COMMIT: the one that commits
    first wins, the other is refused whole."""
    from mlplatform.rollout import stages as st

    with lake.connect_lake(str(tmp_path / "catalog.ducklake"), tmp_path / "data", tmp_path / "ext") as conn:
        st.move(conn, "flight_delay", "1", st.CHAMPION, "gate", "first model")
        st.move(conn, "flight_delay", "2", st.SHADOW, "gate", "passed")
        st.move(conn, "flight_delay", "2", st.CANARY, "judge", "sane")
        other = conn.cursor()  # a second connection, mid-move
        other.execute("USE lake")
        other.execute("BEGIN TRANSACTION")
        other.execute("UPDATE monitoring.rollout_lock SET moves = moves + 1 WHERE model_name = 'flight_delay'")
        st.move(conn, "flight_delay", "2", st.CHAMPION, "judge", "better")  # commits first
        with pytest.raises(duckdb.TransactionException) as refused:
            other.execute("COMMIT")
        assert lake.is_conflict(refused.value)
        assert [(m.version, m.stage, m.previous) for m in st.history(conn, "flight_delay")] == [
            ("1", "champion", None), ("2", "shadow", None), ("2", "canary", "shadow"), ("1", "retired", "champion"),
            ("2", "champion", "canary")]
        assert conn.execute("SELECT list(move ORDER BY move) FROM monitoring.rollout_history").fetchone()[0] == \
            [1, 2, 3, 4, 5]
        assert conn.execute("SELECT count(*), max(moves) FROM monitoring.rollout_lock").fetchone() == (1, 4)
