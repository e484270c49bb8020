"""Everything configurable, read from the environment in one place: ``Settings.from_env()``.

One root, ``MLPLATFORM_HOME``; every path under it overridable. Nothing here writes the
environment: the code location is built from a ``Settings`` (``definitions.build_defs``), and a
resource is configured with ``dagster.EnvVar(name)`` where the variable is set (so the UI shows
the variable, not its value) and with the default otherwise (``Settings.config``). The one
process-wide setting the platform makes is the environment of a dbt process it starts
(``transform.assets.DbtCli``, for dbt's ``env_var()``).

=============================================  ==============================================  =========================
variable                                       meaning                                         default
=============================================  ==============================================  =========================
MLPLATFORM_HOME                                root of all runtime state                       ``<repo>/.mlplatform``
MLPLATFORM_WAREHOUSE                           DuckDB warehouse file                           ``$HOME/warehouse.duckdb``
MLPLATFORM_LAKE_CATALOG                        the warehouse as a DuckLake instead (the        unset: the DuckDB file
                                               distributed profile): its catalog,
                                               ``postgres:dbname=... host=... user=...``
                                               (password from PGPASSWORD) or a file
MLPLATFORM_CELERY_BROKER, _BACKEND             steps run on Celery workers over this broker    unset: the steps of a run in
                                               and result backend (the distributed profile)    its own process
MLPLATFORM_LAKE_DATA_PATH                      the DuckLake's data files (a shared             ``$HOME/lake/data/``
                                               directory; set when the lake is created)
MLPLATFORM_LANDING                             landing zone (the upstream's daily files)       ``$HOME/landing``
MLPLATFORM_MLFLOW_URI                          MLflow tracking URI                             ``sqlite:///$HOME/mlflow/mlflow.db``
MLPLATFORM_MLFLOW_ARTIFACTS                    MLflow artifact root                            ``$HOME/mlflow/artifacts``
MLPLATFORM_MLFLOW_UI_URL                       the MLflow UI ``mlplatform ui`` serves, which   ``http://127.0.0.1:5000``, or the
                                               asset metadata links runs to                    tracking server when the URI is http(s)
MLPLATFORM_PROFILES                            whylogs profiles (daily and reference)          ``$HOME/profiles``
MLPLATFORM_DUCKDB_MEMORY_LIMIT                 DuckDB's memory limit in each process (steps,   ``512MB`` (DuckDB's own: 80% of RAM)
                                               dbt); past it DuckDB spills to disk
DAGSTER_HOME                                   Dagster instance directory                      ``$HOME/dagster`` (``dagster-postgres``
                                                                                               with MLPLATFORM_DAGSTER_PG_URL)
MLPLATFORM_DAGSTER_PG_URL                      run, event and schedule storage on PostgreSQL   unset: SQLite under DAGSTER_HOME
MLPLATFORM_ALERT_WEBHOOK                       URL failed runs and Prometheus' alerts are      unset
                                               POSTed to
MLPLATFORM_PROMETHEUS_PORT                     Prometheus (``make ui``), on 127.0.0.1          9090
MLPLATFORM_ALERTMANAGER_PORT                   Alertmanager (``make ui``), on 127.0.0.1        9093
MLPLATFORM_ALERTMANAGER_URL                    an Alertmanager of yours Prometheus sends its   unset: the platform's own
                                               alerts to (then none is started)
MLPLATFORM_EXPORTER_PORT                       the platform's exporter (/metrics, /alerts)     9108
MLPLATFORM_REDIS_URL                           the broker of the event stream (Redis 7         ``redis://127.0.0.1:6380/0``: the
                                               Streams)                                        platform's own, started by ``make ui``
MLPLATFORM_LANDING_SENSOR_INTERVAL_SECONDS     how often the landing sensor looks              15
MLPLATFORM_STREAM_SENSOR_INTERVAL_SECONDS      how often the stream's lag is looked at         10
MLPLATFORM_AUTOMATION_INTERVAL_SECONDS         how often declarative automation evaluates      30
MLPLATFORM_RETRAINING_SENSOR_INTERVAL_SECONDS  how often the retraining sensor decides         60
MLPLATFORM_RETRAIN_COOLDOWN_SECONDS            after a promotion the retraining sensor asked   21600 (6 h)
                                               for, how long before it asks again
MLPLATFORM_SERVE_HOST, _PORT                   where ``mlplatform serve`` listens              127.0.0.1, 8000
MLPLATFORM_SERVE_TOKEN                         the bearer token the API asks for (required     unset: no token on loopback
                                               when it listens beyond loopback)
MLPLATFORM_SERVE_REFRESH_SECONDS               how often the server looks for a new champion   30
                                               (and the canary, the shadow and the share)
MLPLATFORM_ROLLOUT_STAGED                      a version the gate passes goes through shadow   true
                                               and canary (false: champion at once)
MLPLATFORM_CANARY_SHARE                        share of flights the canary answers             0.1
MLPLATFORM_ROLLOUT_SHADOW_DAYS                 labelled days in the shadow before the canary   1
MLPLATFORM_ROLLOUT_MIN_FLIGHTS, _MIN_DAYS      labels before a canary is promoted              2000, 3
MLPLATFORM_ROLLOUT_MAX_DAYS                    a canary not better by then is rejected         14
MLPLATFORM_ROLLOUT_LEVEL                       significance over the canary's window           0.05
MLPLATFORM_ROLLOUT_APPROVAL                    a passing canary waits for a named approval     false
MLPLATFORM_RETENTION_CRON                      when ``retention_job`` applies the retention    ``30 4 * * *`` (UTC)
                                               policies (``mlplatform.retention``)
MLPLATFORM_RETENTION_MODEL_DAYS                a rejected, rolled back or retired version's    30
                                               artifacts are deleted this long after it left
MLPLATFORM_RETENTION_KEEP_CHAMPIONS            the latest champions (the current one too)      3
                                               whose artifacts stay whatever their age
MLPLATFORM_RETENTION_PROFILE_DAYS              daily whylogs profiles older than this (before  90
                                               the newest day profiled) are deleted
MLPLATFORM_RETENTION_INFERENCE_LOG_DAYS        inference log days older than this are deleted  30
                                               (finished days are compacted into Parquet)
MLPLATFORM_RETENTION_RUN_DAYS                  finished Dagster runs older than this lose      30
                                               their compute logs (and, with no asset events,
                                               the run itself)
=============================================  ==============================================  =========================
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `mlplatform ui` serves the MLflow UI unless told otherwise
# the distributed profile's Celery broker and result backend (URLs with a password: read from the
# environment where a step is launched, never part of a run's configuration)
CELERY_BROKER, CELERY_BACKEND = "MLPLATFORM_CELERY_BROKER", "MLPLATFORM_CELERY_BACKEND"
REDIS_URL = "redis://127.0.0.1:6380/0"  # the platform's own broker (not Redis' usual 6379: another may run there)

# the environment variable of each path and setting a resource or a dbt process is configured with
VARIABLES = {
    "home": "MLPLATFORM_HOME",
    "warehouse": "MLPLATFORM_WAREHOUSE",
    "landing": "MLPLATFORM_LANDING",
    "mlflow_uri": "MLPLATFORM_MLFLOW_URI",
    "mlflow_artifacts": "MLPLATFORM_MLFLOW_ARTIFACTS",
    "mlflow_ui_url": "MLPLATFORM_MLFLOW_UI_URL",
    "profiles": "MLPLATFORM_PROFILES",
    "duckdb_memory_limit": "MLPLATFORM_DUCKDB_MEMORY_LIMIT",
    "redis_url": "MLPLATFORM_REDIS_URL",
    "lake_catalog": "MLPLATFORM_LAKE_CATALOG",
    "lake_data_path": "MLPLATFORM_LAKE_DATA_PATH",
    "dagster_home": "DAGSTER_HOME",
}


@dataclass(frozen=True)
class Settings:
    home: Path
    warehouse: Path
    landing: Path
    mlflow_uri: str
    mlflow_artifacts: Path
    mlflow_ui_url: str
    profiles: Path
    dagster_home: Path
    dagster_pg_url: str | None = None  # Dagster's storage on PostgreSQL instead of SQLite
    lake_catalog: str | None = None  # the warehouse is a DuckLake with this catalog (mlplatform.lake)
    lake_data_path: Path | None = None
    celery: bool = False  # steps on Celery workers (MLPLATFORM_CELERY_BROKER and _BACKEND set)
    duckdb_memory_limit: str = "512MB"
    redis_url: str = REDIS_URL
    alert_webhook: str | None = None
    prometheus_port: int = 9090
    alertmanager_port: int = 9093
    alertmanager_url: str | None = None
    exporter_port: int = 9108
    landing_sensor_interval_seconds: int = 15
    stream_sensor_interval_seconds: int = 10
    automation_interval_seconds: int = 30
    retraining_sensor_interval_seconds: int = 60
    retrain_cooldown_seconds: int = 6 * 3600
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_refresh_seconds: float = 30.0
    serve_token: str | None = field(default=None, repr=False)  # a secret: never printed, never in as_env
    # the rollout policy's settings given in the environment ((field, value), ...): the rest are
    # ``rollout.assets.RolloutPolicy``'s defaults
    rollout_overrides: tuple = ()
    retention_cron: str = "30 4 * * *"
    retention_model_days: int = 30
    retention_keep_champions: int = 3
    retention_profile_days: int = 90
    retention_inference_log_days: int = 30
    retention_run_days: int = 30
    # which of VARIABLES were set in the environment these settings were read from
    explicit: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = Path(env.get("MLPLATFORM_HOME") or REPO_ROOT / ".mlplatform").resolve()
        mlflow_dir = home / "mlflow"
        pg_url = env.get("MLPLATFORM_DAGSTER_PG_URL") or None
        if pg_url and not pg_url.startswith("postgresql+psycopg2://"):
            # SQLAlchemy 2.1 reads a bare postgresql:// with psycopg 3, which dagster-postgres does not support
            raise ValueError(
                "MLPLATFORM_DAGSTER_PG_URL must start with postgresql+psycopg2:// "
                "(e.g. postgresql+psycopg2://dagster:secret@127.0.0.1:5432/dagster)"
            )
        # one instance directory per storage: switching the variable never mixes the two
        default_dagster_home = home / ("dagster-cluster" if env.get("MLPLATFORM_LAKE_CATALOG") else
                                       "dagster-postgres" if pg_url else "dagster")
        mlflow_uri = env.get("MLPLATFORM_MLFLOW_URI") or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
        # a tracking server is its own UI; a local store gets the one `mlplatform ui` starts
        remote = mlflow_uri.startswith(("http://", "https://"))

        def number(name: str, default, kind=int):
            text = env.get(name)
            try:
                return kind(text) if text else default
            except ValueError:
                raise ValueError(f"{name}={text!r}: not a number") from None

        return cls(
            home=home,
            warehouse=Path(env.get("MLPLATFORM_WAREHOUSE") or home / "warehouse.duckdb"),
            landing=Path(env.get("MLPLATFORM_LANDING") or home / "landing"),
            mlflow_uri=mlflow_uri,
            mlflow_artifacts=Path(env.get("MLPLATFORM_MLFLOW_ARTIFACTS") or mlflow_dir / "artifacts"),
            mlflow_ui_url=(env.get("MLPLATFORM_MLFLOW_UI_URL") or (mlflow_uri if remote else MLFLOW_UI_URL)).rstrip("/"),
            profiles=Path(env.get("MLPLATFORM_PROFILES") or home / "profiles"),
            dagster_home=Path(env.get("DAGSTER_HOME") or default_dagster_home),
            dagster_pg_url=pg_url,
            lake_catalog=env.get("MLPLATFORM_LAKE_CATALOG") or None,
            celery=_celery(env),
            lake_data_path=Path(env.get("MLPLATFORM_LAKE_DATA_PATH") or home / "lake" / "data"),
            duckdb_memory_limit=env.get("MLPLATFORM_DUCKDB_MEMORY_LIMIT") or "512MB",
            redis_url=env.get("MLPLATFORM_REDIS_URL") or REDIS_URL,
            alert_webhook=env.get("MLPLATFORM_ALERT_WEBHOOK") or None,
            prometheus_port=number("MLPLATFORM_PROMETHEUS_PORT", 9090),
            alertmanager_port=number("MLPLATFORM_ALERTMANAGER_PORT", 9093),
            alertmanager_url=env.get("MLPLATFORM_ALERTMANAGER_URL") or None,
            exporter_port=number("MLPLATFORM_EXPORTER_PORT", 9108),
            landing_sensor_interval_seconds=number("MLPLATFORM_LANDING_SENSOR_INTERVAL_SECONDS", 15),
            stream_sensor_interval_seconds=number("MLPLATFORM_STREAM_SENSOR_INTERVAL_SECONDS", 10),
            automation_interval_seconds=number("MLPLATFORM_AUTOMATION_INTERVAL_SECONDS", 30),
            retraining_sensor_interval_seconds=number("MLPLATFORM_RETRAINING_SENSOR_INTERVAL_SECONDS", 60),
            retrain_cooldown_seconds=number("MLPLATFORM_RETRAIN_COOLDOWN_SECONDS", 6 * 3600),
            serve_host=env.get("MLPLATFORM_SERVE_HOST") or "127.0.0.1",
            serve_port=number("MLPLATFORM_SERVE_PORT", 8000),
            serve_token=env.get("MLPLATFORM_SERVE_TOKEN") or None,
            serve_refresh_seconds=number("MLPLATFORM_SERVE_REFRESH_SECONDS", 30.0, float),
            rollout_overrides=_rollout(env, number),
            retention_cron=env.get("MLPLATFORM_RETENTION_CRON") or cls.retention_cron,
            retention_model_days=number("MLPLATFORM_RETENTION_MODEL_DAYS", cls.retention_model_days),
            retention_keep_champions=number("MLPLATFORM_RETENTION_KEEP_CHAMPIONS", cls.retention_keep_champions),
            retention_profile_days=number("MLPLATFORM_RETENTION_PROFILE_DAYS", cls.retention_profile_days),
            retention_inference_log_days=number("MLPLATFORM_RETENTION_INFERENCE_LOG_DAYS",
                                                cls.retention_inference_log_days),
            retention_run_days=number("MLPLATFORM_RETENTION_RUN_DAYS", cls.retention_run_days),
            explicit=frozenset(name for name in VARIABLES.values() if env.get(name)),
        )

    @property
    def rollout(self) -> dict:
        return dict(self.rollout_overrides)

    @property
    def database(self) -> str:
        """What ``warehouse.connect`` opens: the DuckDB file, or ``ducklake:<catalog>``."""
        from mlplatform.lake import LAKE_PREFIX

        return LAKE_PREFIX + self.lake_catalog if self.lake_catalog else str(self.warehouse)

    @property
    def has_warehouse(self) -> bool:
        """Whether there is a warehouse to read (a DuckLake always is)."""
        return bool(self.lake_catalog) or self.warehouse.exists()

    def database_config(self):
        """The warehouse resources' ``database``: ``EnvVar`` of MLPLATFORM_WAREHOUSE where it is
        set, or the DuckLake (its catalog string holds no password: it is shown as is)."""
        return self.database if self.lake_catalog else self.config("warehouse")

    @property
    def inference_log(self) -> Path:
        """Where the server writes its inference log."""
        return self.home / "serving" / "inference_log"

    def as_env(self) -> dict[str, str]:
        """The settings as environment variables, for a process the platform starts (a server, a
        test's daemon): it then reads the same settings."""
        return {name: str(getattr(self, attribute)) for attribute, name in VARIABLES.items()
                if getattr(self, attribute) is not None}

    def config(self, attribute: str):
        """A resource's value for one of ``VARIABLES``: ``EnvVar`` of its variable when the
        variable is set (resolved where the resource runs, shown by name in the UI), else the
        default these settings computed."""
        from dagster import EnvVar

        name = VARIABLES[attribute]
        return EnvVar(name) if name in self.explicit else str(getattr(self, attribute))


# RolloutPolicy's fields read from the environment: field -> (variable, type)
ROLLOUT_VARIABLES = {
    "staged": ("MLPLATFORM_ROLLOUT_STAGED", bool),
    "canary_share": ("MLPLATFORM_CANARY_SHARE", float),
    "shadow_days": ("MLPLATFORM_ROLLOUT_SHADOW_DAYS", int),
    "min_labelled_flights": ("MLPLATFORM_ROLLOUT_MIN_FLIGHTS", int),
    "min_days": ("MLPLATFORM_ROLLOUT_MIN_DAYS", int),
    "max_days": ("MLPLATFORM_ROLLOUT_MAX_DAYS", int),
    "level": ("MLPLATFORM_ROLLOUT_LEVEL", float),
    "approval_required": ("MLPLATFORM_ROLLOUT_APPROVAL", bool),
}


def _rollout(env: Mapping[str, str], number) -> tuple:
    found = []
    for field_name, (name, kind) in ROLLOUT_VARIABLES.items():
        if not env.get(name):
            continue
        if kind is bool:
            text = env[name].strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{name}={env[name]!r}: not true or false")
            found.append((field_name, text in ("true", "1", "yes")))
        else:
            found.append((field_name, number(name, None, kind)))
    return tuple(found)


def _celery(env: Mapping[str, str]) -> bool:
    given = [bool(env.get(name)) for name in (CELERY_BROKER, CELERY_BACKEND)]
    if any(given) and not all(given):
        raise ValueError(f"set both {CELERY_BROKER} and {CELERY_BACKEND} (or neither)")
    return all(given)


LAKE_TARGET = "lake"  # profiles.yml's target for a DuckLake warehouse (the distributed profile)


def dbt_variables(warehouse: str, memory_limit: str) -> dict[str, str]:
    """What dbt's ``profiles.yml`` reads from its environment: the same at parse time and at run
    time, or dbt finds the profile changed and re-parses the whole project at every run.
    ``warehouse`` is a DuckDB file or ``ducklake:<catalog>`` (``Settings.database``; the target
    ``lake`` then, with the extensions installed where the profile loads them)."""
    from mlplatform import lake

    variables = {"MLPLATFORM_DUCKDB_MEMORY_LIMIT": str(memory_limit), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    if lake.is_lake(warehouse):
        lake.install_extensions(lake.EXTENSION_DIR)
        return {**variables, "MLPLATFORM_LAKE_CATALOG": str(warehouse)[len(lake.LAKE_PREFIX):],
                "MLPLATFORM_DUCKDB_EXTENSIONS": str(lake.EXTENSION_DIR)}
    return {**variables, "MLPLATFORM_WAREHOUSE": str(warehouse)}


def dbt_executable() -> str:
    """The dbt installed beside this interpreter (the venv's), whatever PATH says."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else "dbt"
