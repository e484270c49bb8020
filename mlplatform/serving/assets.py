"""The skew check: online features (the server's SQL, asked as a client asks) against the
offline feature table, for a sample of real flights."""

from __future__ import annotations

from dagster import AssetCheckResult, AssetCheckSeverity, AssetKey, asset_check
from dagster_duckdb import DuckDBResource

from mlplatform.serving.features import compile_online_features
from mlplatform.serving.skew import mismatches, online_for, sample_offline
from mlplatform.settings import Settings

FEATURES_KEY = AssetKey(["features", "flight_features"])
SAMPLE_ROWS = 500


@asset_check(
    asset=FEATURES_KEY,
    name="online_features_match",
    description=f"The online features of {SAMPLE_ROWS} random real flights equal their rows in the table.",
    blocking=False,
)
def online_features_match(warehouse: DuckDBResource) -> AssetCheckResult:
    settings = Settings.from_env()
    compiled = compile_online_features(settings, settings.home / "dbt" / "online-check-target")
    with warehouse.get_connection() as conn:
        offline = sample_offline(conn, SAMPLE_ROWS)
        online = online_for(conn, compiled, offline)
    found = mismatches(offline, online)
    columns = sorted({m["column"] for m in found})
    return AssetCheckResult(
        passed=not found,
        severity=AssetCheckSeverity.ERROR,
        metadata={
            "flights_compared": len(offline),
            "features_compared": len(online.columns) - 1,
            "mismatches": len(found),
            "mismatched_columns": ", ".join(columns) or "none",
            "examples": str(found[:5]) if found else "none",
        },
        description=None if not found else (
            f"{len(found)} feature values differ between the online path and features.flight_features "
            f"({', '.join(columns)}): the table is stale or the two paths diverged"
        ),
    )
