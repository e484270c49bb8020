"""dbt models as Dagster assets (dagster-dbt).

Two groups of dbt nodes: ``tag:reference`` (unpartitioned dimension tables) and ``tag:daily``
(incremental by day). A daily run passes its window to dbt (``MLPLATFORM_MIN_DATE`` and
``MLPLATFORM_MAX_DATE``, see ``macros/partition_window.sql``) so that any range of days is one dbt
invocation (``BackfillPolicy.single_run()``). dbt tests arrive as asset checks.
Row counts and column schemas are read from the warehouse after dbt exits (dbt holds DuckDB's
single-writer lock while it runs). A step's compute cost (``monitoring.costs.measured``, dbt's
process included) is split between its models by dbt's execution time of each.
"""


import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    Backoff,
    Config,
    Failure,
    Jitter,
    Output,
    RetryPolicy,
    TimeWindowPartitionMapping,
)
from dagster_dbt import DagsterDbtTranslator, DbtProject, dbt_assets
from dagster_duckdb import DuckDBResource
from pydantic import Field

from mlplatform import keys
from mlplatform.automation import on_new_data
from mlplatform.monitoring.costs import measured
from mlplatform.partitions import (
    FIRST_DAY,
    LAST_DAY,
    daily_partitions,
    single_run,
    window_of,
)
from mlplatform.private_api import DbtCliWithoutPerCallCosts
from mlplatform.settings import DBT_PROJECT_DIR, LAKE_TARGET, Settings, dbt_executable, dbt_variables
from mlplatform.warehouse import table_metadata

FEATURE_LOOKBACK_DAYS = 28  # dbt var feature_lookback_days
REFERENCE_MODELS = AssetSelection.tag("reference", "")  # dbt's tag:reference models and seed


def dbt_project(settings: Settings) -> DbtProject:
    # (a target path of its own per dbt target: a manifest names the target's database)
    return DbtProject(project_dir=DBT_PROJECT_DIR,
                      target_path=settings.home / "dbt" / ("target-lake" if settings.lake_catalog else "target"),
                      target=LAKE_TARGET if settings.lake_catalog else None)


def prepare(project: DbtProject, settings: Settings) -> None:
    """``dbt parse``: the manifest the code location loads and dbt's partial-parse state, which
    every later dbt run reuses (``mlplatform init``; ``ensure_manifest`` when the project changed).

    One parse, not dagster-dbt's preparer: it parses, then marks every seed as changed in that
    state (for projects that move after they are prepared: a seed's absolute path is in it), and
    every dbt run then re-parses the seed and validates it, ~1 s of each daily run here
    (benchmarks/README.md, "One day"). This project runs where it was prepared. Without
    dagster-dbt's ``dbt --version`` subprocess before the parse (``private_api``), ~2 s."""
    with environment(dbt_variables(settings.database, settings.duckdb_memory_limit)):
        DbtCliWithoutPerCallCosts(project_dir=project, dbt_executable=dbt_executable()).cli(
            ["parse", "--quiet"], target_path=project.target_path
        ).wait()


def ensure_manifest(project: DbtProject, settings: Settings) -> Path:
    """Parse the dbt project when its manifest is missing or older than any project file, also
    under ``dagster dev`` (where dagster-dbt's ``prepare_if_dev`` would parse at every load of the
    code location, in every run's process too: seconds per run, for edits this check also sees)."""
    manifest = project.manifest_path
    newest = max(
        p.stat().st_mtime
        for p in DBT_PROJECT_DIR.rglob("*")
        if p.suffix in {".sql", ".yml", ".yaml", ".csv"} and "target" not in p.parts
    )
    if not manifest.exists() or manifest.stat().st_mtime < newest:
        prepare(project, settings)
    return manifest


