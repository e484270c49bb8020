"""`mlplatform ui` (what `make ui` runs): the Dagster UI and an MLflow UI over the platform's own
store, the model assets linking to their MLflow runs, and everything stopped on Ctrl-C."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlplatform.services import descendants, services
from mlplatform.settings import MLFLOW_UI_URL, REPO_ROOT, Settings
from mlplatform_tests.conftest import free_port
from mlplatform_tests.test_prometheus import rule_count

LANE = "system"


STOP_LIMIT_SECONDS = 15


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        assert process.poll() is None, f"mlplatform ui exited with {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def latest_metadata(instance, *key: str) -> dict:
    from dagster import AssetKey

    event = instance.get_latest_materialization_event(AssetKey(list(key)))
    assert event is not None, key
    return event.asset_materialization.metadata


def running(pids: dict[int, int]) -> list[int]:
    """Those of the recorded (pid, start time) that still run (zombies are dead)."""
    left = []
    for pid, start in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[19]) == start:
            left.append(pid)
    return left


@pytest.mark.unit
def test_the_mlflow_ui_is_where_links_point_by_default():
    settings = Settings.from_env({"MLPLATFORM_HOME": "/tmp/x"})
    assert settings.mlflow_ui_url == MLFLOW_UI_URL == "http://127.0.0.1:5000"
    (mlflow,) = [s for s in services(settings, "127.0.0.1", 3000) if s.name == "mlflow"]
    assert mlflow.argv[mlflow.argv.index("--port") + 1] == "5000"
    assert mlflow.argv[mlflow.argv.index("--host") + 1] == "127.0.0.1"
    assert mlflow.argv[mlflow.argv.index("--backend-store-uri") + 1] == settings.mlflow_uri
    # a tracking server is its own UI: nothing to start, links go there
    remote = Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_MLFLOW_URI": "http://mlflow.internal:80/"})
    assert remote.mlflow_ui_url == "http://mlflow.internal:80"
    # (and the broker, unless one answers already: test_stream.py)
    assert [s.name for s in services(remote, "127.0.0.1", 3000) if s.name != "redis"] == [
        "dagster", "serving", "exporter", "alertmanager", "prometheus"]
    # an Alertmanager of one's own: Prometheus sends there, none is started
    own = Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_ALERTMANAGER_URL": "http://127.0.0.1:9999"})
    assert "alertmanager" not in [s.name for s in services(own, "127.0.0.1", 3000)]
    with pytest.raises(SystemExit, match="MLPLATFORM_MLFLOW_UI_URL"):
        services(Settings.from_env({"MLPLATFORM_HOME": "/tmp/x", "MLPLATFORM_MLFLOW_UI_URL": "http://127.0.0.1"}),
                 "127.0.0.1", 3000)


@pytest.mark.unit
def test_a_new_home_gets_its_mlflow_store_before_the_services_start(tmp_path):
    """On a new home the MLflow UI, the serving API and the exporter start together and each
    would create the store's tables (one failed with "table ... already exists" and `make ui`
    stopped): ``prepare`` makes the store first."""
    import sqlite3

    from mlplatform.services import prepare

    settings = Settings.from_env({"MLPLATFORM_HOME": str(tmp_path / "home")})
    prepare(settings)
    store = Path(settings.mlflow_uri.removeprefix("sqlite:///"))
    with sqlite3.connect(store) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"experiments", "runs", "registered_models", "model_versions", "alembic_version"} <= tables, tables
    assert (tmp_path / "home" / "prometheus" / "prometheus.yml").exists()


def test_ui_links_models_to_mlflow_and_stops_on_sigint(champion_home, champion_instance, tmp_path):
    """The trained world's model assets link their MLflow runs at the default MLflow UI URL;
    `mlplatform ui` (here with the MLflow UI on a free port) serves the Dagster UI and that MLflow
    UI over the same store: the links open their run. SIGINT to the launcher's process group:
    every process it started is gone in 15 s."""
    home, instance = champion_home, champion_instance
    mlflow_port, dagster_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    model = latest_metadata(instance, "flight_delay_model")
    run_id = model["mlflow_run_id"].value
    link = model["mlflow_run"].value
    assert link.startswith(MLFLOW_UI_URL + "/#/")
    link = mlflow_url + link.removeprefix(MLFLOW_UI_URL)  # (the UI on this test's port)

    ports = {name: free_port() for name in ("SERVE", "EXPORTER", "ALERTMANAGER", "PROMETHEUS")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLPLATFORM_")},
           **home.as_env(), "MLPLATFORM_MLFLOW_UI_URL": mlflow_url,
           **{f"MLPLATFORM_{name}_PORT": str(port) for name, port in ports.items()}}
    log = (tmp_path / "ui.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlplatform"), "ui", "--port", str(dagster_port)],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    recorded: dict[int, int] = {}
    try:
        mlflow_ready = wait_for(mlflow_url, process)
        run = get_json(f"{mlflow_url}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
        experiment = run["info"]["experiment_id"]
        assert link == f"{mlflow_url}/#/experiments/{experiment}/runs/{run_id}"
        # the UI reads the platform's artifacts: the run's logged model is listed
        listed = get_json(f"{mlflow_url}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={run_id}")
        assert listed.get("files"), listed
        champion = latest_metadata(instance, "champion_model")
        assert champion["mlflow_run_id"].value == run_id
        dagster_ready = wait_for(f"http://127.0.0.1:{dagster_port}/server_info", process)
        open_run_page(link, run_id, tmp_path)
        # Prometheus with the platform's rules, scraping the exporter and the serving API (both up)
        prometheus = f"http://127.0.0.1:{ports['PROMETHEUS']}"
        deadline, targets = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            targets = {t["labels"]["job"]: t["health"]
                       for t in get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]}
            if set(targets.values()) == {"up"}:
                break
            time.sleep(1)
        assert targets == {"mlplatform-exporter": "up", "mlplatform-serving": "up", "prometheus": "up"}, targets
        assert sum(len(g["rules"]) for g in get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]) == rule_count()
        assert get_json(f"http://127.0.0.1:{ports['ALERTMANAGER']}/api/v2/status")["cluster"]["status"] == "disabled"
        recorded = descendants(process.pid, set())
        recorded[process.pid] = int(Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        names = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace") for p in running(recorded))
        assert "dagster_webserver" in names and "dagster._daemon" in names and "uvicorn" in names, names
        assert "prometheus" in names and "alertmanager" in names and "exporter" in names, names
        assert "huey" not in names  # the MLflow server's job runner is off
        print(f"MLflow UI answered after {mlflow_ready:.1f} s, the Dagster UI after {dagster_ready:.1f} s; "
              f"{len(recorded)} processes")

        os.killpg(process.pid, signal.SIGINT)
        began = time.monotonic()
        while running(recorded) and time.monotonic() - began < 30:
            time.sleep(0.2)
        took = time.monotonic() - began
        process.wait(timeout=5)
        left = running(recorded)
        assert not left, f"still running after {took:.1f} s: {left}"
        assert took < STOP_LIMIT_SECONDS, took
        assert process.returncode == 130
        print(f"all {len(recorded)} processes gone {took:.1f} s after SIGINT")
        logs = home.home / "logs"
        assert "dagster-webserver" in (logs / "dagster.log").read_text()
        assert "Uvicorn running" in (logs / "mlflow.log").read_text() or (logs / "mlflow.log").stat().st_size > 0
    finally:
        log.close()
        if process.poll() is None:  # (the test failed before its SIGINT) the launcher stops what it started
            recorded.update(descendants(process.pid, set()))
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for pid in running(recorded):
            os.kill(pid, signal.SIGKILL)


def open_run_page(link: str, run_id: str, shots: Path) -> None:
    """The link opens the run's page in the MLflow UI (a real browser, when Debian's chromium is there)."""
    from mlplatform_tests.test_ui import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: `make test` installs it (.ci/system-deps)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(link, wait_until="domcontentloaded")  # (the MLflow UI keeps polling: never network-idle)
        try:
            expect(page.get_by_text(run_id).first).to_be_visible(timeout=30_000)
        finally:
            page.screenshot(path=str(shots / "mlflow-run.png"))
            browser.close()


@pytest.mark.integration
def test_drift_report_shows_its_verdict_and_psi_inline(champion_instance):
    """The drift report's verdict is text, its per-feature PSI a table and its plot a small SVG:
    the asset page shows all three inline (the UI puts Markdown over 1,000 characters behind a
    "[Show Markdown]" toggle). (The trained world's report of 2013-01-31..02-06.)"""
    from dagster import TableMetadataValue, TextMetadataValue

    instance = champion_instance
    metadata = latest_metadata(instance, "monitoring", "drift_report")
    verdict = metadata["verdict"]
    assert isinstance(verdict, TextMetadataValue)
    assert verdict.value.startswith(("DRIFT on", "no drift on")), verdict.value
    assert ("DRIFT" in verdict.value) == metadata["drift_detected"].value
    table = metadata["worst_day_psi"]
    assert isinstance(table, TableMetadataValue)
    assert [c.name for c in table.schema.columns] == ["feature", "psi", "threshold", "drifted", "judged"]
    rows = [r.data for r in table.records]
    assert len(rows) > 10 and rows == sorted(rows, key=lambda r: -r["psi"])
    assert {"carrier", "delay_probability"} <= {r["feature"] for r in rows}
    assert all(r["drifted"] == (r["psi"] > r["threshold"]) for r in rows)
    # the plot: an SVG bar chart of the largest judged PSIs, short enough for the UI to render inline
    plot = metadata["worst_day_plot"].value
    assert len(plot) < 1000 and "](data:image/svg+xml;base64," in plot, plot
    svg = base64.b64decode(plot.split("base64,", 1)[1].rstrip(")")).decode()
    judged = [r for r in rows if r["judged"]][:5]
    assert svg.startswith("<svg") and svg.count("<rect") == len(judged)
    assert [f">{r['feature'][:14]}<" in svg for r in judged] == [True] * len(judged)
    assert svg.count("fill='red'") == sum(r["drifted"] for r in judged)
