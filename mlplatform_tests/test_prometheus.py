"""Operating the platform: the alert rules under `promtool test rules`, the generated
configuration under `promtool check config` / `amtool check-config`, the exporter's metrics
against what Dagster, the warehouse and MLflow say, and an alert going the whole way: the
warehouse -> the exporter -> a real Prometheus -> a real Alertmanager -> the exporter's receiver
-> ``monitoring.alerts`` and the platform's webhook."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest

from mlplatform.operating.exporter import WAREHOUSE_LOCK
from mlplatform.operating.prometheus import RULES, binary, monitoring_services, write_configs
from mlplatform_tests.conftest import free_port

LANE = "system"
RULE_TESTS = Path(__file__).parent / "prometheus" / "rules.test.yml"


def rule_count() -> int:
    """The recording and alerting rules of the platform's rules file."""
    import yaml

    return sum(len(group["rules"]) for group in yaml.safe_load(RULES.read_text())["groups"])


@pytest.mark.unit
def test_every_alert_rule_fires_and_stays_quiet_as_its_unit_tests_say():
    promtool = binary("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # every alert of the rules file has a test that expects it to fire
    import yaml

    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    fired = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    quiet = {t["alertname"] for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for t in case.get("alert_rule_test", []) if not t["exp_alerts"]}
    assert alerts == fired == quiet, (alerts - fired, alerts - quiet)


@pytest.mark.unit
def test_the_generated_configuration_is_valid_and_on_loopback(tmp_path):
    from mlplatform.settings import Settings

    settings = Settings.from_env({"MLPLATFORM_HOME": str(tmp_path), "MLPLATFORM_SERVE_TOKEN": "s3cret-token"})
    prometheus_yml, alertmanager_yml = write_configs(settings)
    checked = subprocess.run([binary("promtool"), "check", "config", str(prometheus_yml)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{rule_count()} rules found" in checked.stdout + checked.stderr
    amtool = subprocess.run(["amtool", "check-config", str(alertmanager_yml)], capture_output=True, text=True)
    assert amtool.returncode == 0, amtool.stdout + amtool.stderr
    # the serving token reaches Prometheus through a file only its owner reads, never the config
    assert "s3cret-token" not in prometheus_yml.read_text()
    token = tmp_path / "prometheus" / "serving.token"
    assert token.read_text() == "s3cret-token" and token.stat().st_mode & 0o077 == 0
    for service in monitoring_services(settings):
        listens = [a for a in service.argv if "listen-address" in a]
        assert all(a.endswith("=") or "=127.0.0.1:" in a for a in listens), service.argv
        assert service.url.startswith("http://127.0.0.1:")


def scrape(url: str) -> dict[str, list]:
    """{metric name: [(labels, value), ...]} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=60) as response:
        text = response.read().decode()
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def one(metrics: dict, name: str, **labels) -> float:
    values = [v for found, v in metrics.get(name, []) if all(found.get(k) == w for k, w in labels.items())]
    assert len(values) == 1, (name, labels, metrics.get(name))
    return values[0]


def start_exporter(settings, port: int):
    from mlplatform.operating.exporter import exporter_server

    server = exporter_server(settings, "127.0.0.1", port)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_exporter_says_what_dagster_the_warehouse_and_mlflow_say(champion_home, champion_instance):
    from mlplatform import keys
    from mlplatform.training.tracking import tracking_from

    settings, instance = champion_home, champion_instance
    port = free_port()
    server = start_exporter(settings, port)
    try:
        metrics = scrape(f"http://127.0.0.1:{port}/metrics")
        # a run holding the warehouse (DuckDB's one writer): the scrape does not wait for it, it
        # serves the last reading and says so
        holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                                   "print('held', flush=True); time.sleep(60)", str(settings.warehouse)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            began = time.monotonic()
            locked = scrape(f"http://127.0.0.1:{port}/metrics")
            took = time.monotonic() - began
        finally:
            holder.kill()
            holder.wait()
        # a webhook payload that is not JSON is refused, and says why
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/alerts", data=b"{not json",
                                                          method="POST"), timeout=10)
    finally:
        server.shutdown()
        server.server_close()
    assert one(locked, "mlplatform_exporter_warehouse_up") == 0 and took < 15, took
    assert one(locked, "mlplatform_drift_share") == one(metrics, "mlplatform_drift_share")
    assert one(locked, "mlplatform_exporter_warehouse_read_timestamp_seconds") == one(
        metrics, "mlplatform_exporter_warehouse_read_timestamp_seconds")
    assert one(metrics, "mlplatform_exporter_warehouse_up") == 1
    # Dagster: each asset's last materialization and latest partition
    event = instance.get_latest_materialization_event(keys.FEATURES)
    features = keys.FEATURES.to_user_string()
    assert one(metrics, "mlplatform_asset_last_materialization_timestamp_seconds", asset=features) == pytest.approx(
        event.timestamp)
    assert 0 < one(metrics, "mlplatform_asset_materialization_age_seconds", asset=features, daily="true") < 24 * 3600
    latest = max(instance.get_materialized_partitions(keys.FEATURES))
    assert one(metrics, "mlplatform_asset_latest_partition_timestamp_seconds", asset=features) == (
        dt.datetime.fromisoformat(latest).replace(tzinfo=dt.timezone.utc).timestamp())
    assert one(metrics, "mlplatform_asset_latest_partition_timestamp_seconds", asset=features) == (
        dt.datetime(2013, 2, 6, tzinfo=dt.timezone.utc).timestamp())
    # the blocking checks of the raw tables passed in the world's runs
    checks = metrics["mlplatform_asset_check_passed"]
    assert checks and all(v == 1 for labels, v in checks if labels["blocking"] == "true"), checks
    assert one(metrics, "mlplatform_dagster_runs", job="daily_job", status="SUCCESS") >= 1
    # MLflow: the champion
    champion = tracking_from(settings).version_by_alias("champion")
    assert one(metrics, "mlplatform_model_version", role="champion") == float(champion.version)
    # the warehouse: the latest day's drift and realised performance, the quarantine
    with duckdb.connect(str(settings.warehouse), read_only=True) as conn:
        day, share, threshold = conn.execute("SELECT drift_date, drifted_share, threshold FROM monitoring.drift_days "
                                             "ORDER BY drift_date DESC LIMIT 1").fetchone()
        auc = conn.execute("SELECT coalesce(window_roc_auc, roc_auc) FROM monitoring.model_performance WHERE judged "
                           "ORDER BY performance_date DESC LIMIT 1").fetchone()
        raw, quarantined = conn.execute(
            "SELECT (SELECT count(*) FROM raw.flights WHERE _partition_date = DATE '2013-02-06'), "
            "(SELECT count(*) FROM quarantine.flights WHERE _partition_date = DATE '2013-02-06')").fetchone()
    assert one(metrics, "mlplatform_drift_share", day=str(day)) == pytest.approx(share)
    assert one(metrics, "mlplatform_drift_share_threshold", day=str(day)) == pytest.approx(threshold)
    if auc is not None:
        assert one(metrics, "mlplatform_realised_roc_auc") == pytest.approx(auc[0])
    assert one(metrics, "mlplatform_latest_day_raw_rows", source="flights") == raw > 0
    assert one(metrics, "mlplatform_latest_day_quarantined_rows", source="flights") == quarantined


class Webhook:
    """A real HTTP receiver on loopback: the platform's MLPLATFORM_ALERT_WEBHOOK."""

    def __init__(self):
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def scrape_health(prometheus: str) -> tuple:
    """What Prometheus says of its targets and alerts (a failed end-to-end test's context)."""
    try:
        targets = [(t["labels"]["job"], t["health"], t["lastError"], t["lastScrapeDuration"])
                   for t in get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]]
        return targets, get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"]
    except OSError as exc:
        return (f"Prometheus did not answer: {exc}",)


def test_a_drifted_day_reaches_monitoring_alerts_through_prometheus_and_alertmanager(champion_home, tmp_path):
    """A day whose drifted share is above its threshold (written to monitoring.drift_days as the
    drift report writes it) fires FeatureDrift in a real Prometheus scraping the exporter; a real
    Alertmanager sends it to the exporter's receiver, which stores it in monitoring.alerts and
    POSTs it to the platform's webhook. Prometheus has the rules loaded and both targets up (the
    serving API, not running here, is the one target down)."""
    from dataclasses import replace

    hook = Webhook()
    settings = replace(champion_home, exporter_port=free_port(), prometheus_port=free_port(),
                       alertmanager_port=free_port(), serve_port=free_port(), alert_webhook=hook.url)
    with duckdb.connect(str(settings.warehouse)) as conn:
        conn.execute("INSERT INTO monitoring.drift_days (drift_date, reference_version, judged_features, "
                     "drifted_features, drifted_share, threshold, judged, drift_detected, note) "
                     "VALUES (DATE '2013-02-07', '1', 10, 6, 0.6, 0.3, true, true, 'a test day')")
    # Prometheus's scrape timeout is its interval: 5 s leaves a scrape room on a loaded machine (at
    # 1 s, one full-suite run saw no alert in 90 s; a scrape takes ~0.6 s under load here)
    write_configs(settings, interval="5s", group_wait="1s")
    exporter = start_exporter(settings, settings.exporter_port)
    scrape(f"http://127.0.0.1:{settings.exporter_port}/metrics")  # the first one also loads the asset graph
    processes = []
    try:
        for service in monitoring_services(settings):
            if service.name == "exporter":
                continue  # (in this process, above)
            log = (tmp_path / f"{service.name}.log").open("w")
            processes.append(subprocess.Popen(service.argv, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        prometheus = f"http://127.0.0.1:{settings.prometheus_port}"
        deadline, stored = time.monotonic() + 90, []
        while time.monotonic() < deadline and not (stored and hook.received):
            time.sleep(1)
            assert all(p.poll() is None for p in processes), [(p.args[0], p.returncode) for p in processes]
            # (the exporter runs in this process: its lock keeps our read from meeting its write)
            with WAREHOUSE_LOCK, duckdb.connect(str(settings.warehouse), read_only=True) as conn:
                if conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'alerts'"
                                ).fetchone()[0]:
                    stored = conn.execute("SELECT kind, message, details FROM monitoring.alerts "
                                          "WHERE kind = 'prometheus:FeatureDrift'").fetchall()
        assert stored, ("no FeatureDrift alert reached monitoring.alerts in 90 s", scrape_health(prometheus),
                        hook.received, (tmp_path / "alertmanager.log").read_text()[-2000:])
        kind, message, details = stored[0]
        assert "[firing] Drift on 2013-02-07: 60% of the judged features drifted" in message
        assert json.loads(details)["labels"]["reference_version"] == "1"
        sent = [b for b in hook.received if b["kind"] == "prometheus:FeatureDrift"]
        assert sent and sent[0]["message"] == message
        # Prometheus: the platform's rules loaded, the exporter up, the serving API (not started) down
        rules = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
        assert sum(len(g["rules"]) for g in rules) == rule_count()
        targets = {t["labels"]["job"]: t["health"] for t in get_json(f"{prometheus}/api/v1/targets")["data"][
            "activeTargets"]}
        assert targets["mlplatform-exporter"] == "up" and targets["prometheus"] == "up", targets
        assert targets["mlplatform-serving"] == "down", targets
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        exporter.shutdown()
        exporter.server_close()
        hook.close()
