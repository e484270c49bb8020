"""The code location: every asset, check, resource, job, schedule and sensor of the platform,
assembled in one function from a ``Settings``.

``build_defs(settings)`` builds the ``Definitions``; ``defs`` is Dagster's lazy loader of it
(``@definitions``), which ``dagster dev -w workspace.yaml``, ``dg dev`` and ``dg check defs``
load with the settings of their environment. Importing this module reads and writes nothing;
``load_defs`` builds (once per settings) what ``mlplatform run``, the loop demo and the tests
execute.
"""

from __future__ import annotations

from functools import lru_cache

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    Definitions,
    ScheduleDefinition,
    define_asset_job,
    definitions,
    in_process_executor,
)

from mlplatform.settings import Settings

# the jobs, by name (what `mlplatform run` and the sensors launch)
REFERENCE_JOB = "reference_job"
DAILY_JOB = "daily_job"
TRAINING_JOB = "training_job"
PREDICTIONS_JOB = "predictions_job"
MONITORING_JOB = "monitoring_job"
SERVING_CHECK_JOB = "serving_check_job"
APPROVE_CANARY_JOB = "approve_canary_job"
COST_REPORT_JOB = "cost_report_job"


def build_defs(settings: Settings) -> Definitions:
    from mlplatform.automation import with_freshness
    from mlplatform.ingest.assets import raw_assets
    from mlplatform.ingest.sensors import landing_sensor
    from mlplatform.ingest.streamed import broker_resource, raw_flight_events, stream_ingest_job, stream_sensor
    from mlplatform.monitoring.assets import monitoring_assets, reference_profile
    from mlplatform.monitoring.costs import cost_report
    from mlplatform.monitoring.sensors import sensors
    from mlplatform.operations import dead_run_sensor
    from mlplatform.partitions import daily_partitions
    from mlplatform.predictions.assets import flight_delay_predictions
    from mlplatform.retention import retention_defs
    from mlplatform.rollout.assets import approve_canary_job, online_evaluation, rollout_policy_resource
    from mlplatform.resources import (
        landing_resource,
        profile_store_resource,
        warehouse_reader_resource,
        warehouse_resource,
    )
    from mlplatform.serving.assets import online_features_match, serving_check_sensor
    from mlplatform.training.assets import training_assets
    from mlplatform.training.tracking import mlflow_resource
    from mlplatform.transform.assets import build_dbt_assets, dbt_project, dbt_resource

    project = dbt_project(settings)
    dbt_asset_defs = build_dbt_assets(project, settings)
    skew_check = online_features_match(settings)

    daily_selection = (AssetSelection.assets(*[a for a in raw_assets if a.partitions_def], raw_flight_events)
                       | AssetSelection.assets(*[a for a in dbt_asset_defs if a.partitions_def]))
    training_selection = AssetSelection.assets(*training_assets, reference_profile)
    predictions_selection = AssetSelection.assets(flight_delay_predictions)
    monitoring_selection = AssetSelection.assets(*[a for a in monitoring_assets if a.partitions_def], online_evaluation)
    assets = [*raw_assets, raw_flight_events, *dbt_asset_defs, *training_assets, flight_delay_predictions,
              *monitoring_assets, online_evaluation]
    # the compute cost of every asset above, read from the event log (its own job, once a day)
    asset_costs = cost_report({key: group for a in assets for key, group in a.group_names_by_key.items()})
    costs_selection = AssetSelection.assets(asset_costs)
    reference_selection = (AssetSelection.all() - daily_selection - training_selection - predictions_selection
                           - monitoring_selection - costs_selection)
    # the skew check reads the whole feature table and holds no writer: its own job, not every day's
    not_the_skew_check = AssetSelection.checks(skew_check)

    jobs = [
        define_asset_job(REFERENCE_JOB, selection=reference_selection - not_the_skew_check,
                         description="Load reference snapshots and their dbt models."),
        define_asset_job(DAILY_JOB, selection=daily_selection - not_the_skew_check, partitions_def=daily_partitions,
                         description="Ingest days, run dbt and build features for a partition or a range (one run)."),
        define_asset_job(TRAINING_JOB, selection=training_selection,
                         description="Train a challenger, evaluate it against the champion, promote it if the gate "
                         "passes."),
        define_asset_job(PREDICTIONS_JOB, selection=predictions_selection, partitions_def=daily_partitions,
                         description="Score a day or a range of days with the champion."),
        define_asset_job(MONITORING_JOB, selection=monitoring_selection, partitions_def=daily_partitions,
                         description="Profile a day or a range, compare it with the champion's reference, measure "
                         "realised performance, judge the versions in the shadow and the canary."),
        define_asset_job(SERVING_CHECK_JOB, selection=not_the_skew_check,
                         description="Serving readiness: the server's own feature code, asked about real flights, "
                         "against features.flight_features (online_features_match)."),
        define_asset_job(COST_REPORT_JOB, selection=costs_selection,
                         description="Record every asset step's compute cost (monitoring.asset_costs) and report the "
                         "most expensive assets, per group and per day."),
    ]
    # Declarative automation: every asset with an automation condition follows its inputs. It runs
    # in the Dagster daemon (`dagster dev` starts one).
    automation_sensor = AutomationConditionSensorDefinition(
        "automation_sensor", target=AssetSelection.all(), default_status=DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=settings.automation_interval_seconds,
    )
    serving_check_schedule = ScheduleDefinition(
        name="serving_check_schedule", job_name=SERVING_CHECK_JOB, cron_schedule="0 6 * * *",
        default_status=DefaultScheduleStatus.RUNNING,
        description="Every morning, after the night's deliveries: is the online path still the offline one?",
    )
    cost_report_schedule = ScheduleDefinition(
        name="cost_report_schedule", job_name=COST_REPORT_JOB, cron_schedule="15 0 * * *",
        default_status=DefaultScheduleStatus.RUNNING,
        description="After midnight (UTC): the costs of the day that ended, and of the report's window.",
    )
    assets = [*assets, asset_costs]
    if settings.celery:  # the distributed profile: a backfill is a run per week (partitions.week_runs)
        from mlplatform.partitions import week_runs

        assets = [a.with_attributes(backfill_policy=week_runs) if a.partitions_def else a for a in assets]
    defs = Definitions(
        assets=assets,
        asset_checks=[skew_check],
        jobs=[*jobs, stream_ingest_job, approve_canary_job],
        schedules=[serving_check_schedule, cost_report_schedule],
        sensors=[landing_sensor(settings), stream_sensor(settings), *sensors(settings), serving_check_sensor(jobs[1], jobs[5]),
                 automation_sensor, dead_run_sensor],
        resources={
            "warehouse": warehouse_resource(settings),
            "warehouse_reader": warehouse_reader_resource(settings),
            "landing": landing_resource(settings),
            "dbt": dbt_resource(settings, project),
            "mlflow": mlflow_resource(settings),
            "profile_store": profile_store_resource(settings),
            "broker": broker_resource(settings),
            "rollout": rollout_policy_resource(settings),
        },
        executor=executor_of(settings),
    )
    # retention's job and schedule (mlplatform/retention.py), and the daily assets' freshness policies
    return with_freshness(Definitions.merge(defs, retention_defs(settings)))


def executor_of(settings: Settings):
    """One process per run: an in-process step costs milliseconds, a subprocess a second and a
    half, and DuckDB allows one writer at a time anyway. In the distributed profile, the steps go
    to Celery workers (``celery_app``), the broker's URL read from the environment where the
    step is launched (it holds a password: it is never part of the run's configuration)."""
    if not settings.celery:
        return in_process_executor
    from dagster_celery import celery_executor

    from mlplatform.settings import CELERY_BACKEND, CELERY_BROKER

    return celery_executor.configured({"broker": {"env": CELERY_BROKER}, "backend": {"env": CELERY_BACKEND}},
                                      name="celery_workers")


@lru_cache(maxsize=8)
def load_defs(settings: Settings) -> Definitions:
    """The Definitions of ``settings``, built once per settings."""
    return build_defs(settings)


@definitions
def defs() -> Definitions:
    return build_defs(Settings.from_env())
