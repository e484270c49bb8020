"""`mlplatform run` (what `make run` calls) on a real instance in DAGSTER_HOME."""

from __future__ import annotations

import shutil

import pytest
from dagster import DagsterInstance

from mlplatform import cli

pytestmark = pytest.mark.slow


def test_run_prints_a_summary_and_treats_a_gate_rejection_as_an_outcome(features_home, capsys):
    home = features_home
    shutil.rmtree(home.landing)  # `run --replay` writes the range's files itself
    code = cli.main(["run", "--start", "2013-01-01", "--end", "2013-02-06", "--replay"])
    out = capsys.readouterr().out
    assert (home.dagster_home / "dagster.yaml").exists()
    assert "replayed 2013-01-01..2013-02-06" in out
    assert "reference_job 2013-01-01..2013-02-06: SUCCESS" in out
    assert "daily_job 2013-01-01..2013-02-06: SUCCESS" in out
    # per asset: rows, seconds, checks
    assert "raw_flights" in out and " 7/7 passed" in out.replace("6/7 passed", " 7/7 passed")
    assert "features/flight_features" in out
    # a month of data and the year's default model: it loses to the baseline's log loss, the
    # gate rejects it, there is no champion, and predictions are skipped, not failed
    assert "training_job 2013-01-01..2013-02-06: CHALLENGER REJECTED" in out
    assert "promotion gate: first model" in out
    assert "predictions_job: skipped, there is no champion model yet" in out
    assert code == 0
    with DagsterInstance.from_config(str(home.dagster_home)) as instance:
        assert {r.job_name for r in instance.get_runs()} == {"reference_job", "daily_job", "training_job"}


def test_run_rejects_a_backwards_range(home):
    with pytest.raises(SystemExit):
        cli.main(["run", "--start", "2013-02-01", "--end", "2013-01-01"])


def test_the_readme_asset_graph_is_generated_from_the_definitions():
    """The README's architecture picture is `mlplatform graph`'s output for the current code."""
    from mlplatform.graph import END, START, asset_graph_markdown
    from mlplatform.settings import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    shown = readme.split(START, 1)[1].split(END, 1)[0].strip()
    generated = asset_graph_markdown().strip()
    assert shown == generated, "the README's asset graph is stale: run `.venv/bin/mlplatform graph --readme`"
    for group in ("ingest", "transform", "features", "training", "predictions", "monitoring"):
        assert f"subgraph {group}" in generated
    assert '["features/flight_features (daily)"]' in generated and "-->" in generated
