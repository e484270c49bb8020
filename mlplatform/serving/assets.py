"""The skew check: the server's own feature code (snapshot, schedule index, per-request SQL),
asked about real flights as a client asks, against the offline feature table."""

from __future__ import annotations

import time

from dagster import AssetCheckResult, AssetCheckSeverity, AssetKey, asset_check

from mlplatform.resources import WarehouseReader
from mlplatform.settings import Settings

# The serving modules (pandas, numpy, duckdb) are imported by the check when it runs, not when the
# code location loads.

FEATURES_KEY = AssetKey(["features", "flight_features"])
SAMPLE_ROWS = 500
SAMPLE_DAYS = 5  # the schedule of these days is precomputed, as the server does for all of them


@asset_check(
    asset=FEATURES_KEY,
    name="online_features_match",
    description=f"The server's features of {SAMPLE_ROWS} random real flights, by both of its paths, "
    "equal their rows in features.flight_features.",
    blocking=False,
    pool="warehouse_writer",  # it snapshots the warehouse: not while a run writes it
)
def online_features_match(warehouse_reader: WarehouseReader) -> AssetCheckResult:
    from mlplatform.serving.features import compile_online_features
    from mlplatform.serving.service import OnlineFeatures
    from mlplatform.serving.skew import compare, sample_offline

    settings = Settings.from_env()
    compiled = compile_online_features(settings, settings.home / "dbt" / "online-check-target")
    with warehouse_reader.get_connection() as conn:
        offline = sample_offline(conn, SAMPLE_ROWS, SAMPLE_DAYS)
    snapshot = _snapshot(settings, compiled)
    try:
        verdict = compare(OnlineFeatures(settings, compiled), snapshot, offline)
    finally:
        snapshot.close()
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


def _snapshot(settings: Settings, compiled, attempts: int = 6):
    """A snapshot, waiting out another process's lock on the warehouse (a serving refresh)."""
    from mlplatform.serving.features import Snapshot, WarehouseUnavailable

    for attempt in range(attempts):
        try:
            return Snapshot.load(settings.warehouse, compiled.relations)
        except WarehouseUnavailable as exc:
            if "busy" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")
