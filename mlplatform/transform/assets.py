"""dbt models as Dagster assets (dagster-dbt).

Two groups of dbt nodes: ``tag:reference`` (unpartitioned dimension tables) and ``tag:daily``
(incremental by day). A daily run passes its window to dbt as ``--vars`` so that any range of
days is one dbt invocation (``BackfillPolicy.single_run()``). dbt tests arrive as asset checks.
Row counts and column schemas are read from the warehouse after dbt exits (dbt holds DuckDB's
single-writer lock while it runs).
"""


import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from dagster import (
    AssetExecutionContext,
    AssetSelection,
    Config,
    Failure,
    Output,
    TimeWindowPartitionMapping,
)
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets
from dagster_duckdb import DuckDBResource

from mlplatform.automation import on_new_data
from mlplatform.partitions import (
    FIRST_DAY,
    LAST_DAY,
    daily_partitions,
    single_run,
    window_of,
)
from mlplatform.settings import DBT_PROJECT_DIR, Settings
from mlplatform.warehouse import table_metadata

FEATURE_LOOKBACK_DAYS = 28  # dbt var feature_lookback_days
REFERENCE_MODELS = AssetSelection.tag("reference", "")  # dbt's tag:reference models and seed


def dbt_project(settings: Settings | None = None) -> DbtProject:
    settings = settings or Settings.from_env()
    return DbtProject(project_dir=DBT_PROJECT_DIR, target_path=settings.home / "dbt" / "target")


def ensure_manifest(project: DbtProject) -> Path:
    """Parse the dbt project when its manifest is missing or older than any project file.
    Under ``dagster dev`` dagster-dbt re-parses on every load instead."""
    if os.getenv("DAGSTER_IS_DEV_CLI"):
        project.prepare_if_dev()
        return project.manifest_path
    manifest = project.manifest_path
    newest = max(
        p.stat().st_mtime
        for p in DBT_PROJECT_DIR.rglob("*")
        if p.suffix in {".sql", ".yml", ".yaml"} and "target" not in p.parts
    )
    if not manifest.exists() or manifest.stat().st_mtime < newest:
        project.preparer.prepare(project)
    return manifest


class DbtCli(DbtCliResource):
    """dagster-dbt's dbt resource, told dbt's version instead of asking for it.

    ``DbtCliResource`` runs ``dbt --version`` in a subprocess once per run (to tell dbt-core from
    the Fusion engine): ~2.8 s on this machine, more than the dbt build of a day. The dbt it runs
    is the dbt-core installed beside this interpreter (``settings.dbt_executable``), so the version
    is the package's. Should dagster-dbt rename the attribute, the override is simply unused and
    the subprocess comes back (slower, not wrong). test_pipeline checks both give the same version."""

    @cached_property
    def _cli_version(self):
        from importlib.metadata import version as installed

        from packaging import version

        return version.parse(installed("dbt-core"))


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
        if edge in {("fct_flights", "stg_weather"), ("flight_features", "stg_weather")}:
            # the trailing weather window reaches into the day before
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


class DbtConfig(Config):
    full_refresh: bool = False  # rebuild the tables from scratch: use with the whole range of days


def build_dbt_assets(project: DbtProject):
    manifest_path = ensure_manifest(project)
    manifest = json.loads(manifest_path.read_text())
    translator = Translator()

    @dbt_assets(
        manifest=manifest,
        project=project,
        select="tag:reference",
        name="dbt_reference",
        dagster_dbt_translator=translator,
        pool="warehouse_writer",
    )
    def dbt_reference(
        context: AssetExecutionContext, config: DbtConfig, dbt: DbtCliResource, warehouse: DuckDBResource
    ):
        invocation = dbt.cli(["build", *(["--full-refresh"] if config.full_refresh else [])], context=context)
        yield from _with_table_metadata(invocation.stream(), manifest, warehouse)

    @dbt_assets(
        manifest=manifest,
        project=project,
        select="tag:daily",
        name="dbt_daily",
        partitions_def=daily_partitions,
        backfill_policy=single_run,
        dagster_dbt_translator=translator,
        pool="warehouse_writer",
    )
    def dbt_daily(context: AssetExecutionContext, config: DbtConfig, dbt: DbtCliResource, warehouse: DuckDBResource):
        start, end = window_of(context)
        if config.full_refresh and (start, end) != (FIRST_DAY, LAST_DAY):
            raise Failure(f"full_refresh rebuilds the tables from the run's days only: run it over "
                          f"{FIRST_DAY}..{LAST_DAY}, not {start}..{end}")
        dbt_vars = {"min_date": start.isoformat(), "max_date": end.isoformat()}
        args = ["build", "--vars", json.dumps(dbt_vars), *(["--full-refresh"] if config.full_refresh else [])]
        invocation = dbt.cli(args, context=context)
        yield from _with_table_metadata(invocation.stream(), manifest, warehouse, (start, end))

    return [dbt_reference, dbt_daily]
