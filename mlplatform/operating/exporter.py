"""The platform's Prometheus exporter: what Dagster, the warehouse, MLflow and the broker say
about the platform, as metrics read fresh at every scrape (``PlatformCollector``); and the
receiver of Alertmanager's webhook (``POST /alerts``), which records each alert in
``monitoring.alerts`` and forwards it to ``MLPLATFORM_ALERT_WEBHOOK``, as the run-failure sensor
does. ``mlplatform exporter`` serves both on ``MLPLATFORM_EXPORTER_PORT`` (loopback).

A scrape reads; it never waits: the warehouse is opened read-only for at most
``WAREHOUSE_WAIT_SECONDS`` (DuckDB has one writer at a time, and a run may hold it), and when it
cannot be read the warehouse's metrics are the last ones read, ``mlplatform_exporter_warehouse_up``
is 0 and ``mlplatform_exporter_warehouse_read_timestamp_seconds`` says how old they are.

Every metric is named here once; the alert rules (``rules/mlplatform.rules.yml``) use these names.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily

from mlplatform.settings import Settings

log = logging.getLogger("mlplatform.exporter")
WAREHOUSE_WAIT_SECONDS = 2.0
# One connection to the warehouse at a time in this process: a scrape's read-only one and an
# alert's write would otherwise meet (DuckDB refuses two configurations of one file in a process).
WAREHOUSE_LOCK = threading.Lock()
DAILY_SOURCES = ("flights", "weather")  # the raw tables whose days are quarantined or loaded
ROLES = ("champion", "canary", "shadow")  # the MLflow aliases of the versions serving answers with
FRESHNESS_STATES = ("PASS", "WARN", "FAIL", "UNKNOWN")


def _run_statuses():
    from dagster import DagsterRunStatus

    return (DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS, DagsterRunStatus.STARTED, DagsterRunStatus.QUEUED,
            DagsterRunStatus.CANCELED)


def _epoch(value) -> float | None:
    """Seconds since the epoch of a date or a naive-UTC / aware datetime."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        value = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return value.timestamp()
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc).timestamp()
    return float(value)


@dataclass
class WarehouseReading:
    """What the warehouse says, at ``read_at``."""
    read_at: float = 0.0
    drift: tuple | None = None             # (day, share, threshold, judged, detected, reference version)
    performance: tuple | None = None       # (day, roc_auc, window_roc_auc, expected, degraded, version)
    quarantine: dict = field(default_factory=dict)  # source -> (latest day, raw rows, quarantined rows)
    last_event: tuple | None = None        # (max event_time, max _ingested_at) of raw.flight_events
    alerts: dict = field(default_factory=dict)      # kind -> count of monitoring.alerts rows


def read_warehouse(database: str) -> WarehouseReading:
    """One read-only pass over the monitoring tables (raises when the warehouse is locked)."""
    from mlplatform.warehouse import connect, has_table

    reading = WarehouseReading(read_at=time.time())
    with connect(database, read_only=True, max_wait=WAREHOUSE_WAIT_SECONDS) as conn:
        if has_table(conn, "monitoring", "drift_days"):
            reading.drift = conn.execute(
                "SELECT drift_date, drifted_share, threshold, judged, drift_detected, reference_version "
                "FROM monitoring.drift_days ORDER BY drift_date DESC LIMIT 1").fetchone()
        if has_table(conn, "monitoring", "model_performance"):
            reading.performance = conn.execute(
                "SELECT performance_date, roc_auc, window_roc_auc, expected_roc_auc, degraded, model_version "
                "FROM monitoring.model_performance WHERE judged ORDER BY performance_date DESC LIMIT 1").fetchone()
        for source in DAILY_SOURCES:
            if not has_table(conn, "raw", source):
                continue
            day = conn.execute(f"SELECT max(_partition_date) FROM raw.{source}").fetchone()[0]
            if day is None:
                continue
            loaded = conn.execute(f"SELECT count(*) FROM raw.{source} WHERE _partition_date = ?", [day]).fetchone()[0]
            quarantined = (conn.execute(f"SELECT count(*) FROM quarantine.{source} WHERE _partition_date = ?",
                                        [day]).fetchone()[0] if has_table(conn, "quarantine", source) else 0)
            reading.quarantine[source] = (day, loaded, quarantined)
        if has_table(conn, "raw", "flight_events"):
            reading.last_event = conn.execute(
                "SELECT max(event_time), max(_ingested_at) FROM raw.flight_events").fetchone()
        if has_table(conn, "monitoring", "alerts"):
            reading.alerts = dict(conn.execute("SELECT kind, count(*) FROM monitoring.alerts GROUP BY kind").fetchall())
    return reading


