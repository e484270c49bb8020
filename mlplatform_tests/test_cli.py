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
def test_run_replays_its_range_and_says_how_much_history_training_needs(reference_home, capsys):
    """`mlplatform run --replay` on one day: the day's files are written first, the reference and
    daily jobs succeed, training fails with what to do about it, and predictions and monitoring
    are skipped (no champion). The summary of a whole successful run (every job over four weeks,
    a champion, predictions, drift) is asserted on the benchmark smoke's `mlplatform run`
    (test_benchmarks), which runs it anyway."""
    home = reference_home
    shutil.rmtree(home.landing)  # `run --replay` writes the range's files itself
    code = cli.main(["run", "--start", "2013-01-01", "--end", "2013-01-01", "--replay"])
    out = capsys.readouterr().out
    assert code == 1
    assert "replayed 2013-01-01..2013-01-01" in out and (home.landing / "flights" / "2013-01-01.csv").exists()
    assert "no broker answers at " in out  # the tests' broker address: the batch files are the record
    for job in ("reference_job", "daily_job"):
        assert f"{job} 2013-01-01..2013-01-01: SUCCESS" in out, out
    # per asset: rows, seconds, checks (one of raw_flights' warnings may fire on a real day)
    raw_flights = next(line for line in out.splitlines() if line.strip().startswith("raw_flights "))
    assert raw_flights.split()[1] == "842" and (" 8/8 passed" in raw_flights or " 7/8 passed; " in raw_flights)
    assert "features/flight_features" in out
    assert "training_job 2013-01-01..2013-01-01: FAILURE" in out, out
    assert ("flight_delay_model failed: " in out and "too little history to train" in out
            and "backfill daily_job from 2013-01-01 to 2013-01-28" in out), out
    for job in ("predictions_job", "monitoring_job"):
        assert f"{job}: skipped, there is no champion model yet" in out, out
    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        runs = {r.job_name: r.status.value for r in instance.get_runs() if r.job_name != "reference_job"}
    assert runs == {"daily_job": "SUCCESS", "training_job": "FAILURE"}


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


def test_serve_beyond_loopback_needs_a_bearer_token(home, monkeypatch):
    """`mlplatform serve --host 0.0.0.0` without MLPLATFORM_SERVE_TOKEN refuses to start (before it
    binds anything); with a token set, the API asks every prediction and /metrics for it."""
    from fastapi.testclient import TestClient

    from mlplatform.serving.app import create_app
    from mlplatform.serving.service import PredictionService

    monkeypatch.delenv("MLPLATFORM_SERVE_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="MLPLATFORM_SERVE_TOKEN"):
        cli.main(["serve", "--host", "0.0.0.0", "--port", "9"])
    service = PredictionService.from_settings(home, stream=False)
    with TestClient(create_app(service, start_service=False, token="s3cret")) as client:
        flight = {"flight_date": "2013-01-28", "carrier": "UA", "flight_number": 1545, "origin": "EWR",
                  "dest": "IAH", "sched_dep_time": 515}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"}):
            assert client.post("/predict", json=flight, headers=headers).status_code == 401
            assert client.post("/predict/batch", json={"flights": [flight]}, headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401
        token = {"Authorization": "Bearer s3cret"}
        assert client.post("/predict", json=flight, headers=token).status_code == 503  # let in: nothing served yet
        assert client.get("/metrics", headers=token).status_code == 200
        assert client.get("/health").status_code in (200, 503)  # the probes' endpoint stays open
