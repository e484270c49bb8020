"""Dagster's storage on PostgreSQL: a real PostgreSQL 15 server (Debian's, installed by
`.ci/system-deps`) on loopback in a temporary directory, selected by MLPLATFORM_DAGSTER_PG_URL."""

from __future__ import annotations

import datetime as dt

import pytest

from mlplatform.home import init_home
from mlplatform.settings import Settings
from mlplatform_tests.conftest import source_rows
from mlplatform_tests.test_operations import start_job, wait

LANE = "system"


def test_runs_and_events_are_stored_in_postgres(home, postgres, monkeypatch):
    """One variable switches Dagster to PostgreSQL: `mlplatform init` writes a dagster.yaml for
    it in its own instance directory, real runs store their runs, events and asset
    materializations there, and nothing is written to SQLite."""
    import psycopg2
    from dagster import AssetKey, DagsterInstance

    monkeypatch.setenv("MLPLATFORM_DAGSTER_PG_URL", postgres)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    settings = Settings.from_env()
    assert settings.dagster_home == home.home / "dagster-postgres"
    monkeypatch.setenv("DAGSTER_HOME", str(settings.dagster_home))
    init_home(settings)
    yaml = (settings.dagster_home / "dagster.yaml").read_text()
    assert "postgres_url:\n      env: MLPLATFORM_DAGSTER_PG_URL" in yaml and postgres not in yaml  # no secret in the file

    day = dt.date(2013, 1, 3)
    assert wait(start_job(settings, "reference_job")) == 0
    assert wait(start_job(settings, "daily_job", day)) == 0

    with psycopg2.connect(postgres.replace("+psycopg2", "")) as conn, conn.cursor() as cur:
        cur.execute("SELECT pipeline_name, status FROM runs ORDER BY create_timestamp")
        assert cur.fetchall() == [("reference_job", "SUCCESS"), ("daily_job", "SUCCESS")]
        cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'")
        assert cur.fetchone()[0] > 10
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        materialization = instance.get_latest_materialization_event(AssetKey("raw_flights"))
        assert materialization.asset_materialization.partition == str(day)
        rows = materialization.asset_materialization.metadata["dagster/row_count"].value
        assert rows == len(source_rows("flights", day))
    assert not list(settings.dagster_home.rglob("*.db")), "SQLite files were written"


@pytest.mark.unit
def test_a_postgres_url_without_the_driver_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"postgresql\+psycopg2://"):
        Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_DAGSTER_PG_URL": "postgresql://u@h/d"})