class PlatformCollector:
    """A Prometheus collector (``collect()`` at every scrape) over the platform's state."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._warehouse = WarehouseReading()
        self._warehouse_up = False
        self._lock = threading.Lock()  # one scrape at a time (a scrape is a few queries)
        self._graph = None
        self._jobs: list[str] = []

    # -- what is read -------------------------------------------------------------------------------
    def graph(self):
        """The code location's asset graph (built once: the assets, checks, groups, partitions)."""
        if self._graph is None:
            from mlplatform.definitions import load_defs

            defs = load_defs(self.settings)
            self._jobs = sorted(job.name for job in defs.resolve_all_job_defs() if not job.name.startswith("__"))
            self._graph = defs.resolve_asset_graph()
        return self._graph

    def warehouse(self) -> tuple[WarehouseReading, bool]:
        try:
            with WAREHOUSE_LOCK:
                self._warehouse, self._warehouse_up = read_warehouse(self.settings.database), True
        except Exception as exc:  # noqa: BLE001 - a locked or missing warehouse: the last reading, marked
            log.info("warehouse not read: %s", exc)
            self._warehouse_up = False
        return self._warehouse, self._warehouse_up

    def collect(self):
        with self._lock:
            began = time.perf_counter()
            yield from self._dagster()
            yield from self._warehouse_metrics()
            yield from self._models()
            yield from self._stream()
            yield from self._landing()
            took = GaugeMetricFamily("mlplatform_exporter_scrape_seconds", "How long the exporter took to read.")
            took.add_metric([], time.perf_counter() - began)
            yield took

    # -- Dagster: assets, freshness, checks, runs ---------------------------------------------------
    def _dagster(self):
        from dagster import RunsFilter

        from mlplatform.home import instance_of

        graph = self.graph()
        now = time.time()
        last = GaugeMetricFamily("mlplatform_asset_last_materialization_timestamp_seconds",
                                 "When the asset was last materialized successfully.", labels=["asset", "group", "daily"])
        age = GaugeMetricFamily("mlplatform_asset_materialization_age_seconds",
                                "Seconds since the asset's last successful materialization.",
                                labels=["asset", "group", "daily"])
        latest = GaugeMetricFamily("mlplatform_asset_latest_partition_timestamp_seconds",
                                   "The latest materialized daily partition of the asset (its day at 00:00 UTC).",
                                   labels=["asset", "group"])
        fresh = GaugeMetricFamily("mlplatform_asset_freshness_state",
                                  "1 for the asset's freshness state under its Dagster FreshnessPolicy.",
                                  labels=["asset", "state"])
        check = GaugeMetricFamily("mlplatform_asset_check_passed",
                                  "1 when the check's latest evaluation passed, 0 when it failed.",
                                  labels=["asset", "check", "blocking", "check_severity"])
        runs = GaugeMetricFamily("mlplatform_dagster_runs", "Runs of each job by status (the instance's history).",
                                 labels=["job", "status"])
        with instance_of(self.settings) as instance:
            keys = sorted(graph.materializable_asset_keys, key=lambda k: k.to_user_string())
            records = {r.asset_entry.asset_key: r.asset_entry for r in instance.get_asset_records(keys)}
            for key in keys:
                node = graph.get(key)
                name, group = key.to_user_string(), node.group_name or "default"
                daily = "true" if node.partitions_def is not None else "false"
                entry = records.get(key)
                event = entry.last_materialization if entry else None
                if event is not None:
                    last.add_metric([name, group, daily], event.timestamp)
                    age.add_metric([name, group, daily], now - event.timestamp)
                if node.partitions_def is not None:
                    done = instance.get_materialized_partitions(key)
                    if done:
                        latest.add_metric([name, group], _epoch(dt.date.fromisoformat(max(done))))
            for key, record in instance.get_freshness_state_records(keys).items():
                state = record.freshness_state.value
                for each in FRESHNESS_STATES:
                    fresh.add_metric([key.to_user_string(), each], 1.0 if state == each else 0.0)
            check_keys = list(graph.asset_check_keys)
            executions = instance.event_log_storage.get_latest_asset_check_execution_by_key(check_keys)
            for check_key in check_keys:
                execution = executions.get(check_key)
                evaluation = execution.event.asset_check_evaluation if execution and execution.event else None
                if evaluation is None:
                    continue
                spec = graph.get_check_spec(check_key)
                check.add_metric([check_key.asset_key.to_user_string(), check_key.name,
                                  str(bool(spec.blocking)).lower(), evaluation.severity.value],
                                 1.0 if evaluation.passed else 0.0)
            for job in self._jobs:
                for status in _run_statuses():
                    runs.add_metric([job, status.value],
                                    instance.get_runs_count(RunsFilter(job_name=job, statuses=[status])))
        yield from (last, age, latest, fresh, check, runs)

    # -- the warehouse: drift, performance, quarantine, alerts ----------------------------------------
    def _warehouse_metrics(self):
        reading, up = self.warehouse()
        ok = GaugeMetricFamily("mlplatform_exporter_warehouse_up", "1 when this scrape read the warehouse.")
        ok.add_metric([], 1.0 if up else 0.0)
        yield ok
        if not reading.read_at:
            return
        read = GaugeMetricFamily("mlplatform_exporter_warehouse_read_timestamp_seconds",
                                 "When the warehouse's metrics were read.")
        read.add_metric([], reading.read_at)
        yield read
        if reading.drift:
            day, share, threshold, judged, detected, version = reading.drift
            labels = ["day", "reference_version"]
            yield _gauge("mlplatform_drift_share", "Share of the judged features that drifted on the latest profiled "
                         "day (monitoring.drift_days).", labels, [str(day), version or ""], share)
            yield _gauge("mlplatform_drift_share_threshold", "The drifted share above which a day is drifted.",
                         labels, [str(day), version or ""], threshold)
            yield _gauge("mlplatform_drift_detected", "1 when the latest profiled day was judged drifted.",
                         labels, [str(day), version or ""], 1.0 if judged and detected else 0.0)
            yield _gauge("mlplatform_drift_day_timestamp_seconds", "The latest profiled day.", [], [], _epoch(day))
        if reading.performance:
            day, auc, window_auc, expected, degraded, version = reading.performance
            labels = ["day", "model_version"]
            yield _gauge("mlplatform_realised_roc_auc", "Realised ROC AUC of the latest judged day's trailing window "
                         "(monitoring.model_performance).", labels, [str(day), version or ""],
                         window_auc if window_auc is not None else auc)
            yield _gauge("mlplatform_expected_roc_auc", "The scoring version's validation ROC AUC.", labels,
                         [str(day), version or ""], expected)
            yield _gauge("mlplatform_performance_degraded", "1 when the latest judged day fell below the tolerance.",
                         labels, [str(day), version or ""], 1.0 if degraded else 0.0)
        if reading.quarantine:
            day_ts = GaugeMetricFamily("mlplatform_latest_day_timestamp_seconds", "The latest day loaded into raw.",
                                       labels=["source"])
            loaded = GaugeMetricFamily("mlplatform_latest_day_raw_rows", "Rows of the latest day in raw.",
                                       labels=["source"])
            quarantined = GaugeMetricFamily("mlplatform_latest_day_quarantined_rows",
                                            "Rows of the latest day in quarantine.", labels=["source"])
            for source, (day, rows, bad) in reading.quarantine.items():
                day_ts.add_metric([source], _epoch(day))
                loaded.add_metric([source], rows)
                quarantined.add_metric([source], bad)
            yield from (day_ts, loaded, quarantined)
        if reading.last_event and reading.last_event[0] is not None:
            event_time, ingested = reading.last_event
            yield _gauge("mlplatform_stream_last_event_timestamp_seconds", "Event time of the latest streamed event "
                         "in raw.flight_events (the replay's clock).", [], [], _epoch(event_time))
            yield _gauge("mlplatform_stream_last_ingested_timestamp_seconds", "When the latest streamed event was "
                         "ingested.", [], [], _epoch(ingested))
        alerts = GaugeMetricFamily("mlplatform_alerts", "Rows of monitoring.alerts by kind.", labels=["kind"])
        for kind, count in reading.alerts.items():
            alerts.add_metric([kind], count)
        yield alerts

    # -- MLflow: the versions serving answers with ---------------------------------------------------
    def _models(self):
        from mlplatform.training.tracking import tracking_from

        versions = GaugeMetricFamily("mlplatform_model_version", "The registered version behind each alias "
                                     "(champion, canary, shadow).", labels=["model", "role"])
        tracking = tracking_from(self.settings)
        try:
            for role in ROLES:
                version = tracking.version_by_alias(role)
                if version is not None:
                    versions.add_metric([tracking.registered_model, role], float(version.version))
        except Exception as exc:  # noqa: BLE001 - an unreachable store: no versions this scrape, said in the log
            log.warning("MLflow not read: %s", exc)
        yield versions

    # -- the broker: the stream's lag --------------------------------------------------------------
    def _stream(self):
        from mlplatform.stream.broker import Broker

        broker = Broker(self.settings.redis_url)
        try:
            if not broker.ping():
                return
            lag = broker.lag()
        finally:
            broker.close()
        yield _gauge("mlplatform_stream_lag_messages", "Messages of the stream not yet ingested (pending and "
                     "undelivered, XINFO GROUPS).", [], [], lag.total)
        millis = int(lag.last_id.split("-")[0])
        if millis:
            yield _gauge("mlplatform_stream_last_message_timestamp_seconds", "When the latest message reached the "
                         "broker.", [], [], millis / 1000)


    # -- the landing zone: the latest day delivered (the replay's clock) -----------------------------
    def _landing(self):
        from mlplatform.ingest.contracts import DAILY
        from mlplatform.ingest.landing import landed_days

        latest = GaugeMetricFamily("mlplatform_landing_latest_day_timestamp_seconds",
                                   "The latest day delivered to the landing zone.", labels=["source"])
        for contract in DAILY:
            days = landed_days(self.settings.landing, contract)
            if days:
                latest.add_metric([contract.name], _epoch(dt.date.fromisoformat(max(days))))
        yield latest


