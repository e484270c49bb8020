"""Where everything lives. One root, ``MLPLATFORM_HOME``; every path under it overridable.

Environment variables (all optional):

=========================  ==========================================  ===========================
variable                   meaning                                     default
=========================  ==========================================  ===========================
MLPLATFORM_HOME            root of all runtime state                   ``<repo>/.mlplatform``
MLPLATFORM_WAREHOUSE       DuckDB warehouse file                       ``$HOME/warehouse.duckdb``
MLPLATFORM_LANDING         landing zone (the upstream's daily files)   ``$HOME/landing``
MLPLATFORM_MLFLOW_URI      MLflow tracking URI                         ``sqlite:///$HOME/mlflow/mlflow.db``
MLPLATFORM_MLFLOW_ARTIFACTS MLflow artifact root                       ``$HOME/mlflow/artifacts``
MLPLATFORM_MLFLOW_UI_URL   the MLflow UI: ``mlplatform ui`` (``make    ``http://127.0.0.1:5000``, or
                           ui``) serves it there, asset metadata       the tracking server when
                           links runs to it                            MLPLATFORM_MLFLOW_URI is http(s)
MLPLATFORM_PROFILES        whylogs profiles (daily and reference)      ``$HOME/profiles``
MLPLATFORM_DUCKDB_MEMORY_LIMIT  DuckDB's memory limit in each process  ``512MB`` (DuckDB's own
                           (Dagster's steps, dbt); past it DuckDB      default is 80% of RAM)
                           spills to disk beside the warehouse
DAGSTER_HOME               Dagster instance directory                  ``$HOME/dagster``, or
                                                                       ``$HOME/dagster-postgres``
MLPLATFORM_DAGSTER_PG_URL  run, event and schedule storage on           unset: SQLite files under
                           PostgreSQL (``postgresql+psycopg2://...``)   DAGSTER_HOME
=========================  ==========================================  ===========================

``apply_defaults()`` fills the unset ones into ``os.environ`` so that Dagster resources can be
configured with ``dagster.EnvVar`` and the dbt profile with ``env_var()`` and see one truth.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DBT_PROJECT_DIR = REPO_ROOT / "dbt_project"
MLFLOW_UI_URL = "http://127.0.0.1:5000"  # where `mlplatform ui` serves the MLflow UI unless told otherwise


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
    duckdb_memory_limit: str = "512MB"

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> "Settings":
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
        default_dagster_home = home / ("dagster-postgres" if pg_url else "dagster")
        mlflow_uri = env.get("MLPLATFORM_MLFLOW_URI") or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
        # a tracking server is its own UI; a local store gets the one `mlplatform ui` starts
        remote = mlflow_uri.startswith(("http://", "https://"))
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
            duckdb_memory_limit=env.get("MLPLATFORM_DUCKDB_MEMORY_LIMIT") or "512MB",
        )

    def as_env(self) -> dict[str, str]:
        return {
            "MLPLATFORM_HOME": str(self.home),
            "MLPLATFORM_WAREHOUSE": str(self.warehouse),
            "MLPLATFORM_LANDING": str(self.landing),
            "MLPLATFORM_MLFLOW_URI": self.mlflow_uri,
            "MLPLATFORM_MLFLOW_ARTIFACTS": str(self.mlflow_artifacts),
            "MLPLATFORM_MLFLOW_UI_URL": self.mlflow_ui_url,
            "MLPLATFORM_PROFILES": str(self.profiles),
            "MLPLATFORM_DUCKDB_MEMORY_LIMIT": self.duckdb_memory_limit,
            "DAGSTER_HOME": str(self.dagster_home),
        }


def apply_defaults() -> Settings:
    """Resolve settings from the environment and write the resolved values back into it.

    Also points dbt's logs and artifacts under the home and puts this interpreter's scripts
    directory on PATH, so that the ``dbt`` installed beside it is the one dagster-dbt runs."""
    settings = Settings.from_env()
    for key, value in settings.as_env().items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("DBT_LOG_PATH", str(settings.home / "dbt" / "logs"))
    os.environ.setdefault("DBT_TARGET_PATH", str(settings.home / "dbt" / "target"))
    os.environ.setdefault("DBT_SEND_ANONYMOUS_USAGE_STATS", "false")
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    return settings


def dbt_executable() -> str:
    """The dbt installed beside this interpreter (the venv's), whatever PATH says."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else "dbt"