class DbtCli(DbtCliWithoutPerCallCosts):
    """dagster-dbt's dbt resource (without its per-call costs: ``private_api``), starting dbt
    with the platform's settings in its environment, which ``profiles.yml`` and the macros read
    (``env_var()``): the warehouse, DuckDB's memory limit and, for a daily run, the window of
    days. dagster-dbt starts dbt with a copy of this process's environment, so the variables are
    set for that moment and restored (``environment``): the one process-wide setting the
    platform makes. Not ``--vars``: a change of vars makes dbt re-parse the whole project, ~2 s
    of every run (``macros/partition_window.sql``)."""

    warehouse: str = Field(description="The DuckDB warehouse (MLPLATFORM_WAREHOUSE for dbt), or ducklake:<catalog> "
                           "(MLPLATFORM_LAKE_CATALOG, with the target `lake`).")
    memory_limit: str = Field("512MB", description="DuckDB's memory limit (MLPLATFORM_DUCKDB_MEMORY_LIMIT for dbt).")
    prepared_target: str = Field(description="Where the manifest and dbt's partial-parse state were prepared: "
                                 "dagster-dbt copies that state into each run's own target (DBT_TARGET_PATH).")

    def cli(self, args, *, window=None, **kwargs):
        """``DbtCliResource.cli`` with the settings (and ``window``, a pair of days) in dbt's
        environment."""
        variables = {**dbt_variables(self.warehouse, self.memory_limit), "DBT_TARGET_PATH": self.prepared_target}
        if window is not None:
            variables.update(zip(WINDOW_ENV, (window[0].isoformat(), window[1].isoformat())))
        with environment(variables):
            return super().cli(args, **kwargs)


def dbt_resource(settings: Settings, project: DbtProject) -> DbtCli:
    return DbtCli(project_dir=project, dbt_executable=dbt_executable(), warehouse=settings.database_config(),
                  memory_limit=settings.config("duckdb_memory_limit"), prepared_target=str(project.target_path))


class Translator(DagsterDbtTranslator):
    """Keys are model names; sources map to the ingest assets (``meta.dagster.asset_key``);
    groups and owners come from ``dbt_project.yml``. The features model reads the
    ``FEATURE_LOOKBACK_DAYS`` days of daily stats before each day, which the partition mapping
    tells Dagster."""

    def get_partition_mapping(
        self, dbt_resource_props: Mapping[str, Any], dbt_parent_resource_props: Mapping[str, Any]
    ):
        edge = (dbt_resource_props.get("name"), dbt_parent_resource_props.get("name"))
        if edge == ("flight_features", "agg_daily_route_stats"):
            return TimeWindowPartitionMapping(
                start_offset=-FEATURE_LOOKBACK_DAYS, end_offset=0, allow_nonexistent_upstream_partitions=True
            )
        if edge in {("fct_flights", "stg_weather"), ("flight_features", "stg_weather"),
                    ("flight_features", "stg_departure_events")}:
            # the trailing weather window, and the 2 hours of departures before an early flight's
            # prediction time, reach into the day before
            return TimeWindowPartitionMapping(start_offset=-1, end_offset=0, allow_nonexistent_upstream_partitions=True)
        return super().get_partition_mapping(dbt_resource_props, dbt_parent_resource_props)

    def get_automation_condition(self, dbt_resource_props: Mapping[str, Any]):
        """Every model follows its inputs: a new raw partition flows through dbt by itself. A
        daily model does not re-run all its days when a reference table is reloaded."""
        if "daily" in dbt_resource_props.get("tags", []):
            return on_new_data(ignore=REFERENCE_MODELS)
        return on_new_data()

    def get_tags(self, dbt_resource_props: Mapping[str, Any]) -> Mapping[str, str]:
        # the layer is the schema the node builds into: staging, marts, features
        return {**super().get_tags(dbt_resource_props), "layer": dbt_resource_props.get("schema", "dbt")}


DATE_COLUMNS = ("flight_date", "weather_date")  # the partition column of the daily models


