"""The code location: every asset, check, resource and job of the platform, assembled once.

Loaded by ``dagster dev -w workspace.yaml`` and by ``mlplatform run``. Settings come from the
environment (``mlplatform.settings``); defaults live under ``MLPLATFORM_HOME``.
"""

from __future__ import annotations

import os

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    define_asset_job,
    in_process_executor,
)

from mlplatform.ingest.assets import raw_assets
from mlplatform.ingest.sensors import landing_sensor
from mlplatform.monitoring.assets import monitoring_assets, reference_profile
from mlplatform.monitoring.sensors import sensors
from mlplatform.operations import dead_run_sensor
from mlplatform.partitions import daily_partitions
from mlplatform.predictions.assets import flight_delay_predictions
from mlplatform.resources import (
    landing_resource,
    profile_store_resource,
    warehouse_reader_resource,
    warehouse_resource,
)
from mlplatform.serving.assets import online_features_match
from mlplatform.settings import apply_defaults, dbt_executable
from mlplatform.training.assets import training_assets
from mlplatform.training.tracking import mlflow_resource
from mlplatform.transform.assets import DbtCli, build_dbt_assets, dbt_project

settings = apply_defaults()
project = dbt_project(settings)
dbt_asset_defs = build_dbt_assets(project)

daily_selection = AssetSelection.assets(*[a for a in raw_assets if a.partitions_def]) | AssetSelection.assets(
    *[a for a in dbt_asset_defs if a.partitions_def]
)
training_selection = AssetSelection.assets(*training_assets, reference_profile)
predictions_selection = AssetSelection.assets(flight_delay_predictions)
monitoring_selection = AssetSelection.assets(*[a for a in monitoring_assets if a.partitions_def])
reference_selection = (
    AssetSelection.all() - daily_selection - training_selection - predictions_selection - monitoring_selection
)

reference_job = define_asset_job(
    "reference_job", selection=reference_selection, description="Load reference snapshots and their dbt models."
)
daily_job = define_asset_job(
    "daily_job",
    selection=daily_selection,
    partitions_def=daily_partitions,
    description="Ingest days, run dbt and build features for a partition or a range (one run).",
)

training_job = define_asset_job(
    "training_job",
    selection=training_selection,
    description="Train a challenger, evaluate it against the champion, promote it if the gate passes.",
)
predictions_job = define_asset_job(
    "predictions_job",
    selection=predictions_selection,
    partitions_def=daily_partitions,
    description="Score a day or a range of days with the champion.",
)

monitoring_job = define_asset_job(
    "monitoring_job",
    selection=monitoring_selection,
    partitions_def=daily_partitions,
    description="Profile a day or a range, compare it with the champion's reference, measure realised performance.",
)

# Declarative automation: every asset with an automation condition follows its inputs. On by
# default; it runs in the Dagster daemon (`dagster dev` starts one), every
# MLPLATFORM_AUTOMATION_INTERVAL_SECONDS (30; the daemon ticks at most every 5 s).
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=int(os.getenv("MLPLATFORM_AUTOMATION_INTERVAL_SECONDS", "30")),
)

defs = Definitions(
    assets=[*raw_assets, *dbt_asset_defs, *training_assets, flight_delay_predictions, *monitoring_assets],
    asset_checks=[online_features_match],
    jobs=[reference_job, daily_job, training_job, predictions_job, monitoring_job],
    sensors=[landing_sensor, *sensors, automation_sensor, dead_run_sensor],
    resources={
        "warehouse": warehouse_resource(),
        "warehouse_reader": warehouse_reader_resource(),
        "landing": landing_resource(),
        "dbt": DbtCli(project_dir=project, dbt_executable=dbt_executable()),
        "mlflow": mlflow_resource(),
        "profile_store": profile_store_resource(),
    },
    # One process per run: an in-process step costs milliseconds, a subprocess a second and a
    # half, and DuckDB allows one writer at a time anyway.
    executor=in_process_executor,
)
