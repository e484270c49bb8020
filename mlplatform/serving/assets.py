"""The skew check: the server's own feature code (snapshot, schedule index, per-request SQL),
asked about real flights as a client asks, against the offline feature table."""

from __future__ import annotations

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunStatusSensorContext,
    SkipReason,
    asset_check,
    run_status_sensor,
)

from mlplatform import keys
from mlplatform.resources import WarehouseReader
from mlplatform.settings import Settings

# The serving modules (pandas, numpy, duckdb) are imported by the check when it runs, not when the
# code location loads.

SAMPLE_ROWS = 500
SAMPLE_DAYS = 5  # the schedule of these days is precomputed, as the server does for all of them


def online_features_match(settings: Settings):
    """The skew check over the warehouse and dbt project of these settings."""

    @asset_check(
        asset=keys.FEATURES,
        name="online_features_match",
        description=f"The server's features of {SAMPLE_ROWS} random real flights, by both of its paths, "
        "equal their rows in features.flight_features. Its own job (serving_check_job): every morning, after a "
        "rebuild of the feature table, and at the end of `mlplatform run`.",
        blocking=False,
    )
    def _check(warehouse_reader: WarehouseReader) -> AssetCheckResult:
        from mlplatform.serving.features import SKEW_CHECK_TARGET, compile_online_features
        from mlplatform.serving.service import OnlineFeatures
        from mlplatform.serving.skew import compare, sample_offline

        compiled = compile_online_features(settings, settings.home / SKEW_CHECK_TARGET)
        with warehouse_reader.get_connection() as conn:
            offline = sample_offline(conn, SAMPLE_ROWS, SAMPLE_DAYS)
        snapshot = _snapshot(settings, compiled)
        try:
            verdict = compare(OnlineFeatures(settings, compiled), snapshot, offline)
        finally:
            snapshot.close()
        return verdict_result(verdict)

    return _check


def verdict_result(verdict: dict) -> AssetCheckResult:
    found = verdict["precomputed"] + verdict["on_demand"]
    features = sorted({m["feature"] for m in found})
    passed = not found and verdict["not_in_schedule"] == 0
    problems = []
    if found:
        problems.append(f"{len(found)} feature values differ from features.flight_features ({', '.join(features)}): "
                        "the table is stale, or the online and offline paths diverged")
    if verdict["not_in_schedule"]:
        problems.append(f"{verdict['not_in_schedule']} real flights were not found in the server's schedule index")
    return AssetCheckResult(
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "flights_compared": verdict["flights"],
            "days_sampled": verdict["days"],
            "mismatches_precomputed": len(verdict["precomputed"]),
            "mismatches_on_demand": len(verdict["on_demand"]),
            "not_in_schedule": verdict["not_in_schedule"],
            "mismatched_features": ", ".join(features) or "none",
            "examples": str(found[:5]) if found else "none",
        },
        description="; ".join(problems) or None,
    )


def serving_check_sensor(daily_job, check_job):
    """After a rebuild of the feature table (a daily_job run with dbt's full refresh), the skew
    check: a rebuild is when the offline values all change at once."""

    @run_status_sensor(
        name="serving_check_after_rebuild", run_status=DagsterRunStatus.SUCCESS, monitored_jobs=[daily_job],
        request_job=check_job, default_status=DefaultSensorStatus.RUNNING,
        description="Runs serving_check_job after a daily_job run that rebuilt the feature table (full refresh).",
    )
    def _after_rebuild(context: RunStatusSensorContext):
        config = context.dagster_run.run_config.get("ops", {}).get("dbt_daily", {}).get("config", {})
        if not config.get("full_refresh"):
            return SkipReason(f"run {context.dagster_run.run_id} did not rebuild the feature table")
        return RunRequest(run_key=f"after-rebuild:{context.dagster_run.run_id}")

    return _after_rebuild


def _snapshot(settings: Settings, compiled):
    """A snapshot, waiting out another process's lock on the warehouse (a serving refresh)."""
    from mlplatform.serving.features import Snapshot
    from mlplatform.warehouse import retry_while_locked

    return retry_while_locked(lambda: Snapshot.load(settings.database, compiled.relations), max_wait=60)