def _with_table_metadata(events, manifest: Mapping, warehouse: DuckDBResource, window=None):
    """Attach row counts (of the run's window, for daily models) and column schemas."""
    events = list(events)  # dbt has exited and released the warehouse
    nodes = manifest["nodes"]
    with warehouse.get_connection() as conn:
        for event in events:
            unique_id = event.metadata.get("unique_id") if isinstance(event, Output) else None
            node = nodes.get(getattr(unique_id, "value", unique_id)) if unique_id else None
            if node is None or node.get("resource_type") not in ("model", "seed"):
                yield event
                continue
            schema, name = node["schema"], node["alias"] or node["name"]
            metadata = table_metadata(conn, schema, name, 0)
            columns = {c.name for c in metadata["dagster/column_schema"].columns}
            date_column = next((c for c in DATE_COLUMNS if c in columns), None)
            where, params = ("true", [])
            if window and date_column:
                where, params = f"{date_column} BETWEEN ? AND ?", list(window)
            rows = conn.execute(f'SELECT count(*) FROM "{schema}"."{name}" WHERE {where}', params).fetchone()[0]
            metadata["dagster/row_count"] = rows
            yield event.with_metadata({**event.metadata, **metadata})


WINDOW_ENV = ("MLPLATFORM_MIN_DATE", "MLPLATFORM_MAX_DATE")
CONFLICT_RETRY = RetryPolicy(max_retries=5, delay=2, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """``variables`` set in this process's environment inside the block, restored afterwards
    (for the dbt process started inside it; the steps of a run execute one at a time)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class DbtConfig(Config):
    full_refresh: bool = False  # rebuild the tables from scratch: use with the whole range of days


def build_args(config: DbtConfig) -> list[str]:
    """``dbt build``, without writing a manifest.json and run_results.json into each run's target
    folder: nothing reads them (Dagster uses the manifest prepared at load and dbt's event
    stream), and writing them is ~0.7 s and ~1.5 MB of every run. Each run's dbt.log stays."""
    return ["build", "--no-write-json", *(["--full-refresh"] if config.full_refresh else [])]


def build_dbt_assets(project: DbtProject, settings: Settings):
    manifest_path = ensure_manifest(project, settings)
    manifest = json.loads(manifest_path.read_text())
    translator = Translator()
    # On a DuckLake, a model whose window another run replaced first fails its commit as a conflict
    # (optimistic commits, README "DuckLake"); its step runs again, and the incremental models
    # replace their window again
    retry = CONFLICT_RETRY if settings.lake_catalog else None

    @dbt_assets(
        manifest=manifest,
        project=project,
        select="tag:reference",
        name="dbt_reference",
        dagster_dbt_translator=translator,
        pool=keys.WAREHOUSE_POOL,
        retry_policy=retry,
    )
    @measured
    def dbt_reference(context: AssetExecutionContext, config: DbtConfig, dbt: DbtCli, warehouse: DuckDBResource):
        invocation = dbt.cli(build_args(config), context=context)
        yield from _with_table_metadata(invocation.stream(), manifest, warehouse)

    @dbt_assets(
        manifest=manifest,
        project=project,
        select="tag:daily",
        name="dbt_daily",
        partitions_def=daily_partitions,
        backfill_policy=single_run,
        dagster_dbt_translator=translator,
        pool=keys.WAREHOUSE_POOL,
        retry_policy=retry,
    )
    @measured
    def dbt_daily(context: AssetExecutionContext, config: DbtConfig, dbt: DbtCli, warehouse: DuckDBResource):
        start, end = window_of(context)
        if config.full_refresh and (start, end) != (FIRST_DAY, LAST_DAY):
            raise Failure(f"full_refresh rebuilds the tables from the run's days only: run it over "
                          f"{FIRST_DAY}..{LAST_DAY}, not {start}..{end}")
        invocation = dbt.cli(build_args(config), context=context, window=(start, end))
        yield from _with_table_metadata(invocation.stream(), manifest, warehouse, (start, end))

    return [dbt_reference, dbt_daily]