def _gauge(name: str, documentation: str, labels: list[str], values: list[str], value) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    if value is not None:
        family.add_metric(values, float(value))
    return family


# --- Alertmanager's webhook -> monitoring.alerts (and the platform's webhook) -------------------------

def receive_alerts(settings: Settings, payload: dict) -> list[str]:
    """Record each alert of an Alertmanager webhook payload (version 4) as a row of
    ``monitoring.alerts`` (kind ``prometheus:<alertname>``, firing or resolved) and POST it to the
    platform's webhook. Returns what could not be delivered or stored."""
    from mlplatform.monitoring.sensors import record_alert

    problems = []
    for alert in payload.get("alerts", []):
        labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
        name = labels.get("alertname", "unnamed")
        subject = labels.get("asset") or labels.get("job") or labels.get("check") or ""
        message = (f"[{alert.get('status', 'firing')}] {annotations.get('summary', name)}"
                   + (f": {annotations['description']}" if annotations.get("description") else ""))
        with WAREHOUSE_LOCK:
            error = record_alert(settings.database, subject, alert.get("fingerprint", ""), message,
                                 settings.alert_webhook, kind=f"prometheus:{name}",
                                 details={"labels": labels, "startsAt": alert.get("startsAt"),
                                          "status": alert.get("status"), "generatorURL": alert.get("generatorURL")})
        if error:
            problems.append(error)
    return problems


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        log.debug(format, *args)


def exporter_app(settings: Settings, collector: PlatformCollector | None = None):
    """The WSGI app: GET /metrics (the collector), POST /alerts (Alertmanager's webhook), GET /health."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or PlatformCollector(settings))
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/metrics":
            return metrics(environ, start_response)
        if path == "/alerts" and method == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            try:
                payload = json.loads(environ["wsgi.input"].read(size) or b"{}")
            except ValueError as exc:
                start_response("400 Bad Request", [("Content-Type", "text/plain")])
                return [f"not JSON: {exc}".encode()]
            problems = receive_alerts(settings, payload)
            start_response("200 OK" if not problems else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [json.dumps({"problems": problems}).encode()]
        if path == "/health":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"GET /metrics, POST /alerts, GET /health"]

    return app


def exporter_server(settings: Settings, host: str, port: int) -> WSGIServer:
    """The exporter's HTTP server (threaded), bound and not yet serving."""
    return make_server(host, port, exporter_app(settings), server_class=_Server, handler_class=_QuietHandler)


def serve_exporter(settings: Settings, host: str, port: int) -> None:
    """Serve the exporter until interrupted."""
    server = exporter_server(settings, host, port)
    log.info("exporter on http://%s:%d/metrics", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
