"""Every asset key, run tag and pool name of the graph, defined once and imported.

Asset keys follow the lineage: ingest -> transform -> features -> training -> predictions ->
monitoring. (dbt models' keys come from the dbt project: ``features/flight_features`` is one of
them, named here because Python assets depend on it.)
"""

from __future__ import annotations

from dagster import AssetKey

# --- the pool of steps that write the DuckDB warehouse (one writer at a time, `mlplatform init`)
WAREHOUSE_POOL = "warehouse_writer"

# --- asset keys
RAW_FLIGHTS = AssetKey("raw_flights")
RAW_WEATHER = AssetKey("raw_weather")
RAW_FLIGHT_EVENTS = AssetKey("raw_flight_events")
FEATURES = AssetKey(["features", "flight_features"])
FLIGHT_DELAY_MODEL = AssetKey("flight_delay_model")
MODEL_EVALUATION = AssetKey("model_evaluation")
APPROVED_CHALLENGER = AssetKey("approved_challenger")
CHAMPION_MODEL = AssetKey("champion_model")
PREDICTIONS = AssetKey(["predictions", "flight_delay"])
FEATURE_PROFILES = AssetKey(["monitoring", "feature_profiles"])
REFERENCE_PROFILE = AssetKey(["monitoring", "reference_profile"])
DRIFT_REPORT = AssetKey(["monitoring", "drift_report"])
MODEL_PERFORMANCE = AssetKey(["monitoring", "model_performance"])
ONLINE_EVALUATION = AssetKey(["monitoring", "online_evaluation"])
ASSET_COSTS = AssetKey(["monitoring", "asset_costs"])  # the compute cost of every asset step (monitoring.costs)

# --- run tags of ours (Dagster's own, such as the partition range, are in partitions.py)
TRIGGER_TAG = "mlplatform/trigger"            # what started a run: "landing", or the retraining signals
REQUESTED_BY_TAG = "mlplatform/requested_by"  # the sensor that requested it
WINDOWS_TAG = "mlplatform/retrain_windows"    # where a retraining put its signal days
RUN_KEY_TAG = "dagster/run_key"               # Dagster's: the run key of a sensor's request


def flight_id(date, carrier: str, number: int, origin: str, sched_dep_time: int) -> str:
    """The warehouse's flight id, '<local date>_<carrier><number>_<origin>_<HHMM>' (dbt's
    ``flight_id()`` macro builds the same in SQL)."""
    return f"{date}_{carrier}{number}_{origin}_{int(sched_dep_time):04d}"
