"""``MLPLATFORM_HOME`` on disk: its folders, the Dagster instance's ``dagster.yaml`` (written
when absent, never overwritten) and the warehouse pool's limit in the instance. ``mlplatform
init`` and every command that needs a home call ``init_home``; the distributed profile writes its
own ``dagster.yaml`` first (``cluster.DAGSTER_CLUSTER_YAML``)."""

from __future__ import annotations

from mlplatform.keys import WAREHOUSE_POOL
from mlplatform.settings import Settings

DAGSTER_YAML = """\
# Written by `mlplatform init` when absent; edit freely, it is not overwritten.
# Run, event-log and schedule storage: SQLite files under this directory.
# For PostgreSQL set MLPLATFORM_DAGSTER_PG_URL (README: "Pointing at PostgreSQL").
storage:
  sqlite:
    base_dir: {storage}
{common}"""

DAGSTER_POSTGRES_YAML = """\
# Written by `mlplatform init` when absent, because MLPLATFORM_DAGSTER_PG_URL is set; edit freely.
# Run, event-log and schedule storage on PostgreSQL (dagster-postgres). The URL, with its
# password, stays in the environment: postgresql+psycopg2://user:password@host:5432/database
storage:
  postgres:
    postgres_url:
      env: MLPLATFORM_DAGSTER_PG_URL
{common}"""

DAGSTER_COMMON_YAML = f"""\
telemetry:
  enabled: false
# One DuckDB writer at a time: steps that use the warehouse declare pool "{WAREHOUSE_POOL}".
concurrency:
  pools:
    default_limit: 1
# A run whose process died keeps its slot until the dead_run_sensor (or `mlplatform recover`)
# marks it failed; the daemon frees the slots of runs that have ended.
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
"""


def init_home(settings: Settings, pools: bool = True) -> Settings:
    """Create the home's folders and a dagster.yaml (idempotent); with ``pools``, also give the
    warehouse pool its one slot in the Dagster instance."""
    for path in (settings.home, settings.landing, settings.dagster_home, settings.warehouse.parent):
        path.mkdir(parents=True, exist_ok=True)
    dagster_yaml = settings.dagster_home / "dagster.yaml"
    if dagster_yaml.exists() and settings.dagster_pg_url and "postgres:" not in dagster_yaml.read_text():
        raise SystemExit(
            f"MLPLATFORM_DAGSTER_PG_URL is set but {dagster_yaml} stores runs in SQLite: unset DAGSTER_HOME "
            f"(it then defaults to {settings.home / 'dagster-postgres'}) or point it at a PostgreSQL instance directory"
        )
    if not dagster_yaml.exists():
        if settings.dagster_pg_url:
            dagster_yaml.write_text(DAGSTER_POSTGRES_YAML.format(common=DAGSTER_COMMON_YAML))
        else:
            dagster_yaml.write_text(DAGSTER_YAML.format(storage=settings.dagster_home / "storage",
                                                        common=DAGSTER_COMMON_YAML))
    if pools and not settings.lake_catalog:
        init_pool(settings)
    return settings


def init_pool(settings: Settings) -> None:
    """Set the warehouse pool's limit (1) in the instance now, unless someone set one (see
    ``private_api.set_pool_limit_if_default``: otherwise two runs starting together can each
    claim a slot)."""
    from mlplatform.private_api import set_pool_limit_if_default

    with instance_of(settings) as instance:
        set_pool_limit_if_default(instance, WAREHOUSE_POOL, 1)


def instance_of(settings: Settings):
    """The Dagster instance of these settings (``DAGSTER_HOME``'s ``dagster.yaml``)."""
    from dagster import DagsterInstance

    return DagsterInstance.from_config(str(settings.dagster_home))
