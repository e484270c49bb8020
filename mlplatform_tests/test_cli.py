"""`mlplatform run` (what `make run` calls) on a real instance in DAGSTER_HOME."""

from __future__ import annotations

import shutil

import pytest
from dagster import DagsterInstance

from mlplatform import cli
from mlplatform.settings import Settings
from mlplatform_tests.conftest import D

LANE = "unit"



@pytest.mark.integration
def test_run_prints_a_summary_of_every_job(features_home, capsys):
    home = features_home
    shutil.rmtree(home.landing)  # `run --replay` writes the range's files itself
    code = cli.main(["run", "--start", "2013-01-01", "--end", "2013-02-06", "--replay"])
    out = capsys.readouterr().out
    assert (home.dagster_home / "dagster.yaml").exists()
    assert "replayed 2013-01-01..2013-02-06" in out
    for job in ("reference_job", "daily_job", "predictions_job", "monitoring_job"):
        assert f"{job} 2013-01-01..2013-02-06: SUCCESS" in out, out
    # per asset: rows, seconds, checks (one of raw_flights' warnings may fire on a real day)
    raw_flights = next(line for line in out.splitlines() if line.strip().startswith("raw_flights "))
    assert " 8/8 passed" in raw_flights or " 7/8 passed; " in raw_flights, raw_flights
    assert "features/flight_features" in out
    # five weeks and the default model: early stopping on the validation days keeps it from
    # overfitting, so the first model beats the baseline from a month of history (issue 14)
    assert "training_job 2013-01-01..2013-02-06: SUCCESS" in out, out
    assert "predictions/flight_delay" in out and "monitoring/drift_report" in out
    assert code == 0
    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        assert {r.job_name for r in instance.get_runs()} == {"reference_job", "daily_job", "training_job",
                                                             "predictions_job", "monitoring_job"}


def test_deliver_brings_the_next_days_real_or_drifted(home, capsys):
    """`mlplatform deliver` (`make deliver`): the days after the last one delivered, as the
    upstream would deliver them; drifted ones pass the contracts but move their distributions."""
    import pandas as pd

    from mlplatform.ingest.contracts import FLIGHTS, WEATHER
    from mlplatform.ingest.parse import read_landing_file

    assert cli.last_delivered(home.landing) == D(2013, 12, 31)  # the test landing zone ends the year
    for path in home.landing.glob("*/2013-1[12]-*.csv"):
        path.unlink()
    assert cli.last_delivered(home.landing) == D(2013, 2, 13)
    assert cli.main(["deliver", "--days", "2"]) == 0
    assert "delivered 2013-02-14..2013-02-15 (2 day(s))" in capsys.readouterr().out
    real = pd.read_csv(home.landing / "weather" / "2013-02-15.csv")
    assert cli.main(["deliver", "--drift", "weather", "--severity", "1"]) == 0
    assert "delivered 2013-02-16..2013-02-16 (1 day(s)), drifted (weather" in capsys.readouterr().out
    drifted = pd.read_csv(home.landing / "weather" / "2013-02-16.csv")
    assert drifted["temp"].mean() > real["temp"].mean() + 20
    for contract in (FLIGHTS, WEATHER):  # it parses as its contract says (the loop tests load such days)
        assert len(read_landing_file(home.landing / contract.name / "2013-02-16.csv", contract)) > 20
    with pytest.raises(SystemExit):
        cli.main(["deliver", "--drift", "hail"])


def test_run_rejects_a_backwards_range(home):
    with pytest.raises(SystemExit):
        cli.main(["run", "--start", "2013-02-01", "--end", "2013-01-01"])


def test_the_readme_asset_graph_is_generated_from_the_definitions(home):
    """The README's architecture picture is `mlplatform graph`'s output for the current code."""
    from mlplatform.graph import END, START, asset_graph_markdown
    from mlplatform.settings import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    shown = readme.split(START, 1)[1].split(END, 1)[0].strip()
    generated = asset_graph_markdown(Settings.from_env()).strip()
    assert shown == generated, "the README's asset graph is stale: run `.venv/bin/mlplatform graph --readme`"
    for group in ("ingest", "transform", "features", "training", "predictions", "monitoring"):
        assert f"subgraph {group}" in generated
    assert '["features/flight_features (daily)"]' in generated and "-->" in generated


@pytest.mark.system
def test_dg_loads_the_same_code_location(home):
    """`dg check defs` (and so `dg dev`) loads mlplatform.definitions' `defs` as `dagster dev -w
    workspace.yaml` does, by the [tool.dg] section of pyproject.toml."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mlplatform.settings import REPO_ROOT

    scripts = Path(sys.executable).parent
    env = {**os.environ, **home.as_env(), "VIRTUAL_ENV": str(scripts.parent)}
    done = subprocess.run([str(scripts / "dg"), "check", "defs"], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "All definitions loaded successfully" in done.stdout + done.stderr
